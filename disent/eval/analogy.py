"""Single-image analogies on a user's own images: the class of one, the style of another."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from disent.config import ConfigError
from disent.eval.grids import save_png, tile, to_pixels
from disent.models.vae import DisentVAE

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def read_image(path: Path, channels: int, image_size: int) -> torch.Tensor:
    """[C,H,W] floats in [0,1]. Refuses sizes and channel counts the model was not trained on."""
    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError:
        raise ConfigError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ConfigError(f"image {path} cannot be read as an image: {exc}") from None
    if image.size != (image_size, image_size):
        raise ConfigError(
            f"image {path} is {image.size[0]}x{image.size[1]}, but the model takes {image_size}x{image_size}; "
            f"resize it first (e.g. with PIL: Image.open(p).resize(({image_size}, {image_size})))"
        )
    bands = len(image.getbands())
    if image.mode in ("L", "1", "I", "F") and channels == 1:
        array = np.asarray(image.convert("L"))[None]
    elif image.mode in ("RGB", "RGBA", "P") and channels == 3:
        array = np.asarray(image.convert("RGB")).transpose(2, 0, 1)
    else:
        want = "greyscale (mode L)" if channels == 1 else "RGB"
        raise ConfigError(
            f"image {path} has mode {image.mode} ({bands} band(s)), but the model takes {channels}-channel "
            f"{want} images; convert it first"
        )
    return torch.from_numpy(array.copy()).float().div_(255)


def list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder of images")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ConfigError(f"folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return images


@torch.no_grad()
def analogy(vae: DisentVAE, content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """Dec(z of style, s of content): content's class drawn in style's manner. Batched [N,C,H,W]."""
    s = vae.encode(content)[0]
    mu = vae.encode(style)[1]
    return torch.sigmoid(vae.decode(mu, s))


def write_analogies(vae: DisentVAE, content: Path, style: Path, out: Path, channels: int, image_size: int) -> list[Path]:
    """File to file: OUT is the analogy image. Folder to folder: OUT is a folder with one analogy per
    (content, style) pair plus grid.png (rows: content, columns: style, originals on the borders)."""
    if content.is_dir() or style.is_dir():
        contents, styles = list_images(content), list_images(style)
        c = torch.stack([read_image(p, channels, image_size) for p in contents])
        s = torch.stack([read_image(p, channels, image_size) for p in styles])
        out.mkdir(parents=True, exist_ok=True)
        results = analogy(vae, c.repeat_interleave(len(styles), 0), s.repeat(len(contents), 1, 1, 1))
        pixels = to_pixels(results)
        written = []
        for i, cp in enumerate(contents):
            for j, sp in enumerate(styles):
                written.append(save_png(pixels[i * len(styles) + j], out / f"{cp.stem}__{sp.stem}.png", enlarge=False))
        rows = [[None, *to_pixels(s)]] + [
            [orig, *pixels[i * len(styles) : (i + 1) * len(styles)]] for i, orig in enumerate(to_pixels(c))
        ]
        written.append(save_png(tile(rows), out / "grid.png"))
        return written
    c = read_image(content, channels, image_size)[None]
    s = read_image(style, channels, image_size)[None]
    return [save_png(to_pixels(analogy(vae, c, s))[0], out, enlarge=False)]

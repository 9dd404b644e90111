"""Image grids people look at: swaps, prior samples at fixed s, interpolation in z. Saved as PNG."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from disent.models.vae import DisentVAE

PAD = 2


def tile(cells: list[list[np.ndarray | None]]) -> np.ndarray:
    """Arrange [rows][cols] of HWC uint8 images (None: blank) into one image with padding."""
    h, w, c = next(cell for row in cells for cell in row if cell is not None).shape
    rows, cols = len(cells), max(len(row) for row in cells)
    canvas = np.full((rows * (h + PAD) + PAD, cols * (w + PAD) + PAD, c), 255, dtype=np.uint8)
    for i, row in enumerate(cells):
        for j, cell in enumerate(row):
            if cell is not None:
                top, left = PAD + i * (h + PAD), PAD + j * (w + PAD)
                canvas[top : top + h, left : left + w] = cell
    return canvas


def to_pixels(images: torch.Tensor) -> list[np.ndarray]:
    """[N,C,H,W] floats in [0,1] -> list of HWC uint8."""
    array = (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return list(array)


def save_png(array: np.ndarray, path: Path, enlarge: bool = True) -> Path:
    """HWC uint8 -> PNG. Small grids are enlarged (nearest neighbour) to be readable in the MLflow UI."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    scale = -(-256 // max(array.shape[:2])) if enlarge else 1
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    image.save(path)
    return path


@torch.no_grad()
def swap_grid(vae: DisentVAE, specified_from: torch.Tensor, unspecified_from: torch.Tensor) -> np.ndarray:
    """Cell (i, j) = Dec(z of unspecified_from[j], s of specified_from[i]); originals on the borders:
    the top row shows where z comes from, the left column where s comes from."""
    s_rows = vae.encode(specified_from)[0]
    z_cols = vae.encode(unspecified_from)[1]
    n, m = len(s_rows), len(z_cols)
    images = torch.sigmoid(vae.decode(z_cols.repeat(n, 1), s_rows.repeat_interleave(m, 0)))
    cells = to_pixels(images)
    grid = [[None, *to_pixels(unspecified_from)]]
    for i, original in enumerate(to_pixels(specified_from)):
        grid.append([original, *cells[i * m : (i + 1) * m]])
    return tile(grid)


@torch.no_grad()
def prior_samples_grid(vae: DisentVAE, specified_from: torch.Tensor, samples: int, seed: int = 0) -> np.ndarray:
    """Each row keeps s of one image (shown first) and draws z from the prior N(0, I)."""
    s_rows = vae.encode(specified_from)[0]
    generator = torch.Generator(device="cpu").manual_seed(seed)
    z = torch.randn(samples, vae.z_dim, generator=generator).to(s_rows)
    n = len(s_rows)
    images = to_pixels(torch.sigmoid(vae.decode(z.repeat(n, 1), s_rows.repeat_interleave(samples, 0))))
    return tile([[o, *images[i * samples : (i + 1) * samples]] for i, o in enumerate(to_pixels(specified_from))])


@torch.no_grad()
def interpolation_grid(vae: DisentVAE, start: torch.Tensor, end: torch.Tensor, steps: int) -> np.ndarray:
    """Row i keeps s of start[i] and moves z (the mean) from start[i]'s to end[i]'s."""
    s_start, mu_start, _ = vae.encode(start)
    mu_end = vae.encode(end)[1]
    alphas = torch.linspace(0, 1, steps).to(mu_start)
    n = len(start)
    z = (1 - alphas[None, :, None]) * mu_start[:, None] + alphas[None, :, None] * mu_end[:, None]
    images = to_pixels(torch.sigmoid(vae.decode(z.reshape(n * steps, -1), s_start.repeat_interleave(steps, 0))))
    starts, ends = to_pixels(start), to_pixels(end)
    return tile([[starts[i], *images[i * steps : (i + 1) * steps], ends[i]] for i in range(n)])


@torch.no_grad()
def reconstruction_grid(vae: DisentVAE, x1: torch.Tensor, x1p: torch.Tensor) -> np.ndarray:
    """Columns: x1, Dec(mu1, s1), x1', Dec(mu1, s1') (the swap reconstruction)."""
    s1, mu1, _ = vae.encode(x1)
    s1p = vae.encode(x1p)[0]
    recon = to_pixels(torch.sigmoid(vae.decode(mu1, s1)))
    swap = to_pixels(torch.sigmoid(vae.decode(mu1, s1p)))
    return tile([list(row) for row in zip(to_pixels(x1), recon, to_pixels(x1p), swap)])

"""`disent prepare glyphs`: characters from real typefaces (Debian's fonts-urw-base35), with known factors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from disent.cli import main as disent_main
from disent.data import glyphs
from disent.data.errors import DataError

pytestmark = pytest.mark.skipif(not Path(glyphs.DEFAULT_FONTS).is_dir(),
                                reason="Debian's fonts-urw-base35 is not installed (make test installs it)")


def test_default_faces_are_the_urw_text_faces_with_their_package():
    faces = glyphs.load_faces(None)
    names = {Path(f.path).stem for f in faces}
    assert len(faces) == 33 and not names & set(glyphs.DEFAULT_SYMBOL_FACES)
    # serif, sans, mono, script, bold and italic cuts are all there
    for wanted in ("NimbusRoman-Regular", "NimbusSans-Regular", "NimbusMonoPS-Regular", "Z003-MediumItalic",
                   "NimbusSans-Bold", "NimbusRoman-Italic"):
        assert wanted in names
    assert {f.package for f in faces} == {"fonts-urw-base35"}


def test_rendering_is_deterministic_in_the_seed_and_factors_are_in_range():
    faces = glyphs.load_faces(None)
    a = glyphs.generate(60, faces, seed=3)
    b = glyphs.generate(60, faces, seed=3)
    c = glyphs.generate(60, faces, seed=4)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    images, labels, factors = a
    assert images.shape == (60, 1, 32, 32) and images.dtype == np.uint8 and images.max() > 200
    assert labels.min() >= 0 and labels.max() < 26
    assert set(np.unique(factors[:, 0])) <= set(range(len(faces)))
    for k, name in enumerate(glyphs.FACTOR_NAMES[1:], start=1):
        low, high = glyphs.FACTOR_RANGES[name]
        assert factors[:, k].min() >= low and factors[:, k].max() <= high
    # the first samples do not depend on how many are drawn
    np.testing.assert_array_equal(glyphs.generate(10, faces, seed=3)[0], images[:10])


def test_prepare_glyphs_records_each_font_and_its_package(tmp_path):
    out = tmp_path / "glyphs"
    assert disent_main(["prepare", "glyphs", str(out), "--num-samples", "400", "--no-progress"]) == 0
    manifest = json.loads((out / "train" / "manifest.json").read_text())
    assert manifest["num_classes"] == 26 and manifest["class_names"][:3] == ["A", "B", "C"]
    assert manifest["factor_names"] == glyphs.FACTOR_NAMES
    source = manifest["source"]
    assert source["kind"] == "glyphs" and source["categorical_factors"] == ["font"]
    assert len(source["fonts"]) == 33
    assert all(Path(f["file"]).is_file() and f["package"] == "fonts-urw-base35" for f in source["fonts"])


def test_fonts_can_be_picked_by_glob(tmp_path):
    out = tmp_path / "two"
    spec = f"{glyphs.DEFAULT_FONTS}/NimbusSans-*.otf"
    assert disent_main(["prepare", "glyphs", str(out), "--num-samples", "200", "--fonts", spec, "--no-progress"]) == 0
    fonts = json.loads((out / "train" / "manifest.json").read_text())["source"]["fonts"]
    assert [Path(f["file"]).name for f in fonts] == ["NimbusSans-Bold.otf", "NimbusSans-BoldItalic.otf",
                                                    "NimbusSans-Italic.otf", "NimbusSans-Regular.otf"]


@pytest.mark.parametrize("case", ["missing", "no-fonts", "symbols-only", "not-a-font"])
def test_bad_fonts_get_a_clear_error_before_anything_is_written(case, tmp_path, capsys):
    if case == "missing":
        spec, needle = str(tmp_path / "nowhere"), "no such directory or file"
    elif case == "no-fonts":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "readme.txt").write_text("no fonts here")
        spec, needle = str(tmp_path / "empty"), "no font files"
    elif case == "symbols-only":
        spec, needle = f"{glyphs.DEFAULT_FONTS}/StandardSymbolsPS.otf", "needs at least 2"
    else:
        bad = tmp_path / "bad"
        bad.mkdir()
        (bad / "broken.ttf").write_bytes(b"not a font")
        (bad / "also.otf").write_bytes(b"\x00" * 100)
        spec, needle = str(bad), "0 usable face(s)"
    with pytest.raises(DataError, match="--fonts"):
        glyphs.load_faces(spec)
    out = tmp_path / "out"
    assert disent_main(["prepare", "glyphs", str(out), "--fonts", spec, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert needle in err and spec in err and "Traceback" not in err
    assert not out.exists()

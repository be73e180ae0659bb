"""iPhone photos (HEIC), AVIF, and image files named without an extension, through the real CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from perceptscore.images import decode

from photos import sample
from test_cli_score import run


@pytest.fixture(scope="module")
def formats(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same photo as PNG (lossless reference), HEIC, AVIF, and a JPEG named by its hash."""
    pillow_heif = pytest.importorskip("pillow_heif")  # the [heif] extra; [dev] installs it
    folder = tmp_path_factory.mktemp("formats")
    img = sample("chelsea.png").convert("RGB")
    img.save(folder / "a_reference.png")
    pillow_heif.from_pillow(img).save(folder / "b_iphone.heic", quality=95)
    img.save(folder / "c_photo.avif", quality=95)
    img.save(folder / "d41d8cd98f00b204e9800998ecf8427e", format="JPEG", quality=95)
    return folder


def test_heic_and_avif_decode_to_the_photo(formats: Path) -> None:
    reference = np.asarray(decode(formats / "a_reference.png"), dtype=np.float64)
    for name in ("b_iphone.heic", "c_photo.avif"):
        pixels = np.asarray(decode(formats / name), dtype=np.float64)
        assert pixels.shape == reference.shape
        assert np.abs(pixels - reference).mean() < 3.0, name  # lossy at quality 95, but the same photo


@pytest.mark.slow
def test_heic_avif_and_extensionless_files_are_scored(formats: Path, release_checkpoints) -> None:
    out = formats.parent / "formats.csv"
    done = run(
        "score", formats, "-t", "mem", "--checkpoint", release_checkpoints["memorability"][0], "-o", out
    )
    assert done.returncode == 0, done.stderr
    df = pd.read_csv(out)
    assert [Path(p).name for p in df["path"]] == sorted(p.name for p in formats.iterdir())
    assert df["error"].isna().all()
    # the same photo scores nearly the same in every container (lossy coding moves it a little)
    assert np.ptp(df["memorability"]) < 0.05 * max(1e-3, abs(df["memorability"]).max())


@pytest.mark.slow
def test_without_the_heif_extra_a_heic_row_says_what_to_install(formats: Path, release_checkpoints) -> None:
    out = formats.parent / "no_heif.csv"
    code = (
        "import sys; sys.modules['pillow_heif'] = None\n"  # as if the extra were not installed
        "from perceptscore.cli import main\n"
        "sys.argv = ['perceptscore', *sys.argv[1:]]\n"
        "main()\n"
    )
    args = [
        str(formats / "b_iphone.heic"),
        "-t",
        "mem",
        "--checkpoint",
        str(release_checkpoints["memorability"][0]),
    ]
    done = subprocess.run(
        [sys.executable, "-c", code, "score", *args, "-o", str(out), "--workers", "0"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert pd.read_csv(out)["error"].tolist() == ["HEIC/HEIF image: install perceptscore[heif] to read it"]


@pytest.mark.slow
def test_an_extensionless_text_file_is_named_in_the_summary(tmp_path: Path, release_checkpoints) -> None:
    Image.new("RGB", (300, 240), "green").save(tmp_path / "5f2b9c", format="WEBP")
    (tmp_path / "LICENSE").write_text("MIT")
    done = run("score", tmp_path, "-t", "mem", "--checkpoint", release_checkpoints["memorability"][0])
    assert done.returncode == 0, done.stderr
    assert f"ignored 1 file that is not an image: {tmp_path / 'LICENSE'})" in done.stderr
    assert done.stdout.splitlines()[1].startswith(f'"{tmp_path / "5f2b9c"}"')

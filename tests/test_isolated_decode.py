"""The isolated decoder: a real child process per decoder, faults injected into it (decoder_faults/)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from perceptscore.batches import decode_item
from perceptscore.isolated_decode import IsolatedDecoder, crashed
from perceptscore.items import Item
from perceptscore.locators import LocalFile
from perceptscore.tasks import get_task

FAULTS = str(Path(__file__).parent / "decoder_faults")
SPECS = [get_task("memorability").preprocess, get_task("quality").preprocess]


@pytest.fixture
def faulty_decoders(monkeypatch: pytest.MonkeyPatch) -> None:
    """Children started from now on load decoder_faults/sitecustomize.py."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([FAULTS, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("PERCEPTSCORE_TEST_DECODER_FAULTS", "1")


def in_process(path: Path) -> tuple[str | None, list[np.ndarray]]:
    decoded = decode_item(Item(0, LocalFile(str(path))), SPECS, None)
    return decoded.error, [decoded.pixels[s] for s in SPECS] if decoded.error is None else []


def test_crashes_and_hangs_cost_one_row_and_the_next_file_is_decoded(
    photo_dir: Path, tmp_path: Path, faulty_decoders: None
) -> None:
    good = photo_dir / "a_square.jpg"
    crash = shutil.copy(good, tmp_path / "crash-the-decoder.jpg")
    hang = shutil.copy(good, tmp_path / "hang-the-decoder.jpg")
    noisy = shutil.copy(good, tmp_path / "noisy-decoder.jpg")
    (tmp_path / "text.jpg").write_text("not an image")
    expected_error, expected_pixels = in_process(photo_dir / "c_cat.webp")
    with IsolatedDecoder(SPECS, None, 89_478_485, timeout=2) as decoder:
        first = decoder.decode(str(photo_dir / "c_cat.webp"))
        assert first.error is None and first.stat == (
            os.stat(photo_dir / "c_cat.webp").st_size,
            os.stat(photo_dir / "c_cat.webp").st_mtime_ns,
        )
        for got, want in zip(first.pixels, expected_pixels, strict=True):
            np.testing.assert_array_equal(got, want)  # the same bytes as decoding in this process
        assert decoder.decode(str(crash)).error == crashed(2)
        start = time.monotonic()
        hung = decoder.decode(str(hang)).error
        assert hung == "the decoder crashed, or hung for 2 s, in its worker process"
        assert time.monotonic() - start < 2 + 10  # the child's alarm, or this side's grace at the latest
        chatty = decoder.decode(str(noisy))  # its prints do not reach the answers
        np.testing.assert_array_equal(chatty.pixels[0], in_process(good)[1][0])
        again = decoder.decode(str(good))  # a fresh child after each death
        np.testing.assert_array_equal(again.pixels[1], in_process(good)[1][1])
        assert decoder.decode(str(tmp_path / "text.jpg")).error == in_process(tmp_path / "text.jpg")[0]
        assert decoder.decode(str(tmp_path / "missing.jpg")).error == "no such file"
    assert expected_error is None


def test_a_closed_decoder_leaves_no_child(photo_dir: Path) -> None:
    decoder = IsolatedDecoder(SPECS, None, 89_478_485, timeout=5)
    assert decoder.decode(str(photo_dir / "a_square.jpg")).error is None
    child = decoder._child
    assert child is not None and child.poll() is None
    child.kill()  # killed while idle (an OOM killer): the next file is not blamed for it
    child.wait()
    assert decoder.decode(str(photo_dir / "c_cat.webp")).error is None
    child = decoder._child
    assert child is not None and child.poll() is None
    decoder.close()
    assert child.poll() is not None

"""Decode -> batch: one item's bytes become uint8 crops (per distinct preprocessing), and decoded items
become a ``Batch`` for the model. Each file is decoded once whatever the number of tasks; a file that
cannot be decoded carries its reason instead of pixels. Engines run ``decode_item`` wherever they decode
(worker processes, Ray tasks) and hand the collated ``Batch`` to a ``Predictor``.

With ``--decode gpu`` a worker runs ``read_item`` instead: a plain JPEG is read, not decoded (its bytes,
header and crop seed travel in the batch, ``Batch.files``), anything else is decoded there as ever; the
scoring process then decodes the batch's JPEGs on the model's device (``DeviceDecode``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING

import numpy as np

from perceptscore import tv_decode
from perceptscore.errors import DecodeError
from perceptscore.images import MAX_PIXELS, decode
from perceptscore.items import Item
from perceptscore.limits import Limits
from perceptscore.preprocess import prepare
from perceptscore.tasks import Preprocess

if TYPE_CHECKING:  # torch is imported by ``collate``: an isolated decoder process starts without it
    import torch

    from perceptscore.isolated_decode import IsolatedDecoder


@dataclass
class JpegFile:
    """A plain JPEG as a decode worker hands it on under ``--decode gpu``: its bytes, its header
    (``tv_decode.probe``) and its random crops' seed (``tv_decode.crop_seed``; None when no spec draws
    crops)."""

    data: bytes
    header: tv_decode.Header
    seed: int | None


@dataclass
class Decoded:
    item: Item
    error: str | None
    pixels: dict[Preprocess, np.ndarray]  # per preprocessing: (crops, 3, H, W) uint8
    stat: tuple[int, int] | None = None  # (size, mtime_ns) of the file scored, for incremental runs
    jpeg: JpegFile | None = None  # read, not decoded (``read_item``): no pixels yet


def decode_item(
    item: Item, specs: Sequence[Preprocess], draft: int | None, max_pixels: int = MAX_PIXELS
) -> Decoded:
    """Open, decode and prepare one item; never raises for a bad file (its reason is the ``error``)."""
    if item.error:
        return Decoded(item, item.error, {})
    stat = item.locator.stat()
    try:
        with item.locator.open() as f:
            return _prepared(item, f, specs, draft, max_pixels, stat)
    except DecodeError as exc:
        return Decoded(item, str(exc), {}, stat)


ENCODED_FILE_BYTES = 4 << 20  # a larger file is decoded in its worker (shared memory counts 4 MB a row)


def read_item(
    item: Item, specs: Sequence[Preprocess], max_pixels: int = MAX_PIXELS, max_bytes: int | None = None
) -> Decoded:
    """``--decode gpu``'s worker side: a plain JPEG (``tv_decode.probe``) is read, not decoded, for the
    scoring process to decode on its device; anything else (PNG, WebP, a JPEG Pillow must take, a file
    Pillow cannot open) is decoded here exactly as ``decode_item`` decodes it, so a crash or hang in its
    decoder stays in this worker. A file over ``max_bytes`` (default ``ENCODED_FILE_BYTES``, what the engine's
    shared-memory bound counts a row as) is decoded here too. Never raises for a bad file."""
    if item.error:
        return Decoded(item, item.error, {})
    stat = item.locator.stat()
    limit = ENCODED_FILE_BYTES if max_bytes is None else max_bytes
    if stat is not None and stat[0] > limit:
        return decode_item(item, specs, None, max_pixels)
    try:
        with item.locator.open() as f:
            data = f.read(limit + 1)
            header = tv_decode.probe(data, max_pixels) if len(data) <= limit else None
            if header is None:  # decoded here, from the file as opened (as decode_item would)
                f.seek(0)
                return _prepared(item, f, specs, None, max_pixels, stat)
    except DecodeError as exc:
        return Decoded(item, str(exc), {}, stat)
    except OSError as exc:  # a failed read, worded as the Pillow path words it
        return Decoded(item, f"unreadable image: {' '.join(str(exc).split())[:300]}", {}, stat)
    seed = tv_decode.crop_seed(data) if any(s.crops > 1 for s in specs) else None
    return Decoded(item, None, {}, stat, JpegFile(data, header, seed))


def _prepared(
    item: Item,
    f: IO[bytes],
    specs: Sequence[Preprocess],
    draft: int | None,
    max_pixels: int,
    stat: tuple[int, int] | None,
) -> Decoded:
    img = decode(f, draft, max_pixels)
    return Decoded(item, None, {spec: prepare(img, spec) for spec in specs}, stat)


@dataclass
class Encoded:
    """A batch's plain JPEGs, not decoded yet (``--decode gpu``): their bytes end to end in one uint8
    tensor (from a decode worker it travels in shared memory, as crops do: no pickling of each file), and
    per row of the batch where its bytes are (None: decoded by its worker, or an error), its header and
    its crop seed."""

    data: torch.Tensor
    spans: list[tuple[int, int] | None]
    headers: list[tv_decode.Header | None]
    seeds: list[int | None]

    @classmethod
    def of(cls, files: Sequence[JpegFile | None]) -> Encoded:
        import torch

        joined = bytearray(sum(len(f.data) for f in files if f is not None))
        view, at, spans = memoryview(joined), 0, []
        for f in files:
            if f is None:
                spans.append(None)
                continue
            view[at : at + len(f.data)] = f.data
            spans.append((at, at + len(f.data)))
            at += len(f.data)
        data = torch.frombuffer(joined, dtype=torch.uint8) if joined else torch.empty(0, dtype=torch.uint8)
        return cls(
            data, spans, [f.header if f else None for f in files], [f.seed if f else None for f in files]
        )

    def rows(self) -> list[int]:
        return [i for i, span in enumerate(self.spans) if span is not None]

    def file(self, row: int) -> torch.Tensor:
        start, end = self.spans[row]  # type: ignore[misc]
        return self.data[start:end]


@dataclass
class Batch:
    items: list[Item]
    errors: list[str | None]
    pixels: dict[Preprocess, torch.Tensor]  # per preprocessing: the decoded items' crops, stacked
    stats: list[tuple[int, int] | None]
    files: Encoded | None = None  # rows still to decode on the model's device (``DeviceDecode``)

    def pin_memory(self) -> Batch:  # called by DataLoader(pin_memory=True) for custom batch types
        self.pixels = {spec: t.pin_memory() for spec, t in self.pixels.items()}
        return self

    @classmethod
    def failed(cls, items: list[Item], reason: str) -> Batch:
        return cls(items, [reason] * len(items), {}, [None] * len(items))


def collate(decoded: list[Decoded]) -> Batch:
    """Stack the crops of the rows decoded (in order), and join the bytes of the JPEGs read."""
    import torch

    ok = [d for d in decoded if d.error is None and d.jpeg is None]
    pixels = (
        {spec: torch.from_numpy(np.concatenate([d.pixels[spec] for d in ok])) for spec in ok[0].pixels}
        if ok
        else {}
    )
    jpegs = [d.jpeg if d.error is None else None for d in decoded]
    files = Encoded.of(jpegs) if any(j is not None for j in jpegs) else None
    return Batch([d.item for d in decoded], [d.error for d in decoded], pixels, [d.stat for d in decoded],
                 files)  # fmt: skip


class DeviceDecode:
    """``--decode gpu``'s side in the scoring process: a batch's JPEGs decoded on ``device`` in one
    ``tv_decode.decode_batch`` call (batched nvJPEG on CUDA, libjpeg-turbo on the CPU), joined in row
    order with the crops the workers made of the other files. A JPEG that torchvision refuses (truncated,
    corrupt) is decoded by Pillow in an ``IsolatedDecoder`` child, from its bytes: its error row is the
    Pillow path's, and a crash or hang there costs that row, never this process. ``close()`` ends the
    child (started only when a file needs it)."""

    def __init__(
        self,
        specs: Sequence[Preprocess],
        device: str | torch.device,
        max_pixels: int = MAX_PIXELS,
        timeout: float = 60.0,
        limits: Limits | None = None,
    ) -> None:
        import torch

        from perceptscore.isolated_decode import IsolatedDecoder

        self.specs, self.device, self.max_pixels = list(specs), torch.device(device), max_pixels
        self.isolated: IsolatedDecoder = IsolatedDecoder(self.specs, None, max_pixels, timeout, limits)

    def __call__(self, batch: Batch) -> Batch:
        """``batch`` with every row decoded: ``pixels`` on the device, the refused files' errors set."""
        if batch.files is None:
            return batch
        if self.device.type != "cpu":
            return self._decoded(batch, batch.files)
        # On the CPU, in one thread: the work is per file and small (one decode, one resize, a few crops),
        # and torch's intra-op threads only wait on each other there (the crops' copies took 5x the CPU
        # time with 2 threads on a busy 2-core machine). The model gets its threads back after.
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._decoded(batch, batch.files)
        finally:
            torch.set_num_threads(threads)

    def _decoded(self, batch: Batch, files: Encoded) -> Batch:
        rows = files.rows()
        data = [files.file(i) for i in rows]
        done = tv_decode.decode_batch(
            data, self.specs, self.device, self.max_pixels, seeds=[files.seeds[i] for i in rows],
            fallback=lambda k: self._isolated(batch.items[rows[k]], data[k]),
            headers=[files.headers[i] for i in rows],
        )  # fmt: skip
        return self._joined(batch, dict(zip(rows, done, strict=True)))

    def _joined(self, batch: Batch, done: dict[int, tv_decode.Prepared]) -> Batch:
        import torch

        errors = list(batch.errors)
        workers = {s: t.to(self.device) for s, t in batch.pixels.items()}  # the workers' crops, once
        parts: dict[Preprocess, list[torch.Tensor]] = {s: [] for s in self.specs}
        at = dict.fromkeys(self.specs, 0)  # the next row's first crop in the workers' crops
        for i, error in enumerate(batch.errors):
            if error is not None:
                continue
            got = done.get(i)
            if got is not None and got.error is not None:
                errors[i] = got.error
                continue
            for s in self.specs:
                if got is None:  # decoded by its worker
                    parts[s].append(workers[s][at[s] : at[s] + s.crops])
                    at[s] += s.crops
                else:
                    parts[s].append(got.pixels[s])
        pixels = {
            s: torch.cat(p).contiguous(memory_format=torch.channels_last) for s, p in parts.items() if p
        }
        return Batch(batch.items, errors, pixels, batch.stats)

    def _isolated(self, item: Item, data: torch.Tensor) -> tv_decode.Prepared:
        import torch

        try:
            got = self.isolated.decode(item.path, data.numpy().tobytes())
        except (RuntimeError, OSError) as exc:  # the child did not start, or died: this row's error
            return tv_decode.Prepared(str(exc), {}, "isolated")
        if got.error is not None:
            return tv_decode.Prepared(got.error, {}, "isolated")
        pixels = {
            s: torch.from_numpy(p.copy()).to(self.device) for s, p in zip(self.specs, got.pixels, strict=True)
        }
        return tv_decode.Prepared(None, pixels, "isolated")

    def close(self) -> None:
        self.isolated.close()

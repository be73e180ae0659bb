"""Decode in a child process, one file at a time, so a file that crashes or hangs its decoder costs one
error row instead of the process that asked (a Ray worker, whose death Ray would retry, or an actor holding
a model).

The child (``python -m perceptscore.isolated_decode``) gets its settings as the first message, then one
uri per message, and answers each with the error or the crops of every preprocessing. One file in flight
means a child that dies died on that file: the blame is exact, nothing is decoded twice. The child arms
SIGALRM at its default action for each file, so a hang, even inside C code, ends it like a crash; this
side also gives up waiting a little later, in case the alarm cannot fire. A new child is started for the
next file.

Messages are length-prefixed (4 bytes, big-endian): a uri or a JSON header, then the crops' raw bytes.
"""

from __future__ import annotations

import contextlib
import json
import select
import signal
import struct
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import IO, Any

import numpy as np

from perceptscore.tasks import Preprocess

_LENGTH = struct.Struct(">I")
_GRACE_SECONDS = 10.0  # past the child's own alarm, before this side kills it


@dataclass
class Decoded:
    error: str | None
    stat: tuple[int, int] | None
    pixels: list[np.ndarray]  # per preprocessing, in the order given: (crops, 3, crop, crop) uint8


def crashed(timeout: float) -> str:
    """The error row of a file its decoder died on (the local engine's wording)."""
    return f"the decoder crashed, or hung for {timeout:.0f} s, in its worker process"


class IsolatedDecoder:
    """Decodes uris in a child process started on first use (and again after a file killed it)."""

    def __init__(
        self, specs: Sequence[Preprocess], draft: int | None, max_pixels: int, timeout: float
    ) -> None:
        self.specs, self.timeout = list(specs), timeout
        self._settings = {
            "specs": [asdict(s) for s in self.specs],
            "draft": draft,
            "max_pixels": max_pixels,
            "timeout": timeout,
        }
        self._child: subprocess.Popen[bytes] | None = None

    def decode(self, uri: str) -> Decoded:
        child = self._started()
        try:
            _send(child.stdin, uri.encode("utf-8", "surrogateescape"))
            header = json.loads(self._receive(child))
            if header["error"] is not None:
                return Decoded(header["error"], _stat(header["stat"]), [])
            pixels = [
                np.frombuffer(self._receive(child), np.uint8).reshape(s.crops, 3, s.crop, s.crop)
                for s in self.specs
            ]
            return Decoded(None, _stat(header["stat"]), pixels)
        except (OSError, EOFError, ValueError):  # the child died on this file (or hung past its alarm)
            self.close()
            return Decoded(crashed(self.timeout), None, [])

    def _started(self) -> subprocess.Popen[bytes]:
        if self._child is None:
            self._child = subprocess.Popen(
                [sys.executable, "-m", "perceptscore.isolated_decode"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            _send(self._child.stdin, json.dumps(self._settings).encode())
        return self._child

    def _receive(self, child: subprocess.Popen[bytes]) -> bytes:
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], self.timeout + _GRACE_SECONDS)
        if not ready:
            raise EOFError("no answer")
        return _read_message(child.stdout)

    def close(self) -> None:
        if self._child is not None:
            child, self._child = self._child, None
            if child.poll() is None:
                child.kill()
            child.wait()
            for stream in (child.stdin, child.stdout):
                with contextlib.suppress(OSError):
                    stream.close()  # type: ignore[union-attr]

    def __enter__(self) -> IsolatedDecoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def _stat(value: list[int] | None) -> tuple[int, int] | None:
    return (int(value[0]), int(value[1])) if value else None


def _send(stream: IO[bytes] | None, payload: bytes) -> None:
    assert stream is not None
    stream.write(_LENGTH.pack(len(payload)) + payload)
    stream.flush()


def _read_exactly(stream: IO[bytes], n: int) -> bytes:
    data = stream.read(n)
    if data is None or len(data) != n:
        raise EOFError("the stream ended")
    return data


def _read_message(stream: IO[bytes]) -> bytes:
    (n,) = _LENGTH.unpack(_read_exactly(stream, _LENGTH.size))
    return _read_exactly(stream, n)


def _child_main() -> int:
    from perceptscore.batches import decode_item
    from perceptscore.locators import locate
    from perceptscore.sources import Item

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    try:
        settings: dict[str, Any] = json.loads(_read_message(stdin))
    except EOFError:
        return 0
    specs = [Preprocess.from_dict(s) for s in settings["specs"]]
    signal.signal(signal.SIGALRM, signal.SIG_DFL)  # a hang ends this process, even inside C code
    while True:
        try:
            uri = _read_message(stdin).decode("utf-8", "surrogateescape")
        except EOFError:  # the parent closed our input, or is gone
            return 0
        signal.setitimer(signal.ITIMER_REAL, settings["timeout"])
        try:
            decoded = decode_item(Item(0, locate(uri)), specs, settings["draft"], settings["max_pixels"])
            error, stat = decoded.error, decoded.stat
            pixels = [np.ascontiguousarray(decoded.pixels[s]) for s in specs] if error is None else []
        except Exception as exc:  # a row says what went wrong; this process goes on with the next file
            error, stat, pixels = f"unexpected error while decoding: {type(exc).__name__}: {exc}", None, []
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        _send(stdout, json.dumps({"error": error, "stat": list(stat) if stat else None}).encode())
        for array in pixels:
            _send(stdout, array.tobytes())


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    sys.exit(_child_main())

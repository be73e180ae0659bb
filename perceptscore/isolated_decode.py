"""Decode in a child process, one file at a time, so a file that crashes or hangs its decoder costs one
error row instead of the process that asked (a Ray worker, whose death Ray would retry, or an actor holding
a model).

The child (``python -m perceptscore.isolated_decode``) gets its settings as the first message (with the
run's ``Limits``, which it installs: a file it opens itself, a tar member or a dataset row, is read under
the run's size limits, not its environment's), then one uri per message, and answers each with the
error or the crops of every preprocessing. One file in flight means a child that dies died on that file:
the blame is exact, nothing is decoded twice. The child arms SIGALRM at its default action for each file,
so a hang, even inside C code, ends it like a crash; this side also gives up waiting a little later, in
case the alarm cannot fire. A new child is started for the next file.

Messages are length-prefixed (4 bytes, big-endian). A request is a JSON header (the uri, the stat known,
whether bytes follow) and, for bytes already read (a fetched object, a tar member), those bytes: the child
never goes back to the network or the shard. An answer is a JSON header, then the crops' raw bytes.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import IO, Any

import numpy as np

from perceptscore.limits import Limits
from perceptscore.tasks import Preprocess

_LENGTH = struct.Struct(">I")
_GRACE_SECONDS = 10.0  # past the child's own alarm, before this side kills it
_STARTUP_SECONDS = 120.0  # a cold interpreter on a loaded node importing numpy, Pillow and perceptscore
_HEADER_LIMIT = 1 << 20
_READY = b"ready"


@dataclass
class Decoded:
    error: str | None
    stat: tuple[int, int] | None
    pixels: list[np.ndarray]  # per preprocessing, in the order given: (crops, 3, crop, crop) uint8


def crashed(timeout: float) -> str:
    """The error row of a file its decoder died on (the local engine's wording)."""
    return f"the decoder crashed, or hung for {timeout:.0f} s, in its worker process"


def settings_for(
    specs: Sequence[Preprocess],
    draft: int | None,
    max_pixels: int,
    timeout: float,
    limits: Limits | None = None,
) -> dict[str, Any]:
    """What the child receives (JSON-able); ``limits``: the run's (None: the child's are read from its
    environment, as outside a run)."""
    settings = {
        "specs": [asdict(s) for s in specs],
        "draft": draft,
        "max_pixels": max_pixels,
        "timeout": timeout,
    }
    return settings | ({"limits": limits.to_dict()} if limits is not None else {})


class IsolatedDecoder:
    """Decodes uris in a child process started on first use (and again after a file killed it). Not for
    several threads at once: one file in flight is what makes the blame exact."""

    def __init__(
        self,
        specs: Sequence[Preprocess],
        draft: int | None,
        max_pixels: int,
        timeout: float,
        limits: Limits | None = None,
    ) -> None:
        self.specs, self.timeout = list(specs), timeout
        self._settings = settings_for(self.specs, draft, max_pixels, timeout, limits)  # the child's
        self._child: subprocess.Popen[bytes] | None = None

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> IsolatedDecoder:
        """A decoder from ``settings_for``'s JSON-able dict (how a Ray task receives it)."""
        specs = [Preprocess.from_dict(s) for s in settings["specs"]]
        limits = Limits.from_dict(settings["limits"]) if "limits" in settings else None
        return cls(specs, settings["draft"], settings["max_pixels"], settings["timeout"], limits)

    def decode(self, uri: str, data: bytes | None = None, stat: tuple[int, int] | None = None) -> Decoded:
        """The file at ``uri``, or ``data`` (its bytes, already read) under that name."""
        header = {"uri": uri, "stat": list(stat) if stat else None, "bytes": data is not None}
        child = self._sent(json.dumps(header).encode(), data)
        deadline = time.monotonic() + self.timeout + _GRACE_SECONDS  # the whole answer, not each read
        try:
            header = json.loads(_receive(child, deadline, _HEADER_LIMIT))
            if header["error"] is not None:
                return Decoded(str(header["error"]), _stat(header["stat"]), [])
            pixels = []
            for s in self.specs:
                size = s.crops * 3 * s.crop * s.crop
                data = _receive(child, deadline, size)
                if len(data) != size:
                    raise EOFError("an answer of the wrong size")
                pixels.append(np.frombuffer(data, np.uint8).reshape(s.crops, 3, s.crop, s.crop))
            return Decoded(None, _stat(header["stat"]), pixels)
        except (OSError, EOFError, ValueError, KeyError, TypeError):  # died, hung, or answered garbage
            self.close()
            return Decoded(crashed(self.timeout), None, [])

    def _sent(self, payload: bytes, data: bytes | None) -> subprocess.Popen[bytes]:
        """The child, with ``payload`` sent to it; a child found dead (killed while idle) is replaced
        first, so the next file is not blamed for it."""
        for attempt in (1, 2):
            if self._child is not None and self._child.poll() is not None:
                self.close()
            child = self._started()
            try:
                _send(child.stdin, payload)
                if data is not None:
                    _send(child.stdin, data)
                return child
            except OSError:
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _started(self) -> subprocess.Popen[bytes]:
        if self._child is None:
            child = subprocess.Popen(
                [sys.executable, "-m", "perceptscore.isolated_decode"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0,
            )  # fmt: skip
            self._child = child
            try:
                _send(child.stdin, json.dumps(self._settings).encode())
                # its imports are not a file's time: they have a clock of their own
                if _receive(child, time.monotonic() + _STARTUP_SECONDS, 16) != _READY:
                    raise EOFError("not ready")
            except (OSError, EOFError) as exc:
                self.close()
                raise RuntimeError(f"the isolated decoder process did not start: {exc}") from None
        return self._child

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


def _receive(child: subprocess.Popen[bytes], deadline: float, limit: int) -> bytes:
    """One message from the child's unbuffered stdout, whole by ``deadline`` and at most ``limit`` bytes:
    a child that stops mid-answer, or writes something else there, cannot make this wait for ever."""
    assert child.stdout is not None
    fd = child.stdout.fileno()
    (n,) = _LENGTH.unpack(_read_fd(fd, _LENGTH.size, deadline))
    if n > limit:
        raise EOFError(f"a message of {n} bytes where at most {limit} were expected")
    return _read_fd(fd, n, deadline)


def _read_fd(fd: int, n: int, deadline: float) -> bytes:
    chunks, got = [], 0
    while got < n:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise EOFError("no answer in time")
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            raise EOFError("the stream ended")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _read_message(stream: IO[bytes]) -> bytes:
    """The child's side: one message from its (blocking) stdin."""
    (n,) = _LENGTH.unpack(_read_exactly(stream, _LENGTH.size))
    return _read_exactly(stream, n)


def _read_exactly(stream: IO[bytes], n: int) -> bytes:
    data = stream.read(n)
    if data is None or len(data) != n:
        raise EOFError("the stream ended")
    return data


def _child_main() -> int:
    from perceptscore.batches import decode_item
    from perceptscore.items import Item
    from perceptscore.locators import InMemory, Locator, locate

    # The answers go to a private copy of stdout; fd 1 itself goes to /dev/null, so a library that
    # prints there cannot corrupt them.
    stdin, stdout = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    try:
        settings: dict[str, Any] = json.loads(_read_message(stdin))
    except EOFError:
        return 0
    specs = [Preprocess.from_dict(s) for s in settings["specs"]]
    if "limits" in settings:
        from perceptscore import limits

        limits.install(Limits.from_dict(settings["limits"]))
    _send(stdout, _READY)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)  # a hang ends this process, even inside C code
    while True:
        try:
            request = json.loads(_read_message(stdin))
            data = _read_message(stdin) if request["bytes"] else None
        except EOFError:  # the parent closed our input, or is gone
            return 0
        uri, known = request["uri"], _stat(request["stat"])
        locator: Locator = InMemory(uri, data, known) if data is not None else locate(uri)
        signal.setitimer(signal.ITIMER_REAL, settings["timeout"])
        try:
            decoded = decode_item(Item(0, locator), specs, settings["draft"], settings["max_pixels"])
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

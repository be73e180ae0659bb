"""Where an item's bytes live. A locator opens them and reads their size and mtime, so nothing downstream
(decoding, incremental runs, the engines) calls ``os.stat`` or ``open`` on a path itself: a remote object or
an archive member is one more locator class here, registered in ``locate``.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from perceptscore.errors import DecodeError


class Locator(Protocol):
    @property
    def uri(self) -> str:
        """What the output's ``path`` column shows, and what ``locate`` turns back into this locator."""
        ...

    def open(self) -> BinaryIO:
        """The bytes, as a seekable binary file; ``DecodeError`` with a one-line reason if unreadable."""
        ...

    def stat(self) -> tuple[int, int] | None:
        """(size, mtime_ns): what ``--incremental`` compares to tell a file is unchanged; None if unknown."""
        ...


@dataclass(frozen=True)
class LocalFile:
    path: str

    @property
    def uri(self) -> str:
        return self.path

    def stat(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns

    def open(self) -> BinaryIO:
        try:
            st = os.stat(self.path)
            if not stat.S_ISREG(st.st_mode):  # a FIFO or device named like an image would block or never end
                raise DecodeError("is a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file")
            if st.st_size == 0:
                raise DecodeError("empty file")
            return open(self.path, "rb")
        except FileNotFoundError:
            raise DecodeError("no such file") from None
        except IsADirectoryError:
            raise DecodeError("is a directory") from None
        except PermissionError:
            raise DecodeError("permission denied") from None
        except OSError as exc:
            raise DecodeError(f"unreadable image: {' '.join(str(exc).split())[:300]}") from None


def locate(uri: str) -> Locator:
    """The locator for a ``uri`` (what ``Locator.uri`` gave): today every uri is a local path."""
    return LocalFile(uri)

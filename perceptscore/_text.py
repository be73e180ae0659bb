"""Text that leaves the program: credentials redacted, control characters escaped.

``redact`` is the one rule for every message, log line, displayed path and ``error`` cell: user info in
URLs, URL queries (a presigned URL's signature is a credential) and the values of this process's storage
options (``remember_secrets``: fsspec and its backends echo options in their exceptions). ``shown`` is
``redact`` plus escaping, for anything a person reads on a terminal or a page."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s]*@")  # up to the authority's last @
# a URL's query, up to what ends a URL in running text (space, quote, bracket)
_QUERY = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s?#'\"<>()\[\]]*)\?[^\s'\"<>()\[\]]*")
# C0/C1 controls; bidi embeddings, overrides, isolates and marks (they reorder what is shown: "gpj.exe"
# read as "exe.jpg"); zero-width characters and the BOM (two names that look the same); line and paragraph
# separators (a fake second line)
_CONTROL = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u206f\ufeff]"
)

# Storage-option values shorter than this are left alone: they are not credentials (a credential is long),
# and redacting every short value ("s3", "true") would make messages unreadable.
_MIN_SECRET = 8
# The one storage option kept readable in messages: where the store is (a message about a store that
# cannot be reached must say which). Its user info and query are credentials and go as in any URL. Any
# other value may be one (a botocore message echoes even a signature_version or region_name given).
_NOT_SECRET = frozenset({"endpoint_url"})
_secrets: re.Pattern[str] | None = None
_lock = threading.Lock()


def _leaves(value: Any, key: str = "") -> Iterator[str]:
    """The string values in nested storage options (and their space-separated parts: "Bearer TOKEN")."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            if str(k) not in _NOT_SECRET:
                yield from _leaves(v, str(k))
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _leaves(v, key)
    elif isinstance(value, str):
        yield value
        yield from value.split()


def remember_secrets(options: Any) -> None:
    """Take the values of ``options`` (the storage options this process opens URLs with) as secrets that
    ``redact`` replaces from now on; replaces what an earlier call remembered."""
    global _secrets
    found: Iterable[str] = {s for s in _leaves(options) if len(s) >= _MIN_SECRET}
    # longest first: a value that contains another is replaced whole
    ordered = sorted(found, key=len, reverse=True)
    with _lock:
        _secrets = re.compile("|".join(map(re.escape, ordered))) if ordered else None


def redact(text: str) -> str:
    """``https://user:token@host/x?X-Amz-Signature=s`` -> ``https://***@host/x?***``, and every remembered
    storage-option value -> ``***``: no credential in a message, log, page or ``error`` cell."""
    secrets = _secrets
    if secrets is not None:
        text = secrets.sub("***", text)
    return _QUERY.sub(r"\1?***", _USERINFO.sub(r"\1***@", text))


_SECRET_OPTIONS = ("--storage-options",)  # options whose value may hold credentials


def redacted_command(argv: list[str]) -> str:
    """A command line fit for a lock file or log: user info redacted, URL queries (a presigned URL's
    signature) and ``--storage-options`` values replaced by ``***``."""
    out, hide_next = [], False
    for arg in argv:
        if hide_next:
            out.append("***")
            hide_next = False
            continue
        name = arg.split("=", 1)[0]
        if name in _SECRET_OPTIONS:
            out.append(f"{name}=***" if "=" in arg else arg)
            hide_next = "=" not in arg
            continue
        text = redact(arg)
        if "://" in text and "?" in text:
            text = text.split("?", 1)[0] + "?***"
        out.append(text)
    return " ".join(out)


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def shown(text: str) -> str:
    """A path or message as a person may see it on a terminal or a page: redacted (``redact``), and control
    characters (ESC sequences that would recolour or rewrite the screen, newlines that would fake a second
    line), bidi controls and zero-width characters escaped visibly as ``\\xNN`` / ``\\uNNNN``."""
    return _CONTROL.sub(_escaped, redact(text))

"""Text that leaves the program: credentials redacted, control characters escaped."""

from __future__ import annotations

import re

_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s]*@")  # up to the authority's last @
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def redact(text: str) -> str:
    """``https://user:token@host/x`` -> ``https://***@host/x``: no credential in a message, log or file."""
    return _USERINFO.sub(r"\1***@", text)


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


def shown(text: str) -> str:
    """A path or message as a person may see it on a terminal: control characters (ESC sequences that
    would recolour or rewrite the screen, newlines that would fake a second line) escaped as ``\\xNN``."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)

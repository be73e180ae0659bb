"""Text that leaves the program: credentials redacted, control characters escaped."""

from __future__ import annotations

import re

_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s]*@")  # up to the authority's last @
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def redact(text: str) -> str:
    """``https://user:token@host/x`` -> ``https://***@host/x``: no credential in a message, log or file."""
    return _USERINFO.sub(r"\1***@", text)


def shown(text: str) -> str:
    """A path or message as a person may see it on a terminal: control characters (ESC sequences that
    would recolour or rewrite the screen, newlines that would fake a second line) escaped as ``\\xNN``."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)

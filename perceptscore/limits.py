"""Every knob that changes a run's rows or the resources it takes, in one frozen ``Limits``.

The main process reads them from its environment once (``Limits.from_env()``: the variable names and
defaults of the ``PERCEPTSCORE_*`` knobs, so existing settings keep working); the ``ScoringPlan`` carries
them (its JSON too), so a ``--processes`` child, a decode worker or a Ray task applies the run's limits,
whatever its own environment says; provenance records them; ``ScoringPlan.fingerprint()`` holds the ones
that change rows (``Limits.fingerprint``).

Code deep in a call chain (a fetch's size limit, a file system's timeouts) reads the limits this process
has installed (``current()``). A process installs them once, as it starts: the main process when it has
read its options (``ScoreOptions.install``), a worker from the plan it was given (``install``). The same
object holds this process's storage options (``--storage-options``), which never travel in a plan, a
file or a log (they may hold credentials): a child receives them on a pipe, a Ray task in memory. This
installed object is the only process-wide setting.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from perceptscore.errors import UsageError

if TYPE_CHECKING:
    from perceptscore.remote import Settings

PREFIX = "PERCEPTSCORE_"


@dataclass(frozen=True)
class Limits:
    """A run's limits; each field is read from its ``PERCEPTSCORE_*`` variable (``variable(name)``).

    In the fingerprint (``fingerprint()``: a ``--resume`` with another value is refused as a changed run):
    ``max_file_bytes`` (a remote object or tar member over it is an error row) and ``decode_timeout`` (a
    decode past it is an error row). Not in it: ``max_input_bytes`` (a manifest, list or dataset over it
    stops the run with a usage error before any row is scored: no row can differ); the remote timeouts,
    tries, deadline and minimum rate (they decide how long a failing network is waited for, not what a
    file scores: a resume with longer ones after an outage is what a user should be able to do, and
    ``--retry-errors`` scores such rows again); the rest only change speed, memory or where work files go.
    """

    max_file_bytes: int = 512 << 20  # the largest remote object or tar member taken as an image
    max_input_bytes: int = 2 << 30  # the largest remote manifest, list, scores file or dataset downloaded
    decode_timeout: float = 60.0  # seconds a decode may take (0: no limit)
    remote_timeout: float = 30.0  # seconds a request may take (connect, or between bytes read)
    remote_tries: int = 4  # tries that time out which the default deadline leaves room for
    remote_deadline: float | None = None  # seconds one object may take, all tries; None: derived
    remote_min_rate: float = float(16 << 10)  # bytes/s a stream must keep up over remote_timeout
    remote_concurrency: int = 32  # remote objects fetched at once
    prefetch_bytes: int = 256 << 20  # bytes fetched ahead and not yet decoded
    shard_rows: int = 4096  # rows after which a run's shard is written
    shard_seconds: float = 60.0  # seconds after which a run's shard is written
    remote_lock_stale: float = 600.0  # seconds a remote output's lock may go unrenewed
    work: str = ""  # the local work folder of remote outputs; "": ~/.cache/perceptscore/outputs
    ray_window_rows: int = 1_000_000
    ray_window_bytes: int = 1 << 30
    ray_lost_s: float = 30.0
    ray_actor_wait: int = 600
    ray_connect_timeout: float = 60.0

    @property
    def deadline_seconds(self) -> float:
        """How long one object (or one stretch of failures of a stream) may take, tries and pauses
        together: long enough to ride out a short outage (135 s by default)."""
        if self.remote_deadline is not None:
            return self.remote_deadline
        return self.remote_timeout * self.remote_tries + 15.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Limits:
        """The limits the environment sets (an unset or empty variable: the default); a malformed value is
        a ``UsageError`` naming its variable."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, (env, parse) in _KNOBS.items():
            text = environ.get(PREFIX + env, "").strip()
            if text:
                values[name] = parse(PREFIX + env, text)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, as the plan's JSON and provenance hold it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Limits:
        """``to_dict``'s inverse; a field it lacks (a plan from before the field) is its default."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def fingerprint(self) -> dict[str, Any]:
        """The limits that decide which rows are errors (see the class's docstring)."""
        return {"max_file_bytes": self.max_file_bytes, "decode_timeout": self.decode_timeout}


# ---- parsing the environment -------------------------------------------------------------------------


def _number(env: str, text: str, kind: type, least: float, what: str) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise UsageError(f"{env}={text!r} is not {what}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"{env}={text!r} is not {what}")
    if value < least:
        raise UsageError(f"{env}={text!r}: must be at least {least:g}")
    return value


def _count(least: int) -> Callable[[str, str], int]:
    return lambda env, text: _number(env, text, int, least, "a whole number")


def _seconds(least: float) -> Callable[[str, str], float]:
    return lambda env, text: _number(env, text, float, least, "a number of seconds")


def _positive_seconds(env: str, text: str) -> float:
    value = _seconds(0.0)(env, text)
    if value == 0:
        raise UsageError(f"{env}={text!r}: must be more than 0")
    return float(value)


def _rate(env: str, text: str) -> float:
    return float(_number(env, text, float, 0.0, "a number of bytes a second"))


def _folder(env: str, text: str) -> str:
    return text


# field -> (its variable, less the prefix; how its text is read)
_KNOBS: dict[str, tuple[str, Callable[[str, str], Any]]] = {
    "max_file_bytes": ("MAX_FILE_BYTES", _count(1)),
    "max_input_bytes": ("MAX_INPUT_BYTES", _count(1)),
    "decode_timeout": ("DECODE_TIMEOUT", _seconds(0.0)),  # 0: no limit
    "remote_timeout": ("REMOTE_TIMEOUT", _positive_seconds),
    "remote_tries": ("REMOTE_TRIES", _count(1)),
    "remote_deadline": ("REMOTE_DEADLINE", _positive_seconds),
    "remote_min_rate": ("REMOTE_MIN_RATE", _rate),  # 0: no minimum
    "remote_concurrency": ("REMOTE_CONCURRENCY", _count(1)),
    "prefetch_bytes": ("PREFETCH_BYTES", _count(1)),
    "shard_rows": ("SHARD_ROWS", _count(1)),
    "shard_seconds": ("SHARD_SECONDS", _positive_seconds),
    "remote_lock_stale": ("REMOTE_LOCK_STALE", _positive_seconds),
    "work": ("WORK", _folder),
    "ray_window_rows": ("RAY_WINDOW_ROWS", _count(1)),
    "ray_window_bytes": ("RAY_WINDOW_BYTES", _count(1)),
    "ray_lost_s": ("RAY_LOST_S", _positive_seconds),
    "ray_actor_wait": ("RAY_ACTOR_WAIT", _count(1)),
    "ray_connect_timeout": ("RAY_CONNECT_TIMEOUT", _positive_seconds),
}


def variable(name: str) -> str:
    """The environment variable of the field ``name``."""
    return PREFIX + _KNOBS[name][0]


# ---- this process's installed limits and storage options ---------------------------------------------


@dataclass(frozen=True)
class Installed:
    """What this process runs with. ``limits`` None: nothing installed yet (a library call outside any
    run): ``current()`` reads the environment each time."""

    limits: Limits | None = None
    storage: Settings | None = None


_installed = Installed()


def install(limits: Limits | None = None, *, storage: Settings | None = None) -> None:
    """Make ``limits`` and ``storage`` this process's (None: keep what is installed). A worker calls this
    once, as it starts, with its plan's limits: never by reading its own environment."""
    global _installed
    _installed = Installed(
        limits if limits is not None else _installed.limits,
        storage if storage is not None else _installed.storage,
    )


def restore(state: Installed) -> None:
    """Put back what ``installed()`` returned (a caller that installs for a while, a test)."""
    global _installed
    _installed = state


def installed() -> Installed:
    """The installed object itself: a new one after every ``install`` (what caches built under it key on)."""
    return _installed


def current() -> Limits:
    """This process's limits: as installed, else read from the environment now."""
    return _installed.limits if _installed.limits is not None else Limits.from_env()

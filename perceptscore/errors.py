"""Errors a user can cause and fix. Each carries a one-line message and the CLI exit code it maps to.

Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class PerceptScoreError(Exception):
    """Base class: the message is meant for the user, on one line."""

    exit_code = 2


class UsageError(PerceptScoreError):
    """Bad arguments or configuration (exit code 2)."""


class CheckpointError(PerceptScoreError):
    """A checkpoint file that is unreadable, unsafe or does not fit the model (exit code 2)."""


class WeightsNotFoundError(PerceptScoreError):
    """No weights available for a task: offline, not cached, not given (exit code 3)."""

    exit_code = 3


class DecodeError(Exception):
    """One input that cannot be scored (unreadable, not an image, ...): the message becomes its row's
    ``error`` and the run goes on. Not a ``PerceptScoreError``: it never ends a run."""


class EngineFailed(PerceptScoreError):
    """The engine lost what it ran on mid-run (a Ray cluster's head, this node's raylet): the rows it had
    returned are saved in the run's shards and the same command continues after them (exit code 4, so a
    cron wrapper tells it from 1, "finished with error rows")."""

    exit_code = 4

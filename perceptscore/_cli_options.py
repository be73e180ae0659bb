"""The options every scoring command shares (score, rank, filter, eval), declared once.

``@scoring_options`` appends them to a Typer command's signature and hands the command one
``ScoringArgs`` (parameter ``scoring``) instead of eight arguments; ``ScoringArgs.options(tasks)`` turns it
into the library's ``ScoreOptions``. A new scoring option is one entry in ``ScoringArgs`` and ``_OPTIONS``.
No torch here.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Annotated, Any

import typer


@dataclass(frozen=True)
class ScoringArgs:
    checkpoint: list[str] | None = None
    batch_size: int | None = None
    device: str = "auto"
    precision: str = "auto"
    workers: int | None = None
    path_column: str | None = None
    recursive: bool = True
    fast_decode: bool = False

    def options(self, tasks: list[str]):  # type: ignore[no-untyped-def]  # -> ScoreOptions
        from perceptscore.plan import ScoreOptions
        from perceptscore.tasks import parse_checkpoint_options

        return ScoreOptions(
            tasks, parse_checkpoint_options(self.checkpoint or [], tasks), self.device, self.precision,
            self.batch_size, self.workers, self.fast_decode, self.recursive, self.path_column,
        )  # fmt: skip


_OPTIONS: dict[str, Any] = {
    "checkpoint": Annotated[
        list[str] | None,
        typer.Option("--checkpoint", help="Weights: TASK=PATH (repeatable), or PATH when one task is asked."),
    ],
    "batch_size": Annotated[
        int | None, typer.Option(help="Images per batch.", show_default="64 on CUDA, 8 on CPU")
    ],
    "device": Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")],
    "precision": Annotated[str, typer.Option(help="auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16.")],
    "workers": Annotated[
        int | None, typer.Option(help="Decode worker processes.", show_default="by device and cores")
    ],
    "path_column": Annotated[
        str | None, typer.Option(help="Manifest column holding the paths.", show_default="path")
    ],
    "recursive": Annotated[bool, typer.Option(help="Descend into sub-folders of folder inputs.")],
    "fast_decode": Annotated[
        bool, typer.Option(help="JPEG draft decoding: 4-6x faster on large photos, scores shift slightly.")
    ],
}
assert list(_OPTIONS) == [f.name for f in fields(ScoringArgs)]


def scoring_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give a Typer command the shared scoring options; it receives them as ``scoring: ScoringArgs``."""
    signature = inspect.signature(command, eval_str=True)
    own = [p for p in signature.parameters.values() if p.name != "scoring"]
    defaults = ScoringArgs()
    shared = [
        inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, default=getattr(defaults, name), annotation=kind
        )
        for name, kind in _OPTIONS.items()
    ]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> None:
        scoring = ScoringArgs(**{name: kwargs.pop(name) for name in _OPTIONS})
        command(**kwargs, scoring=scoring)

    parameters = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + shared
    wrapper.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
    return wrapper

"""The options every scoring command shares (score, rank, filter, eval), declared once.

``@scoring_options`` appends them to a Typer command's signature and hands the command one ``ScoringArgs``
(parameter ``scoring``) instead of eight arguments; ``ScoringArgs.options(tasks)`` is the library's
``ScoreOptions``, whose fields have the same names (``checkpoint`` aside: parsed into ``checkpoints``). A
new scoring option is one entry here and one field of ``ScoreOptions``. No torch, no pyarrow here.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import typer

# name -> (Typer annotation, default)
_OPTIONS: dict[str, tuple[Any, Any]] = {
    "checkpoint": (
        Annotated[
            list[str] | None,
            typer.Option(
                "--checkpoint", help="Weights: TASK=PATH (repeatable), or PATH when one task is asked."
            ),
        ],
        None,
    ),
    "batch_size": (
        Annotated[int | None, typer.Option(help="Images per batch.", show_default="64 on CUDA, 8 on CPU")],
        None,
    ),
    "device": (Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")], "auto"),
    "precision": (
        Annotated[str, typer.Option(help="auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16.")],
        "auto",
    ),
    "workers": (
        Annotated[
            int | None, typer.Option(help="Decode worker processes.", show_default="by device and cores")
        ],
        None,
    ),
    "path_column": (
        Annotated[str | None, typer.Option(help="Manifest column holding the paths.", show_default="path")],
        None,
    ),
    "recursive": (Annotated[bool, typer.Option(help="Descend into sub-folders of folder inputs.")], True),
    "follow_links": (
        Annotated[
            bool, typer.Option(help="Follow linked folders that lead outside the folder being walked.")
        ],
        False,
    ),
    "max_pixels": (
        Annotated[
            int,
            typer.Option(help="Refuse larger images (an error row): decoding one costs ~4 bytes a pixel."),
        ],
        89_478_485,  # Pillow's own limit (images.MAX_PIXELS)
    ),
    "fast_decode": (
        Annotated[
            bool,
            typer.Option(help="JPEG draft decoding: 4-6x faster on large photos, scores shift slightly."),
        ],
        False,
    ),
    "tar_fields": (
        Annotated[
            str | None,
            typer.Option(
                help="Columns tar rows bring besides shard and key: txt, json, json.NAME (comma-separated)."
            ),
        ],
        None,
    ),
    "quiet": (
        Annotated[
            bool, typer.Option("-q", "--quiet", help="Print nothing but errors (no progress, no summary).")
        ],
        False,
    ),
    "storage_options": (
        Annotated[
            str | None,
            typer.Option(
                help="JSON options for fsspec (s3://, gs://, az://, or keyed by scheme); never written."
            ),
        ],
        None,
    ),
}


@dataclass(frozen=True)
class ScoringArgs:
    """The shared options as given on the command line."""

    values: dict[str, Any]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    def replace(self, **changes: Any) -> ScoringArgs:
        return ScoringArgs({**self.values, **changes})

    def options(self, tasks: list[str]):  # type: ignore[no-untyped-def]  # -> ScoreOptions
        from perceptscore.plan import ScoreOptions
        from perceptscore.remote import Settings
        from perceptscore.shards import parse_fields
        from perceptscore.tasks import parse_checkpoint_options

        values = dict(self.values)
        checkpoints = parse_checkpoint_options(values.pop("checkpoint") or [], tasks)
        tar_fields = parse_fields(values.pop("tar_fields"))
        storage = Settings.parse(values.pop("storage_options"))
        values.pop("quiet")  # the display's, not the run's
        return ScoreOptions(tasks=tasks, checkpoints=checkpoints, tar_fields=tar_fields, storage=storage,
                            **values)  # fmt: skip


def scoring_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give a Typer command the shared scoring options; it receives them as ``scoring: ScoringArgs``."""
    signature = inspect.signature(command, eval_str=True)
    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in signature.parameters.values()]
    own = [p for p in own if p.name != "scoring"]
    shared = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=kind)
        for name, (kind, default) in _OPTIONS.items()
    ]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> None:
        scoring = ScoringArgs({name: kwargs.pop(name) for name in _OPTIONS})
        command(**kwargs, scoring=scoring)

    wrapper.__signature__ = signature.replace(parameters=own + shared)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in own + shared}
    return wrapper

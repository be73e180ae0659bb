"""The options every scoring command shares (score, rank, filter, eval), declared once; and how every
command's help reads (``Command``: panels in one order, metavars people read, help text shown literally).

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
from rich.markup import escape
from typer.core import TyperArgument, TyperCommand, TyperGroup

# name -> (Typer annotation, default)
_OPTIONS: dict[str, tuple[Any, Any]] = {
    "checkpoint": (
        Annotated[
            list[str] | None,
            typer.Option(
                "--checkpoint",
                help="Weights: TASK=PATH (repeatable), or PATH when one task is asked.",
                metavar="[TASK=]PATH",
                rich_help_panel="Model",
            ),
        ],
        None,
    ),
    "batch_size": (
        Annotated[
            int | None,
            typer.Option(
                help="Images per batch.",
                show_default="64 on CUDA, 8 on CPU",
                metavar="N",
                rich_help_panel="Performance",
            ),
        ],
        None,
    ),
    "device": (
        Annotated[
            str, typer.Option(help="auto, cpu, cuda or cuda:N.", metavar="DEVICE", rich_help_panel="Model")
        ],
        "auto",
    ),
    "precision": (
        Annotated[
            str,
            typer.Option(
                help="auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16.",
                metavar="PRECISION",
                rich_help_panel="Model",
            ),
        ],
        "auto",
    ),
    "workers": (
        Annotated[
            int | None,
            typer.Option(
                help="Decode worker processes.",
                show_default="by device and cores",
                metavar="N",
                rich_help_panel="Performance",
            ),
        ],
        None,
    ),
    "path_column": (
        Annotated[
            str | None,
            typer.Option(
                help="Manifest column holding the paths.",
                show_default="path",
                metavar="COLUMN",
                rich_help_panel="Inputs",
            ),
        ],
        None,
    ),
    "image_column": (
        Annotated[
            str | None,
            typer.Option(
                help="Dataset column holding the image bytes (parquet/arrow files; found when there is one).",
                show_default="the one image column",
                metavar="COLUMN",
                rich_help_panel="Inputs",
            ),
        ],
        None,
    ),
    "recursive": (
        Annotated[
            bool, typer.Option(help="Descend into sub-folders of folder inputs.", rich_help_panel="Inputs")
        ],
        True,
    ),
    "follow_links": (
        Annotated[
            bool,
            typer.Option(
                help="Follow linked folders that lead outside the folder being walked.",
                rich_help_panel="Inputs",
            ),
        ],
        False,
    ),
    "max_pixels": (
        Annotated[
            int,
            typer.Option(
                help="Refuse larger images (an error row): decoding one costs ~4 bytes a pixel.",
                metavar="N",
                rich_help_panel="Inputs",
            ),
        ],
        89_478_485,  # Pillow's own limit (images.MAX_PIXELS)
    ),
    "fast_decode": (
        Annotated[
            bool,
            typer.Option(
                help="JPEG draft decoding: 4-6x faster on large photos, scores shift slightly.",
                rich_help_panel="Performance",
            ),
        ],
        False,
    ),
    "decode": (
        Annotated[
            str,
            typer.Option(
                help="cpu: workers decode with Pillow. gpu: workers only read, the model's device decodes "
                "each batch's JPEGs (nvJPEG; with --device cpu, libjpeg-turbo in the scoring process).",
                metavar="DECODER",
                rich_help_panel="Performance",
            ),
        ],
        "cpu",
    ),
    "tar_fields": (
        Annotated[
            str | None,
            typer.Option(
                help="Columns tar rows bring besides shard and key: txt, json, json.NAME (comma-separated).",
                metavar="FIELDS",
                rich_help_panel="Inputs",
            ),
        ],
        None,
    ),
    "quiet": (
        Annotated[
            bool,
            typer.Option(
                "-q",
                "--quiet",
                help="Print nothing but errors (no progress, no summary).",
                rich_help_panel="Output",
            ),
        ],
        False,
    ),
    "storage_options": (
        Annotated[
            str | None,
            typer.Option(
                help="JSON options for fsspec (s3://, gs://, az://, or keyed by scheme); never written.",
                metavar="JSON",
                rich_help_panel="Remote",
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

    ordered = _in_panel_order(own + shared)
    wrapper.__signature__ = signature.replace(parameters=ordered)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in ordered}
    return wrapper


# The panels of a command's help, in the order a person needs them; options of no panel go last.
PANELS = ("Inputs", "Thresholds", "Output", "Model", "Performance", "Remote", "Ray")


def _panel(parameter: inspect.Parameter) -> str | None:
    info = next(
        (m for m in getattr(parameter.annotation, "__metadata__", ()) if hasattr(m, "rich_help_panel")), None
    )
    return info.rich_help_panel if info is not None else None


def _in_panel_order(parameters: list[inspect.Parameter]) -> list[inspect.Parameter]:
    """Help lists panels in the order their first option comes: sort by panel (stable within one)."""

    def rank(p: inspect.Parameter) -> int:
        panel = _panel(p)
        return PANELS.index(panel) if panel in PANELS else len(PANELS)

    arguments = [p for p in parameters if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    return arguments + sorted((p for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY), key=rank)


class Command(TyperCommand):
    """Every command's help: a flag shows no type (Typer's ``<bool>``), a value shows its metavar (``FILE``,
    ``N``; by default the option's name in capitals, never ``<list[str]>``), and help text is shown as
    written: ``[ray]`` and ``photo[1].jpg`` are not Rich markup."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _readable(super().get_params(ctx))


class Group(TyperGroup):
    """The same for a group's own options (``perceptscore -h``: ``--version``, completion)."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _readable(super().get_params(ctx))


def _readable(params: list[Any]) -> list[Any]:
    for param in params:
        if not getattr(param, "_readable", False):
            _make_readable(param)
    return params


def _make_readable(param: Any) -> None:
    flag = bool(getattr(param, "is_flag", False))
    # an argument's name is its metavar already ("INPUTS"): no second column saying it again
    shown = (
        None if flag or isinstance(param, TyperArgument) else (param.metavar or (param.name or "").upper())
    )
    if param.name == "help":
        param.rich_help_panel = "Help"  # type: ignore[attr-defined]  # last, not a panel of its own first
    if flag and param.default is False and param.name != "help":
        param.show_default = False  # type: ignore[union-attr]  # "[default: no-overwrite]" says nothing
    param.display_type_rich = lambda ctx: shown  # type: ignore[method-assign, union-attr]
    help_text = getattr(param, "help", None)
    if help_text:
        param.help = escape(help_text)  # type: ignore[union-attr]
    param._readable = True  # type: ignore[attr-defined]

"""What a run is, resolved: ``ScoreOptions`` is what the user asked for ("auto" allowed); a ``ScoringPlan``
is what will run (weights with their sha256, device and precision as resolved, decode settings, batch
size, inputs, output). A plan is frozen and JSON-serialisable: ``--processes`` children receive it as
JSON, and its ``fingerprint()`` is what ``--resume`` compares. Both carry the run's ``Limits``, read from
the environment once, when the options are made.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import pyarrow as pa

from perceptscore import limits, remote
from perceptscore.columns import output_columns, output_schema
from perceptscore.errors import UsageError
from perceptscore.hub import Weights, file_sha256, resolve
from perceptscore.images import MAX_PIXELS
from perceptscore.limits import Limits
from perceptscore.safety import listings
from perceptscore.sources import Sources
from perceptscore.tasks import Task, get_task


@dataclass(frozen=True)
class ScoreOptions:
    """How to score, as asked (the options score, rank, filter and eval share)."""

    tasks: Sequence[str]
    checkpoints: Mapping[str, str] = field(default_factory=dict)
    device: str = "auto"
    precision: str = "auto"
    batch_size: int | None = None
    workers: int | None = None
    fast_decode: bool = False
    decode: str = "cpu"  # cpu: the decode workers decode; gpu: they read, the model's device decodes JPEGs
    recursive: bool = True
    path_column: str | None = None
    follow_links: bool = False
    max_pixels: int = MAX_PIXELS
    tar_fields: tuple[str, ...] = ()  # what tar rows bring besides shard and key (shards.parse_fields)
    image_column: str | None = None  # a dataset's column of image bytes (tables.choose_column)
    storage: remote.Settings = field(default_factory=remote.Settings)  # never in a plan, a file or a log
    limits: Limits = field(default_factory=Limits.from_env)  # the environment's, read once, here

    def install(self) -> None:
        """Make these options' limits and storage options this process's (before any URL is looked at)."""
        remote.configure(self.storage)  # remembers the option values, to redact them from messages
        limits.install(self.limits)

    def task_specs(self) -> list[Task]:
        return [get_task(t) for t in self.tasks]

    def sources(
        self,
        inputs: Sequence[str],
        stdin: TextIO | None = None,
        skip_folders: Sequence[str] = (),
        retry_errors: bool = False,
    ) -> Sources:
        reserved = output_columns(self.task_specs())
        self.install()  # before any URL is looked at
        return Sources(inputs, self.recursive, self.path_column, reserved, stdin, self.follow_links,
                       skip_folders, self.tar_fields, retry_errors, self.image_column)  # fmt: skip

    def weights(self) -> dict[str, Weights]:
        """Each task's weights file, found or downloaded, without loading anything (no torch)."""
        given = {get_task(k).name: v for k, v in self.checkpoints.items()}
        return {t.name: resolve(t, given.get(t.name)) for t in self.task_specs()}


@dataclass(frozen=True)
class TaskWeights:
    task: str
    path: str
    sha256: str
    origin: str


@dataclass(frozen=True)
class ScoringPlan:
    tasks: tuple[str, ...]
    weights: tuple[TaskWeights, ...]
    device: str  # as resolved: "cpu", "cuda", "cuda:1"
    precision: str  # as resolved: fp32, fp16 or bf16
    batch_size: int
    workers: int
    fast_decode: bool = False
    inputs: tuple[str, ...] = ()
    recursive: bool = True
    path_column: str | None = None
    output: str = "-"
    incremental: str | None = None
    cpu_threads: int = 0  # torch's intra-op threads; 0: torch's default
    cwd: str = ""  # where relative inputs are read from
    follow_links: bool = False
    max_pixels: int = MAX_PIXELS
    input_files: tuple[tuple[str, int, int], ...] = ()  # the named files' (absolute path, size, mtime_ns)
    tar_fields: tuple[str, ...] = ()
    retry_errors: str | None = None
    image_column: str | None = None
    decode: str = "cpu"  # DECODERS: where JPEGs are decoded (``batches.DeviceDecode`` for "gpu")
    limits: Limits = field(default_factory=Limits.from_env)  # every process of the run applies these

    def task_specs(self) -> list[Task]:
        return [get_task(t) for t in self.tasks]

    def schema(self, passthrough: pa.Schema | None = None) -> pa.Schema:
        return output_schema(self.task_specs(), passthrough)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ScoringPlan:
        data = json.loads(text)
        data["weights"] = tuple(TaskWeights(**w) for w in data["weights"])
        data["tasks"], data["inputs"] = tuple(data["tasks"]), tuple(data["inputs"])
        data["input_files"] = tuple(tuple(f) for f in data["input_files"])
        data["tar_fields"] = tuple(data.get("tar_fields", ()))
        data["limits"] = Limits.from_dict(data.get("limits", {}))
        return cls(**data)

    def fingerprint(self) -> dict[str, Any]:
        """What must not change between a run and its ``--resume``: what is scored, with which weights,
        and how (precision and device type: fp16 rows on a GPU must not be mixed with fp32 rows on a CPU;
        the limits that decide which rows are errors, ``Limits.fingerprint``)."""
        return {
            "tasks": list(self.tasks),
            "weights": {w.task: w.sha256 for w in self.weights},
            "device_type": self.device.split(":")[0],
            "precision": self.precision,
            "fast_decode": self.fast_decode,
            "decode": self.decode,  # nvJPEG's pixels and the bytes-seeded crops are not the workers'
            "inputs": [_absolute(i, self.cwd) for i in self.inputs],
            "input_files": [list(f) for f in self.input_files],  # a manifest or list edited in place
            "recursive": self.recursive,
            "follow_links": self.follow_links,
            "max_pixels": self.max_pixels,
            "path_column": self.path_column,
            "incremental": remote.without_secrets(self.incremental) if self.incremental else None,
            "tar_fields": list(self.tar_fields),
            "retry_errors": remote.without_secrets(self.retry_errors) if self.retry_errors else None,
            "image_column": self.image_column,  # another column is other images
            **self.limits.fingerprint(),
        }

    def on_device(self, device: str, cpu_threads: int = 0) -> ScoringPlan:
        return replace(self, device=device, cpu_threads=cpu_threads)


def make_plan(
    options: ScoreOptions,
    inputs: Sequence[str] = (),
    output: str = "-",
    incremental: str | None = None,
    weights: Mapping[str, Weights] | None = None,
    device_elsewhere: str | None = None,
    retry_errors: str | None = None,
) -> ScoringPlan:
    """Resolve ``options`` (imports torch to see the devices): every "auto" and default becomes a value.
    ``device_elsewhere``: the device as an engine that scores on other machines resolved it (a Ray
    cluster's GPUs), not checked against this machine's."""
    import torch

    from perceptscore.checkpoints import resolve_device, resolve_precision

    tasks = list(dict.fromkeys(t.name for t in options.task_specs()))
    if not tasks:
        raise UsageError("no task given")
    weights = weights if weights is not None else options.weights()
    device = torch.device(device_elsewhere) if device_elsewhere else resolve_device(options.device)
    batch_size = options.batch_size or (64 if device.type == "cuda" else 8)
    workers = default_workers(device.type) if options.workers is None else options.workers
    if batch_size < 1 or workers < 0 or options.max_pixels < 1:
        raise UsageError("--batch-size and --max-pixels must be at least 1, --workers at least 0")
    _check_decode(options, device_elsewhere)
    return ScoringPlan(
        tasks=tuple(tasks),
        weights=tuple(
            TaskWeights(t, str(weights[t].path), file_sha256(weights[t].path), weights[t].origin)
            for t in tasks
        ),
        device=str(device),
        precision=resolve_precision(options.precision, device),
        batch_size=batch_size,
        workers=workers,
        fast_decode=options.fast_decode,
        inputs=tuple(inputs),
        recursive=options.recursive,
        path_column=options.path_column,
        output=output,
        incremental=incremental,
        cwd=os.getcwd(),
        follow_links=options.follow_links,
        max_pixels=options.max_pixels,
        input_files=_stats(sorted(listings(inputs))),
        tar_fields=tuple(options.tar_fields),
        retry_errors=retry_errors,
        image_column=options.image_column,
        decode=options.decode,
        limits=options.limits,
    )


DECODERS = ("cpu", "gpu")


def _check_decode(options: ScoreOptions, device_elsewhere: str | None) -> None:
    """``--decode``: a known value, and a combination that can run."""
    if options.decode not in DECODERS:
        raise UsageError(f"--decode {options.decode}: use cpu or gpu")
    if options.decode != "gpu":
        return
    if options.fast_decode:  # draft decoding is Pillow's; the device decodes every JPEG in full
        raise UsageError("--fast-decode is for --decode cpu (the device decodes JPEGs in full)")
    if device_elsewhere is not None:  # a Ray cluster's actors score: their decode tasks decode
        raise UsageError("--decode gpu runs on the local engine; --engine ray decodes on its CPU workers")


def _absolute(text: str, cwd: str) -> str:
    """An input as the run's record keeps it: local paths made absolute, URLs without credentials."""
    if text == "-":
        return text
    if remote.is_remote(text.removeprefix("@")):
        return remote.without_secrets(text)
    if text.startswith("@"):
        return "@" + os.path.join(cwd, text[1:])
    return os.path.join(cwd, text)


def _stats(paths: Iterable[str]) -> tuple[tuple[str, int, int], ...]:
    stats = []
    for path in paths:
        st = os.stat(path)
        stats.append((os.path.abspath(path), st.st_size, st.st_mtime_ns))
    return tuple(stats)


def default_workers(device_type: str) -> int:
    cores = os.cpu_count() or 1
    if device_type == "cuda":
        return min(16, max(2, cores - 2))
    # On CPU the model needs the cores and decoding is cheap, but one worker still keeps a crashing
    # decoder out of the main process (and overlaps decoding with the model).
    return 1 if cores <= 8 else min(4, cores // 4)


def weight_files(plan: ScoringPlan) -> set[str]:
    """Every file the models load: each task's, and the shared base a converted file names (once)."""
    files = set()
    for weights in plan.weights:
        files.add(weights.path)
        base = base_of(weights.path)
        if base:
            files.add(base)
    return files


def model_bytes(plan: ScoringPlan) -> int:
    """What the models take in memory, about: each task's file, plus the shared base it loads (each
    task's model holds its own copy of the tower, its LoRA merged in)."""
    total = 0
    for weights in plan.weights:
        base = base_of(weights.path)
        total += file_size(weights.path) + (file_size(base) if base else 0)
    return total


def base_of(path: str) -> str | None:
    """The shared base file a split converted checkpoint names, beside it; None for any other file."""
    if not path.endswith(".safetensors"):
        return None
    from safetensors import safe_open  # its header only: no torch

    try:
        with safe_open(path, framework="numpy") as f:
            base = (f.metadata() or {}).get("base")
    except Exception:  # a damaged file: the model load that follows says so
        return None
    return str(Path(path).with_name(base)) if base else None


def file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0

"""The Ray Data engine: the same plan, decoded by Ray tasks on CPU workers and scored by a pool of model
actors, across a cluster (``score --engine ray``).

The driver (this process) turns the items into read tasks (``_Inputs``, a Ray Data datasource): a page of
plain items is a plan table (``row_index``, ``path``, ``error``) of one batch; a container (a tar shard, a
dataset's row group: ``containers``) is read on a worker, so the driver never holds its images' bytes,
and its rows come back with the container's row index and their own passthrough values. ``decode_block``
runs as a task: each file through the worker's
``IsolatedDecoder`` (a file that crashes or hangs its decoder is one error row; Ray never sees a failed
task, so it never retries one forever). ``PredictStage`` is an actor that loads the weights on its own node
in its constructor (never shipped from the driver), one GPU each on a GPU cluster, else one per node on
its CPUs. Rows come back in order (``preserve_order``), and every row index is checked against the plan
table, so each input row is there exactly once. Manifest columns, ``--incremental`` and shards stay on the
driver, in ``scoring`` and ``runs``, as for every engine.

The items are taken ``window_rows`` at a time (one Ray Data run each), so the driver holds a bounded part
of a huge input; each window starts its actor pool afresh (a few seconds of weight loading per million
items: files, or whole shards). Only bytes the driver already holds (``--retry-errors``' tar members) also
close a window, at ``PERCEPTSCORE_RAY_WINDOW_BYTES``.

A cluster lost mid-run (its head's GCS, or the raylet this driver is attached to, killed) ends the run
with ``EngineFailed`` once it has not answered for ``PERCEPTSCORE_RAY_LOST_S`` seconds, the rows Ray had
returned handed on first: left to itself, Ray waits 60 s for a dead GCS and then ends the whole process
from C++ (exit code 1, no message, no shard saved).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy, DataContext, Datasource, ReadTask
from ray.data.block import BlockMetadata

from perceptscore import remote
from perceptscore._version import __version__
from perceptscore.columns import ERROR, FILE_MTIME, FILE_SIZE, PATH, core_schema
from perceptscore.containers import Container, is_container
from perceptscore.errors import EngineFailed, PerceptScoreError, UsageError
from perceptscore.images import draft_side
from perceptscore.isolated_decode import Decoded, IsolatedDecoder, settings_for
from perceptscore.items import EXTRAS, ITEM, WIRE_SCHEMA, Item, from_wire_batch, to_wire_batch
from perceptscore.limits import Limits, install
from perceptscore.limits import current as current_limits
from perceptscore.locators import InMemory, Unavailable
from perceptscore.plan import ScoringPlan, model_bytes
from perceptscore.prefetch import prefetched
from perceptscore.tasks import Preprocess

ROW_INDEX = WIRE_SCHEMA.names[0]  # the plan table is the wire schema (``items``)
# where a row is in its item (0 for a plain item's one row), and whether it is the item's last: the driver
# checks every container's rows come whole, in order (``_Order``). With EXTRAS, the columns that ride
# through the stages untouched.
PART, LAST = "_part", "_last"
RIDING = (EXTRAS, PART, LAST)


def pixels_column(number: int) -> str:
    return f"pixels_{number}"


# ---- the stages (run on the cluster's workers) -------------------------------------------------------

_decoders: dict[str, IsolatedDecoder] = {}  # per worker process: one child decoder per settings


def decoder_settings(
    specs: list[Preprocess], fast_decode: bool, max_pixels: int, limits: Limits | None = None
) -> dict[str, Any]:
    """The isolated decoders' settings for a run, as JSON-able data shipped to the decode tasks: the run's
    limits (read on the driver), whatever the workers' environment."""
    chosen = limits if limits is not None else current_limits()
    draft = draft_side(specs) if fast_decode else None
    return settings_for(specs, draft, max_pixels, chosen.decode_timeout, chosen)


def _install(storage: dict[str, Any], limits: dict[str, Any]) -> None:
    """The run's storage options and limits in this worker, before it reads anything."""
    run = Limits.from_dict(limits)
    if storage != remote.current().options or run != current_limits():
        install(run, storage=remote.Settings(storage))


def _decoder(settings: dict[str, Any]) -> IsolatedDecoder:
    key = json.dumps(settings, sort_keys=True)
    if key not in _decoders:
        _decoders[key] = IsolatedDecoder.from_settings(settings)
    return _decoders[key]


def decode_block(
    table: pa.Table,
    settings: dict[str, Any],
    storage: dict[str, Any] | None = None,
    limits: dict[str, Any] | None = None,
) -> pa.Table:
    """A block of the plan table -> its rows with the crops of each preprocessing (raw uint8 bytes; null
    for a row with an error). Remote objects are fetched here, many at once, then decoded in the isolated
    decoder (which never waits on the network under its time limit). Never raises for a file."""
    _install(storage or {}, limits if limits is not None else current_limits().to_dict())
    decoder = _decoder(settings)
    errors, sizes, mtimes = [], [], []
    pixels: list[list[bytes | None]] = [[] for _ in settings["specs"]]
    for item in prefetched(from_wire_batch(table), current_limits()):
        decoded = _decoded(decoder, item)
        errors.append(decoded.error)
        sizes.append(decoded.stat[0] if decoded.stat else None)
        mtimes.append(decoded.stat[1] if decoded.stat else None)
        for column, array in zip(pixels, decoded.pixels or [None] * len(pixels), strict=True):
            column.append(array.tobytes() if array is not None else None)
    columns = {
        ROW_INDEX: table[ROW_INDEX],
        PATH: table[PATH],
        ERROR: pa.array(errors, pa.string()),
        FILE_SIZE: pa.array(sizes, pa.int64()),
        FILE_MTIME: pa.array(mtimes, pa.int64()),
    }
    columns |= {pixels_column(i): pa.array(p, pa.binary()) for i, p in enumerate(pixels)}
    columns |= {name: table[name] for name in RIDING if name in table.column_names}  # on to the driver
    return pa.table(columns)


def _decoded(decoder: IsolatedDecoder, item: Item) -> Decoded:
    if item.error is not None:
        return Decoded(item.error, None, [])
    if isinstance(item.locator, Unavailable):
        return Decoded(item.locator.reason, None, [])
    if isinstance(item.locator, InMemory):
        return decoder.decode(item.path, item.locator.data, item.locator.known)
    return decoder.decode(item.path)


class PredictStage:
    """A model actor: every task's model on this node's device, loaded here from this node's weights."""

    def __init__(self, plan_json: str, version: str) -> None:
        if version != __version__:
            raise UsageError(
                f"perceptscore {__version__} on this Ray node, {version} on the driver: install the same "
                "version on every node"
            )
        from perceptscore.predict import Predictor

        plan = weights_here(ScoringPlan.from_json(plan_json))
        if plan.device == "cpu":  # Ray sets OMP_NUM_THREADS=1 in its workers; the model needs the cores
            plan = plan.on_device("cpu", len(os.sched_getaffinity(0)))
        self.predictor = Predictor.from_plan(plan)
        self.specs = self.predictor.specs

    def __call__(self, table: pa.Table) -> pa.Table:
        import torch

        errors = table[ERROR].to_pylist()
        pixels = {}
        for number, spec in enumerate(self.specs):
            chunks = [b for b in table[pixels_column(number)].to_pylist() if b is not None]
            size = spec.crops * 3 * spec.crop * spec.crop
            if any(len(b) != size for b in chunks):  # the stages disagree on the preprocessings' order
                raise RuntimeError(f"decoded crops of the wrong size for {spec.describe()}")
            flat = np.frombuffer(b"".join(chunks), np.uint8).copy()  # writable, for torch
            pixels[spec] = torch.from_numpy(flat.reshape(-1, 3, spec.crop, spec.crop))
        stats = [
            (s, m) if s is not None else None
            for s, m in zip(table[FILE_SIZE].to_pylist(), table[FILE_MTIME].to_pylist(), strict=True)
        ]
        rows = self.predictor.rows(table[PATH].to_pylist(), errors, stats, pixels)
        out = pa.Table.from_batches([rows]).add_column(0, ROW_INDEX, table[ROW_INDEX])
        for name in RIDING:
            if name in table.column_names:
                out = out.append_column(name, table[name])
        return out


def weights_here(plan: ScoringPlan) -> ScoringPlan:
    """The plan with each task's weights as found on this node: the driver's path when this node has the
    same file (shared storage, or the same cache), else this node's own copy (its caches, or a download);
    either way it must be the file the driver planned with (its sha256)."""
    from dataclasses import replace

    from perceptscore.hub import file_sha256, resolve
    from perceptscore.plan import TaskWeights
    from perceptscore.tasks import get_task

    found = []
    for w in plan.weights:
        path = w.path
        if not os.path.isfile(path):
            try:
                path = str(resolve(get_task(w.task), None).path)
            except PerceptScoreError as exc:
                raise type(exc)(
                    f"node {os.uname().nodename}: no weights for {w.task} ({exc}); run `perceptscore weights "
                    "fetch` on every node, or share HF_HOME / PERCEPTSCORE_CACHE between them"
                ) from None
        if file_sha256(path) != w.sha256:
            raise UsageError(
                f"node {os.uname().nodename}: {path} is not the {w.task} weights the driver planned with "
                f"(sha256 {w.sha256[:12]}...): give every node the same file"
            )
        found.append(TaskWeights(w.task, path, w.sha256, w.origin))
    return replace(plan, weights=tuple(found))


# ---- the read tasks (run on the workers) ------------------------------------------------------------


def plan_table(items: list[Item], extras: pa.DataType) -> pa.Table:
    """Plain items as plan rows: what a decode task needs (bytes only where the driver held them)."""
    table = pa.Table.from_batches([to_wire_batch(items)])
    table = table.append_column(EXTRAS, pa.nulls(len(items), extras))
    table = table.append_column(PART, pa.array([0] * len(items), pa.int64()))
    return table.append_column(LAST, pa.array([True] * len(items), pa.bool_()))


def read_page(table: pa.Table) -> Iterator[pa.Table]:
    yield table


def read_container(
    index: int,
    container: Container,
    rows: int,
    extras: pa.DataType,
    storage: dict[str, Any],
    limits: dict[str, Any],
) -> Iterator[pa.Table]:
    """A container's rows, read here, as plan rows of ``rows`` each, with the bytes and their values; its
    last row says so."""
    _install(storage, limits)
    held: list[tuple[Item, dict[str, Any]]] = []
    for part, (locator, values) in enumerate(container.rows()):
        if len(held) >= rows:  # a row more has come: the held ones are not the last
            yield _container_block(held, extras, last=False)
            held = []
        reason = locator.reason if isinstance(locator, Unavailable) else None
        held.append((Item(index, locator, {}, reason, part), values))
    if held:
        yield _container_block(held, extras, last=True)


def _container_block(held: list[tuple[Item, dict[str, Any]]], extras: pa.DataType, last: bool) -> pa.Table:
    table = pa.Table.from_batches([to_wire_batch([item for item, _ in held])])
    table = table.append_column(EXTRAS, pa.array([values for _, values in held], extras))
    table = table.append_column(PART, pa.array([item.part for item, _ in held], pa.int64()))
    lasts = [False] * (len(held) - 1) + [last]
    return table.append_column(LAST, pa.array(lasts, pa.bool_()))


class _Inputs(Datasource):
    """A window's items as Ray Data read tasks, in input order: pages of plain items, and each container
    on its own (read where it runs)."""

    def __init__(self, reads: list[Any]) -> None:
        super().__init__()
        self.reads = reads

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, **_: Any
    ) -> list[ReadTask]:
        meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None)
        return [ReadTask(read, meta) for read in self.reads]  # one each: merging them would reorder nothing


def _read(function: Any, *args: Any) -> Any:
    """A read task's function: ``function`` of ``args``, named as it (Ray Data names its stages by it)."""

    def read() -> Iterator[pa.Table]:
        return function(*args)  # type: ignore[no-any-return]

    read.__name__ = read.__qualname__ = function.__name__
    return read


def reads_of(
    window: list[Item], batch_size: int, storage: dict[str, Any], limits: dict[str, Any]
) -> list[Any]:
    """The read functions of a window's items, in order."""
    containers = [i.locator for i in window if is_container(i.locator)]
    extras = pa.struct(list(containers[0].schema)) if containers else pa.struct([])
    reads: list[Any] = []
    page: list[Item] = []
    for item in window:
        if not is_container(item.locator):
            page.append(item)
            if len(page) >= batch_size:
                reads.append(_read(read_page, plan_table(page, extras)))
                page = []
            continue
        if page:
            reads.append(_read(read_page, plan_table(page, extras)))
            page = []
        reads.append(_read(read_container, item.index, item.locator, batch_size, extras, storage, limits))
    if page:
        reads.append(_read(read_page, plan_table(page, extras)))
    return reads


# ---- the driver --------------------------------------------------------------------------------------


class RayEngine:
    """``address``: a running cluster (``ray://`` or ``host:port``); None: ``$RAY_ADDRESS``, else a local
    Ray started for the run (and stopped after it). A Ray already initialised in this process (a user's
    program) is used as it is."""

    name = "ray"
    reads_containers = True  # tar shards and dataset row groups are read by the workers (``containers``)

    def __init__(self, address: str | None = None, window_rows: int | None = None) -> None:
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.window_rows = window_rows  # None: the run's limits say
        self._started = False

    def connect(self) -> None:
        if ray.is_initialized():
            return
        if self.address:
            _check_reachable(self.address)  # ray.init retries a dead address for ever
        # ray.init replaces the SIGTERM handler with one that exits at once; the command's own (stop after
        # the current batch, save it, exit 143) is put back.
        sigterm = signal.getsignal(signal.SIGTERM)
        options = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
        try:
            if self.address:
                # Ray's C++ client logs each refusal of a missing token on standard error: the one
                # line that says what to do replaces them
                with _stderr_without(b"InvalidAuthToken"):
                    _init_within(current_limits().ray_connect_timeout, address=self.address, **options)
            else:
                # "local": a new Ray, never the last `ray start` cluster Ray would otherwise look for
                # (after that cluster died, ray.init would wait on its address for ever)
                ray.init(address="local", **options)
        except ray.exceptions.AuthenticationError:
            raise UsageError(_token_wanted(self.address or "a local Ray")) from None
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = self.address or "a local Ray"
            raise UsageError(f"cannot connect to Ray at {where}: {_first_line(exc)}") from None
        finally:
            with contextlib.suppress(ValueError, TypeError):  # not the main thread; a handler set in C
                signal.signal(signal.SIGTERM, sigterm)
        self._started = True

    def close(self) -> None:
        if self._started:
            ray.shutdown()
            self._started = False

    def __enter__(self) -> RayEngine:
        """For the length of a command: connected on entry; a Ray this started is stopped on exit."""
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def cluster(self) -> dict[str, int]:
        self.connect()
        total = ray.cluster_resources()
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        return {"nodes": len(nodes), "cpus": int(total.get("CPU", 0)), "gpus": int(total.get("GPU", 0))}

    def device(self, asked: str) -> str:
        """The device the actors use, as the cluster allows: "auto" is CUDA where the cluster has GPUs
        (whether or not the driver has one)."""
        gpus = self.cluster()["gpus"]
        if asked == "auto":
            return "cuda" if gpus else "cpu"
        if asked.startswith("cuda") and not gpus:
            raise UsageError(f"--device {asked}: the Ray cluster has no GPU")
        if asked.startswith("cuda:"):
            raise UsageError("--engine ray gives each model actor one GPU: use --device cuda, not cuda:N")
        return asked

    def describe(self, plan: ScoringPlan) -> str:
        c = self.cluster()
        return f"ray ({c['nodes']} nodes, {c['cpus']} CPUs, {c['gpus']} GPUs); models on {plan.device}"

    def run(self, plan: ScoringPlan, items: Iterable[Item]) -> Iterator[pa.RecordBatch]:
        if plan.decode != "cpu":  # (make_plan refuses it first for a cluster's plan: this, for any plan)
            raise UsageError("--decode gpu runs on the local engine; --engine ray decodes on its CPU workers")
        self.connect()
        watch = _ClusterWatch.of_this_driver(self.address or "the local Ray", plan.limits.ray_lost_s)
        try:
            yield from _watched(self._run(plan, items), watch)
        finally:
            if watch is not None:
                watch.stop()

    def _run(self, plan: ScoringPlan, items: Iterable[Item]) -> Iterator[pa.RecordBatch]:
        context = DataContext.get_current()
        saved = (
            context.execution_options.preserve_order, context.enable_progress_bars,
            context.wait_for_min_actors_s,
        )  # fmt: skip
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False  # the command shows its own progress
        # Ray Data waits for ever by default for actors the cluster cannot place (no free GPU, not enough
        # memory for the models): a stalled cron job that says nothing. This ends it, naming why.
        context.wait_for_min_actors_s = plan.limits.ray_actor_wait
        quiet = logging.getLogger("ray.data")
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)  # Ray Data logs a failed run's whole traceback
        try:
            rows = self.window_rows or plan.limits.ray_window_rows
            for window in _windows(iter(items), rows, plan.limits.ray_window_bytes):
                yield from self._window(plan, window)
        except ray.exceptions.GetTimeoutError:
            needs = "one GPU" if plan.device.startswith("cuda") else "one CPU"
            raise UsageError(
                f"no model actor could start within {plan.limits.ray_actor_wait} s: the Ray cluster has no "
                f"node with {needs} and the models' memory free (PERCEPTSCORE_RAY_ACTOR_WAIT sets the wait)"
            ) from None
        except ray.exceptions.LocalRayletDiedError as exc:  # Ray noticed before the watch did
            where = self.address or "the local Ray"
            raise EngineFailed(f"the Ray cluster at {where} was lost mid-run ({_first_line(exc)})") from None
        except Exception as exc:
            ours = _ours(exc)
            if ours is None:
                raise
            raise ours from None
        finally:
            (
                context.execution_options.preserve_order, context.enable_progress_bars,
                context.wait_for_min_actors_s,
            ) = saved  # fmt: skip
            quiet.setLevel(level)

    def _window(self, plan: ScoringPlan, window: list[Item]) -> Iterator[pa.RecordBatch]:
        cluster, cuda = self.cluster(), plan.device.startswith("cuda")
        specs = list(dict.fromkeys(t.preprocess for t in plan.task_specs()))
        settings = decoder_settings(specs, plan.fast_decode, plan.max_pixels, plan.limits)
        storage, limits = dict(remote.current().options), plan.limits.to_dict()
        actors = ActorPoolStrategy(min_size=1, max_size=max(1, cluster["gpus"] if cuda else cluster["nodes"]))
        # The actors declare the memory their models take: Ray schedules by it, and the two stages'
        # differing needs keep Ray Data from fusing decoding into the model actors (decoding would then
        # wait for the model instead of running beside it).
        memory = model_bytes(plan)  # a split checkpoint's shared base too, once per task that loads it
        dataset = (
            ray.data.read_datasource(_Inputs(reads_of(window, plan.batch_size, storage, limits)))
            .map_batches(
                decode_block, fn_kwargs={"settings": settings, "storage": storage, "limits": limits},
                batch_format="pyarrow", batch_size=None,
                num_cpus=1,
            )
            .map_batches(
                PredictStage, fn_constructor_kwargs={"plan_json": plan.to_json(), "version": __version__},
                compute=actors, batch_format="pyarrow", batch_size=None,
                num_cpus=1, num_gpus=1 if cuda else 0, memory=memory,
            )
        )  # fmt: skip
        names = [*core_schema(plan.task_specs()).names, ITEM]
        order = _Order(window)
        for out in dataset.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=2):
            order.check(out[ROW_INDEX].to_pylist(), out[PART].to_pylist(), out[LAST].to_pylist())
            out = out.rename_columns([ITEM if c == ROW_INDEX else c for c in out.column_names])
            kept = out.select([*names, EXTRAS] if EXTRAS in out.column_names else names)
            yield from kept.combine_chunks().to_batches()
        order.finish()


class _Order:
    """Checks the rows Ray returns against the window: each plain item's row exactly once; a container's
    rows together, numbered from 0 without a gap or a repeat, up to the one marked last; all in input
    order (rows mixed up would be scores given to other files). A container that gives no row at all
    cannot be told from one whose rows were all lost: only the first happens (an empty shard)."""

    def __init__(self, window: list[Item]) -> None:
        self.expected = iter([(i.index, is_container(i.locator)) for i in window])
        self.inside: int | None = None  # a container whose last row has not come
        self.part = 0  # the part its next row must have

    def check(self, indices: list[int], parts: list[int], lasts: list[bool]) -> None:
        for got, part, last in zip(indices, parts, lasts, strict=True):
            if self.inside is None:
                current = next(self.expected, None)
                while current is not None and current[1] and current[0] != got:
                    current = next(self.expected, None)  # a container without rows
                if current is None or current[0] != got or part != 0:
                    raise RuntimeError(f"Ray returned row {got} out of order: rows would be mixed")
            elif (got, part) != (self.inside, self.part):
                raise RuntimeError(f"Ray returned row {part} of item {got} out of order: rows would be mixed")
            self.inside, self.part = (None, 0) if last else (got, part + 1)

    def finish(self) -> None:
        if self.inside is not None:
            raise RuntimeError(f"Ray returned the rows of item {self.inside} cut short")
        for index, container in self.expected:
            if not container:
                raise RuntimeError(f"Ray returned no row for item {index}")


def _windows(stream: Iterator[Item], rows: int, most: int) -> Iterator[list[Item]]:
    window: list[Item] = []
    held = 0
    for item in stream:
        window.append(item)
        held += len(item.locator.data) if isinstance(item.locator, InMemory) else 0
        if len(window) >= rows or held >= most:
            yield window
            window, held = [], 0
    if window:
        yield window


def _ours(exc: BaseException) -> PerceptScoreError | None:
    """Our own error (weights missing on a node, a version mismatch) inside Ray's wrapping. A task's error
    keeps the original as ``cause``; an actor whose constructor raised keeps only its traceback's text,
    whose last line of ours is read back."""
    from perceptscore import errors

    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, PerceptScoreError) and type(e).__module__.startswith("perceptscore"):
            return e
        for name, message in reversed(_OUR_ERROR.findall(f"{e}\n{getattr(e, 'error_msg', '')}")):
            cls = getattr(errors, name, None)
            if isinstance(cls, type) and issubclass(cls, PerceptScoreError):
                with contextlib.suppress(TypeError):  # one whose constructor wants more than a message
                    return cls(message.strip())
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None


_OUR_ERROR = re.compile(r"perceptscore\.errors\.(\w+): ([^\n]+)")


class _ClusterWatch:
    """A thread that checks every second that the cluster's GCS and the raylet this driver is attached to
    still accept connections (a busy process still does: only a dead one, or a lost host, refuses).
    ``check`` raises ``EngineFailed`` once one of them has not answered for ``grace`` seconds."""

    def __init__(self, where: str, ends: dict[str, tuple[str, int]], grace: float) -> None:
        self.where, self.ends, self.grace = where, ends, grace
        self._down: dict[str, float] = {}  # what does not answer, since when
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="perceptscore-ray-watch", daemon=True)
        self._thread.start()

    @classmethod
    def of_this_driver(cls, where: str, grace: float) -> _ClusterWatch | None:
        """None for a ``ray://`` client: it has neither (its server is the one attached to the cluster)."""
        from ray.util.client import ray as client

        if client.is_connected():
            return None
        context = ray.get_runtime_context()
        host, _, port = context.gcs_address.rpartition(":")
        ends = {"its GCS": (host.removeprefix("[").removesuffix("]"), int(port))}  # [::1]:6379
        node = context.get_node_id()
        for n in ray.nodes():
            if n.get("NodeID") == node and n.get("Alive"):
                ends["this node's raylet"] = (n["NodeManagerAddress"], int(n["NodeManagerPort"]))
        return cls(where, ends, grace)

    def _watch(self) -> None:
        while not self._stopped.wait(1.0):
            for name, end in self.ends.items():
                if _answers(end):
                    self._down.pop(name, None)
                else:
                    self._down.setdefault(name, time.monotonic())

    def lost(self) -> str | None:
        """What has not answered for ``grace`` seconds, if anything."""
        now = time.monotonic()
        return next((name for name, since in list(self._down.items()) if now - since >= self.grace), None)

    def check(self) -> None:
        if (name := self.lost()) is not None:
            raise EngineFailed(
                f"the Ray cluster at {self.where} was lost mid-run: {name} has not answered for "
                f"{self.grace:g} s"
            )

    def stop(self) -> None:
        self._stopped.set()


def _answers(end: tuple[str, int]) -> bool:
    try:
        socket.create_connection(end, timeout=2.0).close()
    except OSError:
        return False
    return True


_END = object()
_READER_JOIN_S = 30.0  # a batch in flight, then Ray Data's shutdown


def _watched(batches: Iterator[pa.RecordBatch], watch: _ClusterWatch | None) -> Iterator[pa.RecordBatch]:
    """The run's batches, made by a thread of their own (every call into Ray, the items read too) so that
    this one checks ``watch`` while it waits: a thread blocked inside Ray on a dead cluster never returns.
    Batches already returned are handed on before the failure. When this generator is closed, the reader
    closes the run in its own thread and is waited for; one stuck in Ray on a lost cluster is left."""
    if watch is None:
        yield from batches
        return
    handoff: queue.Queue[Any] = queue.Queue(maxsize=2)
    closed = threading.Event()

    def offer(thing: Any) -> bool:
        while not closed.is_set():
            with contextlib.suppress(queue.Full):
                handoff.put(thing, timeout=0.5)
                return True
        return False

    def read() -> None:
        try:
            for batch in batches:
                if not offer(batch):
                    break
            else:
                offer(_END)
        except BaseException as exc:  # handed to the consumer, raised there
            offer(exc)
        finally:
            with contextlib.suppress(Exception):
                batches.close()  # type: ignore[attr-defined]

    reader = threading.Thread(target=read, name="perceptscore-ray-batches", daemon=True)
    reader.start()
    try:
        while True:
            try:
                thing = handoff.get(timeout=0.5)
            except queue.Empty:
                watch.check()
                continue
            if thing is _END:
                return
            if isinstance(thing, BaseException):
                raise thing
            yield thing
            watch.check()  # tasks on running workers go on returning rows for a while after the GCS died
    finally:
        closed.set()
        if watch.lost() is None:  # the run's own clean-up (Ray Data's executor) before the command's
            reader.join(_READER_JOIN_S)


def _token_wanted(where: str) -> str:
    """What to do about a cluster that refused this driver: it wants a token, or another one."""
    from ray._raylet import AuthenticationMode, AuthenticationTokenLoader, get_authentication_mode

    give = "RAY_AUTH_TOKEN, a file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token"
    if get_authentication_mode() != AuthenticationMode.TOKEN:
        return (
            f"the Ray cluster at {where} wants its authentication token: set RAY_AUTH_MODE=token and give "
            f"the token `ray get-auth-token` prints on its head ({give})"
        )
    if not AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        return f"RAY_AUTH_MODE=token but no token was found for the Ray cluster at {where}: give it ({give})"
    return (
        f"the Ray cluster at {where} refused this driver's token: give the token `ray get-auth-token` prints "
        f"on its head ({give})"
    )


def _check_token(address: str) -> None:
    """Ask the cluster's GCS for its id, once, before ray.init: a cluster that wants a token this driver
    does not send refuses at once (``ray.exceptions.AuthenticationError``), where ray.init would retry 20
    times, logging each refusal, then fail with "cannot connect". Anything else is left to ray.init."""
    try:  # not public API: a Ray without these skips the check
        from ray._raylet import AuthenticationMode, AuthenticationTokenLoader, GcsClient
        from ray._raylet import get_authentication_mode as mode
    except ImportError:
        return
    if mode() == AuthenticationMode.TOKEN and not AuthenticationTokenLoader.instance().has_token(True):
        # Ray's client would abort the whole process (a failed check in C++) on its first call
        raise ray.exceptions.AuthenticationError("no token")
    try:
        GcsClient(address=address, cluster_id=None)
    except ray.exceptions.AuthenticationError:
        raise
    except Exception:  # not answering, not a Ray head: ray.init says so in its own way
        return


@contextlib.contextmanager
def _stderr_without(marker: bytes) -> Iterator[None]:
    """Standard error, the file descriptor Ray's C++ logs write to, without the lines that contain
    ``marker`` for the length of the block; every other line passes through as it comes."""
    try:
        saved = os.dup(2)
        read, write = os.pipe()
    except OSError:
        yield
        return

    def forward() -> None:
        with os.fdopen(read, "rb") as lines:
            for line in lines:
                if marker not in line:
                    with contextlib.suppress(OSError):
                        os.write(saved, line)

    thread = threading.Thread(target=forward, name="perceptscore-stderr", daemon=True)
    thread.start()
    with contextlib.suppress(ValueError, OSError):
        sys.stderr.flush()
    os.dup2(write, 2)
    os.close(write)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError, OSError):
            sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last write end closes: the thread forwards what is left, and ends
        thread.join(2.0)
        if not thread.is_alive():
            os.close(saved)


def _init_within(timeout: float, **options: Any) -> None:
    """ray.init on a cluster address, given ``timeout`` seconds: something that accepts connections but
    is not a working Ray head (a stale address, a wedged head) would keep it retrying for ever. It runs in
    a thread of its own, left behind (a daemon) when it does not return in time."""
    outcome: list[BaseException | None] = []

    def connect() -> None:
        try:
            if not str(options["address"]).startswith("ray://"):
                _check_token(options["address"])
            ray.init(**options)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=connect, name="perceptscore-ray-connect", daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        raise UsageError(f"no Ray cluster answered at {options['address']} within {timeout:.0f} s")
    if outcome[0] is not None:
        raise outcome[0]


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """One line at once for a cluster address nothing answers at (``host:port`` or ``ray://host:port``)."""
    host_port = address.split("://", 1)[-1]
    host, _, port = host_port.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")  # [::1]:6379
    if not host or not port.isdigit():
        return  # "auto", "local": Ray finds (or says it cannot find) the cluster itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise UsageError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]

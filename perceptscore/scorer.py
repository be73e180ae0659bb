"""``perceptscore.Scorer``: the Python face of ``perceptscore score``. The same plan, local engine and
row assembly as the CLI, with the models loaded once and kept for every ``score()`` call."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from perceptscore.engines.local import LocalEngine
from perceptscore.hub import Weights, resolve
from perceptscore.items import Item
from perceptscore.plan import ScoreOptions, make_plan
from perceptscore.predict import Predictor
from perceptscore.remote import Settings
from perceptscore.scoring import scored
from perceptscore.shards import parse_fields
from perceptscore.sinks import MemorySink, writing
from perceptscore.sources import Sources
from perceptscore.tasks import get_task


class Scorer:
    """Score images for one or more tasks; ``score()`` returns a DataFrame, ``iter_batches()`` streams
    Arrow record batches.

    ``checkpoints`` maps task name -> weights file (or resolved ``hub.Weights``); a task without one gets
    its weights by ``hub.resolve`` (local folders, caches, then a download). ``device`` auto/cpu/cuda[:i];
    ``precision`` auto (fp16 on CUDA, fp32 on CPU)/fp32/fp16/bf16. ``fast_decode`` uses JPEG draft mode
    (faster, pixels differ slightly from the release's decoding). ``decode``: "cpu" (decode workers
    decode) or "gpu" (the workers read; JPEGs are decoded on ``device`` a batch at a time, with nvJPEG on
    CUDA, libjpeg-turbo in this process on the CPU; as ``score --decode gpu``).
    """

    def __init__(
        self,
        tasks: Sequence[str] | str,
        checkpoints: Mapping[str, str | Path | Weights] | None = None,
        device: str = "auto",
        precision: str = "auto",
        batch_size: int | None = None,
        workers: int | None = None,
        fast_decode: bool = False,
        decode: str = "cpu",
    ) -> None:
        names = list(dict.fromkeys(get_task(t).name for t in ([tasks] if isinstance(tasks, str) else tasks)))
        given = {get_task(k).name: v for k, v in (checkpoints or {}).items()}
        weights = {t: w if isinstance(w := given.get(t), Weights) else resolve(get_task(t), w) for t in names}
        self.options = ScoreOptions(names, {}, device, precision, batch_size, workers, fast_decode, decode)
        self.plan = make_plan(self.options, weights=weights)
        self.weights = weights
        self.predictor = Predictor.from_plan(self.plan)
        predictor = self.predictor  # not self: the engine must not keep the Scorer alive (a cycle)
        self.engine = LocalEngine(lambda _: predictor)

    @property
    def tasks(self) -> list[str]:
        return list(self.plan.tasks)

    @property
    def device(self) -> str:
        return self.plan.device

    @property
    def precision(self) -> str:
        return self.plan.precision

    def iter_batches(self, items: Iterable[Item]) -> Iterator[pa.RecordBatch]:
        """The core rows of ``items`` (from ``Sources``), one record batch at a time, in input order."""
        return self.engine.run(self.plan, items)

    def score(
        self,
        inputs: Sequence[str] | str,
        recursive: bool = True,
        path_column: str | None = None,
        tar_fields: Sequence[str] = (),
        storage_options: Mapping[str, Any] | None = None,
        image_column: str | None = None,
    ) -> pd.DataFrame:
        """Score files, folders, globs, @lists, manifests, tar shards or datasets (parquet/arrow with image
        bytes), local or URLs; a DataFrame with the CLI's columns. ``tar_fields``: txt, json, json.NAME;
        ``storage_options``: for fsspec, as ``--storage-options``; ``image_column``: a dataset's column of
        image bytes, when it has several."""
        storage = Settings.parse(json.dumps(storage_options)) if storage_options else Settings()
        fields = parse_fields(",".join(tar_fields))
        options = ScoreOptions(self.plan.tasks, recursive=recursive, path_column=path_column,
                               tar_fields=fields, storage=storage, image_column=image_column)  # fmt: skip
        sources: Sources = options.sources([inputs] if isinstance(inputs, str) else inputs)
        # the limits as the environment says now, for every part of this call (a command's are read as it
        # starts; a Scorer may live longer than one setting)
        plan = replace(self.plan, limits=options.limits)
        rows = MemorySink()  # the CLI's sink for rows in memory (rank, filter)
        with (
            writing(rows, plan.schema(sources.passthrough), {}),
            contextlib.closing(scored(self.engine, plan, sources, sources.passthrough)) as batches,
        ):
            for _, batch in batches:
                rows.write(batch)
        assert rows.table is not None  # finished
        return rows.table.to_pandas()

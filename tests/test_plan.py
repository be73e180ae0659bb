"""The ScoringPlan: everything resolved, JSON both ways, and the fingerprint --resume compares."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pytest

from perceptscore.columns import output_schema
from perceptscore.errors import UsageError
from perceptscore.hub import file_sha256
from perceptscore.plan import ScoreOptions, ScoringPlan, make_plan
from perceptscore.runs import ShardedRun
from perceptscore.tasks import get_task


def cpu_plan(release_checkpoints, device="auto", **kwargs) -> ScoringPlan:  # type: ignore[no-untyped-def]
    checkpoint = str(release_checkpoints["memorability"][0])
    options = ScoreOptions(["memorability"], {"mem": checkpoint}, device=device, precision="auto", **kwargs)
    return make_plan(options, ["photos/"], "out.parquet")


def test_every_auto_is_resolved_and_json_round_trips(release_checkpoints) -> None:
    plan = cpu_plan(release_checkpoints)
    import torch

    # what auto means where the tests run: the CPU (conftest hides a GPU unless PERCEPTSCORE_TEST_GPU=1)
    expected = ("cuda", "fp16", 64) if torch.cuda.is_available() else ("cpu", "fp32", 8)
    assert (plan.device.split(":")[0], plan.precision, plan.batch_size) == expected
    assert plan.workers >= 1
    (weights,) = plan.weights
    assert weights.sha256 == file_sha256(release_checkpoints["memorability"][0])
    assert ScoringPlan.from_json(plan.to_json()) == plan


def test_a_gpu_runs_shards_are_not_resumed_on_a_cpu(release_checkpoints, tmp_path: Path) -> None:
    """A run killed on a GPU (auto = fp16) must not be continued on a CPU (auto = fp32): that would mix
    fp16 and fp32 rows in one file. The fingerprint holds the resolved precision and the device type."""
    cpu = cpu_plan(release_checkpoints, device="cpu")  # pinned: on a GPU host auto would be the GPU
    gpu = replace(cpu, device="cuda:0", precision="fp16")  # what the same command resolves to on a GPU
    assert cpu.fingerprint()["precision"] == "fp32" and cpu.fingerprint()["device_type"] == "cpu"
    out = tmp_path / "out.parquet"
    schema = output_schema([get_task("memorability")])
    interrupted = ShardedRun(out, schema, gpu.fingerprint())  # the GPU run saved a row, then was killed
    row = {"path": "photos/a.jpg", "memorability": 0.5, "error": None, "file_size": 1, "file_mtime_ns": 1}
    interrupted.add([0], pa.RecordBatch.from_pylist([row], schema=schema))
    interrupted.flush()
    with pytest.raises(UsageError, match=r"differs in device_type, precision"):
        ShardedRun(out, schema, cpu.fingerprint())
    # another GPU of the same kind resumes it: the device index is not part of what was scored
    assert ShardedRun(out, schema, replace(gpu, device="cuda:1").fingerprint()).saved_rows == 1

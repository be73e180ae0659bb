from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

# No test may reach a network or a user's caches: fresh cache folders, offline mode, and an endpoint where
# nothing listens. Set before anything imports huggingface_hub, which reads some of these at import.
_SANDBOX = Path(tempfile.mkdtemp(prefix="perceptscore-tests-"))
os.environ.update(
    {
        "HF_HOME": str(_SANDBOX / "hf"),
        "PERCEPTSCORE_CACHE": str(_SANDBOX / "cache"),
        "HF_HUB_OFFLINE": "1",
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
)
os.environ.pop("PERCEPTSCORE_WEIGHTS", None)
os.environ.pop("HF_HUB_CACHE", None)

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402 - after the environment above, on purpose

from photos import sample, write_photo_set  # noqa: E402
from release_reference import ReleaseModel, make_release_checkpoint  # noqa: E402

OUTPUTS = {"memorability": 1, "quality": 1, "emotion": 8}


@pytest.fixture(scope="session")
def release_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, ReleaseModel]]:
    """Per task, a tiny random checkpoint in the release's exact layout and the model it was saved from."""
    folder = tmp_path_factory.mktemp("release")
    checkpoints = {}
    for seed, (task, outputs) in enumerate(OUTPUTS.items()):
        path = folder / f"{task}.pth"
        checkpoints[task] = (path, make_release_checkpoint(path, outputs, seed=seed))
    return checkpoints


@pytest.fixture(scope="session")
def checkpoint_args(release_checkpoints) -> list[str]:
    """``--checkpoint TASK=PATH`` arguments for all three tasks."""
    return [
        arg for task, (path, _) in release_checkpoints.items() for arg in ("--checkpoint", f"{task}={path}")
    ]


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real photographs: JPEG, PNG, WebP, portrait, panorama and a 12 MP JPEG."""
    return write_photo_set(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="session")
def many_photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 distinct real photographs (crops of bundled samples), 480x360 JPEGs."""
    folder = tmp_path_factory.mktemp("many")
    sources = [sample(n).resize((1200, 900)) for n in ("coffee.png", "astronaut.png", "chelsea.png")]
    rng = np.random.default_rng(0)
    for i in range(300):
        x, y = (int(v) for v in rng.integers(0, 700, size=2))
        sources[i % 3].crop((x, min(y, 540), x + 480, min(y, 540) + 360)).save(
            folder / f"{i:04d}.jpg", quality=85
        )
    return folder


@pytest.fixture(scope="session")
def reference(
    many_photos: Path, release_checkpoints, tmp_path_factory: pytest.TempPathFactory
) -> pd.DataFrame:
    out = tmp_path_factory.mktemp("ref") / "ref.parquet"
    from test_reliability import ENV, command  # the reliability tests' own command line

    done = subprocess.run(
        command(many_photos, release_checkpoints["memorability"][0], out),
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return pd.read_parquet(out)

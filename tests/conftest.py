from __future__ import annotations

from pathlib import Path

import pytest

from photos import write_photo_set
from release_reference import ReleaseModel, make_release_checkpoint

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

from __future__ import annotations

from pathlib import Path

import pytest

from release_reference import ReleaseModel, make_release_checkpoint


@pytest.fixture(scope="session")
def release_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[Path, ReleaseModel]]:
    """Tiny random checkpoints in the release's exact layout, 1 and 8 outputs, with their source models."""
    folder = tmp_path_factory.mktemp("release")
    checkpoints = {}
    for outputs in (1, 8):
        path = folder / f"release_{outputs}.pth"
        checkpoints[outputs] = (path, make_release_checkpoint(path, outputs, seed=outputs))
    return checkpoints

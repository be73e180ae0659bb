"""The built wheel, not only the editable install: trainer/ and weights/ live inside the package."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_trainer_and_weights_inside_the_package(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("perceptscore-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "perceptscore/weights/registry.json" in names
    assert {f"perceptscore/weights/cards/{t}.md" for t in ("memorability", "quality", "emotion")} <= set(
        names
    )
    assert {f"perceptscore/trainer/{m}" for m in ("__init__.py", "run.py", "recipes.json")} <= set(names)
    assert "perceptscore/model.py" in names
    # every subpackage the CLI imports (an explicit package list once left these out of the wheel)
    assert {"perceptscore/commands/score.py", "perceptscore/engines/local.py"} <= set(names)
    assert "perceptscore/templates/report.html.j2" in names  # the report's template is package data
    assert not [n for n in names if n.startswith(("trainer/", "weights/", "tests/"))]
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "perceptscore = perceptscore.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()

"""The real ``perceptscore`` executable, in subprocesses."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

from typer.testing import CliRunner

import perceptscore
from perceptscore.cli import app

EXE = str(Path(sysconfig.get_path("scripts")) / "perceptscore")


def test_version_and_help_from_the_installed_script() -> None:
    done = subprocess.run([EXE, "--version"], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == f"perceptscore {perceptscore.__version__}"
    done = subprocess.run([EXE, "--help"], capture_output=True, text=True, check=True)
    assert "Usage: perceptscore" in done.stdout and "tasks" in done.stdout


def test_help_and_version_never_import_torch() -> None:
    probe = (
        "import sys\n"
        "from perceptscore.cli import app\n"
        "for args in (['--help'], ['--version'], ['tasks']):\n"
        "    try:\n"
        "        app(args)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = [m for m in ('torch', 'open_clip', 'numpy', 'PIL') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert "HEAVY []" in done.stdout


def test_tasks_lists_the_registry() -> None:
    result = CliRunner().invoke(app, ["tasks"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for name in ("memorability", "quality", "emotion", "PerceptCLIP/PerceptCLIP_IQA"):
        assert name in result.output


def test_model_cards_ship_with_the_package() -> None:
    result = CliRunner().invoke(app, ["weights", "card", "emotions"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "PerceptCLIP visual emotion" in result.output and "Label order (ASSUMED)" in result.output
    assert "Licence" in result.output

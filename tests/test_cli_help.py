"""``--help`` as people read it (issue 22, item 4): panels in one order, metavars instead of Python types,
``-h``, examples at the bottom, help text shown as written, shell completion."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from perceptscore.cli import app

from test_cli_score import EXE

WIDE = {"COLUMNS": "160", "TERM": "dumb"}


def _commands(group, prefix: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
    for name, command in group.commands.items():
        yield (*prefix, name)
        if hasattr(command, "commands"):
            yield from _commands(command, (*prefix, name))


ROOT = typer.main.get_command(app)
COMMANDS = [(), *_commands(ROOT)]
GROUPS = {(), ("weights",)}


def help_of(*command: str, flag: str = "--help") -> str:
    result = CliRunner().invoke(app, [*command, flag], env=WIDE)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "perceptscore")
def test_every_help_reads_as_words_and_h_is_help(command: tuple[str, ...]) -> None:
    text = help_of(*command)
    assert help_of(*command, flag="-h") == text
    assert not re.search(r"<(bool|str|int|float|path|list\[\w+\]|\w+ range)>", text), text
    assert "[default: no-" not in text  # an off flag's default says nothing
    if command not in GROUPS:  # every command shows how it is used
        assert "Examples:" in text and text.index("Examples:") > text.index("Help")


def test_score_help_has_its_panels_in_order_and_says_the_extra_literally() -> None:
    text = help_of("score")
    titles = re.findall(r"╭─ (\w+) ─", text)
    assert titles == ["Arguments", "Inputs", "Output", "Model", "Performance", "Remote", "Ray", "Help"]
    assert "pip install 'perceptscore[ray]'" in " ".join(text.split())
    for metavar in ("FILE", "[TASK=]PATH", "N|N%|all", "local|ray", "JSON"):
        assert f" {metavar} " in text, metavar
    resume = " ".join(text[text.index("--resume") :].split())[:220]
    assert "refuse if its inputs or options changed" in resume and "default" not in resume.split(".)")[0]


def test_completion_completes_commands_and_options() -> None:
    def complete(words: str) -> list[str]:
        env = {**os.environ, "_PERCEPTSCORE_COMPLETE": "complete_bash", "COMP_WORDS": words,
               "COMP_CWORD": str(len(words.split()) - 1)}  # fmt: skip
        return subprocess.run([EXE], env=env, capture_output=True, text=True, timeout=60).stdout.split()

    assert complete("perceptscore sc") == ["score"]
    assert set(complete("perceptscore score --max")) == {"--max-pixels", "--max-delete"}
    assert "--install-completion" in help_of()


def test_docs_cli_md_shows_score_help_as_it_reads() -> None:
    page = (Path(__file__).parent.parent / "docs" / "cli.md").read_text()
    shown = page.split("<!-- help:score -->\n```text\n")[1].split("\n```\n<!-- /help:score -->")[0]
    result = CliRunner().invoke(app, ["score", "--help"], env={"COLUMNS": "100", "TERM": "dumb"})
    current = "\n".join(line.rstrip() for line in result.output.splitlines()).strip("\n")
    assert shown == current, "docs/cli.md is stale: regenerate it with COLUMNS=100 perceptscore score --help"

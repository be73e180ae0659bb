"""Every README example that can run offline runs here, as `.ci/run` runs README's test command.

README.md is read at test time: each command line of its shell blocks is an example, run in README order in
one sandbox folder (later lines use earlier outputs, as a reader following along would), with tiny test
checkpoints found with no flag through ``$PERCEPTSCORE_WEIGHTS`` and nothing on the network. A line runs
unless a pattern in ``SKIPS`` says why it cannot; a new example that fails here wants a skip reason or a
fixture in ``sandbox``, never silence.

One test per line (parametrized, module-scoped sandbox): each example passes, fails or skips by itself, its
skip reason shows with ``-rs`` and ``-k`` picks one; pytest keeps parametrize order, so README order holds.
Python blocks are not run: they need a tensor ``x`` or a Ray cluster (tests/test_model.py and test_ray.py
cover the API).
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import shutil
import subprocess
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from photos import sample

pytestmark = pytest.mark.slow  # ~27 commands, each a fresh process: minutes, not seconds

README = Path(__file__).parent.parent / "README.md"
BIN = Path(sysconfig.get_path("scripts"))
SHELL_FENCES = ("bash", "sh", "shell")

# Why a README line cannot run in a test sandbox, by a regex searched in the line as run. Reviewed: each
# reason names what is missing here and where that feature is tested instead. Anything not listed runs.
# (Install lines are no examples at all: see as_example.)
SKIPS: list[tuple[str, str]] = [
    (r"\b(s3a?|gs|az|abfss?)://", "needs an object store and credentials (test_remote*.py: moto S3)"),
    (r"\bhttps?://", "needs the network (test_remote.py serves HTTP on 127.0.0.1)"),
    (r"\burls\.parquet\b", "a manifest of URLs: needs the network (test_remote.py)"),
    (r"--engine ray\b", "needs a Ray cluster at the address given (test_ray.py starts a local one)"),
    (r"^perceptscore weights fetch\b", "needs the Hugging Face hub (test_hub.py fakes one)"),
    (r"^perceptscore train\b", "needs a dataset on disk and hours on a GPU (test_train_cli.py: tiny runs)"),
    (r"^perceptscore eval\b.*--dataset\b", "needs a published dataset on disk (test_train_cli.py)"),
]

# Absolute folders the examples name, mirrored into the sandbox (the line runs with them rewritten there).
MIRRORED = ("/data/", "/shared/")

# Files the examples name that only a skipped line would make, stood in for by the sandbox: the line that
# reads one still shows what the README means (here: scoring with a checkpoint of one's own, TASK=PATH).
STAND_INS = {
    "runs/mem/export/lamem.safetensors": "memorability",  # what `perceptscore train ... -o runs/mem` exports
}

# The tiny checkpoints under the release's file names (weights/registry.json), so no line needs a flag.
RELEASE_NAMES = {
    "memorability": "perceptCLIP_Memorability.pth",
    "quality": "perceptCLIP_IQA.pth",
    "emotion": "perceptCLIP_Emotions.pth",
}


@dataclass(frozen=True)
class Example:
    section: str  # the README heading above the block
    line: str  # the command as run: continuations joined, comment stripped, [optional] parts opened


def shell_blocks(text: str) -> list[tuple[str, str]]:
    """(heading, body) of every fenced shell block, in README order."""
    blocks, heading, body, fence = [], "", [], None
    for line in text.splitlines():
        if fence is None:
            if line.startswith("#"):
                heading = line.lstrip("#").strip()
            elif line.startswith("```"):
                fence = line[3:].strip()
                body = []
        elif line.startswith("```"):
            if fence in SHELL_FENCES:
                blocks.append((heading, "\n".join(body)))
            fence = None
        else:
            body.append(line)
    return blocks


def strip_comment(line: str) -> str:
    """The line without a trailing ``# comment`` (a ``#`` inside quotes or inside a word is kept)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def logical_lines(body: str) -> list[str]:
    """Lines with ``\\`` continuations joined and comments stripped; blank lines dropped."""
    lines, pending = [], ""
    for raw in body.splitlines():
        text = strip_comment(raw)
        if text.endswith("\\"):
            pending += text[:-1].strip() + " "
            continue
        joined = (pending + text.strip()).strip()
        pending = ""
        if joined:
            lines.append(joined)
    return lines


def as_example(line: str) -> str | None:
    """The command to run for one logical line, or None when it is no perceptscore example. Install lines
    never run; a perceptscore command chained after one (Quickstart's ``&& .venv/bin/perceptscore ...``)
    runs by itself: the venv's bin is first on PATH here. ``[--option value]`` is run with the option."""
    line = re.sub(r"\[(-[^\[\]]*)\]", r"\1", line)
    line = re.sub(r"\s+", " ", line).strip()
    if re.match(r"python3? -m venv\b", line) or re.search(r"\bpip install\b", line):
        tail = re.search(r"&& \.venv/bin/(perceptscore .*)$", line)
        return tail.group(1) if tail and "&&" not in tail.group(1) else None
    return line if re.search(r"(^|[|;&]\s*)perceptscore\s", line) else None


def examples(text: str) -> list[Example]:
    return [
        Example(heading, command)
        for heading, body in shell_blocks(text)
        for line in logical_lines(body)
        if (command := as_example(line)) is not None
    ]


def skip_reason(line: str) -> str | None:
    return next((why for pattern, why in SKIPS if re.search(pattern, line)), None)


OUTPUT_OPTIONS = ("-o", "--out", "--output")


def outputs(line: str) -> set[str]:
    """What a line writes by name (``-o X``)."""
    words = shlex.split(line.replace("|", " "))
    return {value for option, value in itertools.pairwise(words) if option in OUTPUT_OPTIONS}


def reads(line: str, path: str) -> bool:
    """Whether the line names ``path`` (or a file under it) other than as its own output."""
    words = shlex.split(line.replace("|", " "))
    named = [w.split("=", 1)[-1] for i, w in enumerate(words) if i == 0 or words[i - 1] not in OUTPUT_OPTIONS]
    return any(w == path or w.startswith(path.rstrip("/") + "/") for w in named if w not in STAND_INS)


def decisions(found: list[Example]) -> list[str | None]:
    """Per example, why it is skipped (None: it runs). A line that reads a file which a skipped line of
    its own section writes is skipped too, naming that line: the sandbox holds no such output (or an
    older one, from another section, which is not what the README means there)."""
    reasons: list[str | None] = []
    stale: dict[str, str] = {}  # output -> the skipped line of this section that writes it
    section = None
    for example in found:
        if example.section != section:
            section, stale = example.section, {}
        reason = skip_reason(example.line)
        if reason is None:
            writer = next((line for path, line in stale.items() if reads(example.line, path)), None)
            reason = None if writer is None else f"reads the output of a skipped line ({writer})"
        for path in outputs(example.line):
            if reason is None:
                stale.pop(path, None)
            else:
                stale[path] = example.line
        reasons.append(reason)
    return reasons


def mirrored(line: str, root: Path) -> str:
    """The line with README's absolute folders rewritten into the sandbox root (only where a path starts)."""
    for folder in MIRRORED:
        line = re.sub(rf"(^|[\s='\"]){re.escape(folder)}", rf"\g<1>{root}{folder}", line)
    return line


EXAMPLES = examples(README.read_text(encoding="utf-8"))
PLAN = list(zip(EXAMPLES, decisions(EXAMPLES), strict=True))


def short(example: Example) -> str:
    return example.line if len(example.line) <= 70 else example.line[:67] + "..."


def photos(folder: Path) -> Path:
    """Four small real photographs (three JPEGs and a PNG): enough for every example, fast on a CPU."""
    folder.mkdir(parents=True)
    sources = {"beach.jpg": "coffee.png", "face.jpg": "astronaut.png", "cat.jpg": "chelsea.png"}
    for name, source in sources.items():
        sample(source).resize((160, 120)).save(folder / name, quality=90)
    sample("rocket.jpg").resize((90, 135)).save(folder / "rocket.png")
    return folder


def convert(source: Path, destination: Path, task: str) -> None:
    """A checkpoint in our safetensors format, as `weights convert` makes one (in this process: the CLI's
    run is one of the examples, and torch is loaded here already)."""
    from perceptscore.commands.weights import convert as weights_convert

    destination.parent.mkdir(parents=True, exist_ok=True)
    weights_convert(str(source), str(destination), task, "fp32")


def environment(root: Path, weights: Path) -> dict[str, str]:
    """The venv first on PATH; weights through $PERCEPTSCORE_WEIGHTS; every cache inside the sandbox and
    the hub offline, so nothing touches the network or the user's caches."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PERCEPTSCORE_", "HF_"))}
    return env | {
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PERCEPTSCORE_WEIGHTS": str(weights),
        "PERCEPTSCORE_CACHE": str(root / "env" / "cache"),
        "PERCEPTSCORE_WORK": str(root / "env" / "work"),
        "HF_HOME": str(root / "env" / "hf"),
        "HF_HUB_OFFLINE": "1",
        "HF_ENDPOINT": "http://127.0.0.1:9",  # nothing listens: a request that slips through fails at once
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }


@dataclass(frozen=True)
class Sandbox:
    root: Path  # holds the mirrors of /data/ and /shared/, and env/ (caches, weights)
    cwd: Path  # where each line runs: photos/, photo.jpg, a.jpg, manifest.parquet, ...
    env: dict[str, str]


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory, release_checkpoints) -> Sandbox:
    root = tmp_path_factory.mktemp("readme")
    weights = root / "env" / "weights"
    weights.mkdir(parents=True)
    for task, name in RELEASE_NAMES.items():
        (weights / name).symlink_to(release_checkpoints[task][0])
    env = environment(root, weights)
    cwd = root / "work"
    cwd.mkdir()
    photos(cwd / "photos")
    shutil.copy(cwd / "photos" / "beach.jpg", cwd / "photo.jpg")
    shutil.copy(cwd / "photos" / "face.jpg", cwd / "a.jpg")
    names = ["photos/beach.jpg", "photos/cat.jpg", "photos/rocket.png"]
    pd.DataFrame({"path": names, "album": ["summer", "pets", "space"]}).to_parquet(cwd / "manifest.parquet")
    shutil.copy(release_checkpoints["quality"][0], cwd / RELEASE_NAMES["quality"])  # weights convert's SRC
    convert(release_checkpoints["quality"][0], cwd / "my-iqa.safetensors", "quality")  # "your own" one
    for path, task in STAND_INS.items():
        convert(release_checkpoints[task][0], cwd / path, task)
    photos(root / "data" / "photos")
    photos(root / "shared" / "photos")
    shards_and_dataset(cwd)
    return Sandbox(root, cwd, env)


def shards_and_dataset(cwd: Path) -> None:
    """ "Writing back into your dataset": two webdataset shards (image, caption and JSON per sample) and a
    parquet dataset holding the image bytes (``my_dataset/``), of the sandbox's photos."""
    import io
    import json
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    images = sorted((cwd / "photos").glob("*.jpg"))
    (cwd / "shards").mkdir()
    for number in range(2):
        with tarfile.open(cwd / "shards" / f"{number:05d}.tar", "w") as archive:
            for offset, image in enumerate(images):
                key = f"{number:05d}{offset:04d}"
                for suffix, data in ((".jpg", image.read_bytes()), (".txt", image.stem.encode()),
                                     (".json", json.dumps({"key": key}).encode())):  # fmt: skip
                    member = tarfile.TarInfo(key + suffix)
                    member.size = len(data)
                    archive.addfile(member, io.BytesIO(data))
    (cwd / "my_dataset" / "data").mkdir(parents=True)  # the hub's layout
    kind = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = [{"bytes": image.read_bytes(), "path": image.name} for image in images]
    table = pa.table({"image": pa.array(rows, kind)})
    pq.write_table(table, cwd / "my_dataset" / "data" / "train-00000-of-00001.parquet")


def test_the_readme_has_examples_in_each_shell_block() -> None:
    """A guard on the extraction: a README rewrite (or a parser change) must not quietly drop examples."""
    blocks = shell_blocks(README.read_text(encoding="utf-8"))
    with_commands = {heading for heading, body in blocks if re.search(r"^\s*perceptscore ", body, re.M)}
    assert with_commands <= {example.section for example in EXAMPLES}
    assert len([e for e, reason in PLAN if reason is None]) >= 10


def test_lines_are_read_as_a_reader_runs_them() -> None:
    text = """## A
```bash
# a comment line
python3 -m venv .venv && .venv/bin/pip install -e .   # install
python3 -m venv .venv && .venv/bin/pip install -e . && \\
  .venv/bin/perceptscore score photos/ -o s.csv
perceptscore score /data/photos -t q \\
    --x 'a # b' -o out.parquet   # why
find photos -name '*.jpg' | perceptscore filter --min-quality 0.7
perceptscore report s.parquet [--top 24] photos/*.[jJ]pg
```
## B
```python
perceptscore.Scorer(["quality"])
```
"""
    assert examples(text) == [
        Example("A", "perceptscore score photos/ -o s.csv"),
        Example("A", "perceptscore score /data/photos -t q --x 'a # b' -o out.parquet"),
        Example("A", "find photos -name '*.jpg' | perceptscore filter --min-quality 0.7"),
        Example("A", "perceptscore report s.parquet --top 24 photos/*.[jJ]pg"),
    ]
    root = Path("/tmp/box")
    assert mirrored("perceptscore score /data/p -o /data/s.parquet --x=/shared/y", root) == (
        "perceptscore score /tmp/box/data/p -o /tmp/box/data/s.parquet --x=/tmp/box/shared/y"
    )
    assert mirrored("perceptscore score runs/data/x", root) == "perceptscore score runs/data/x"
    assert skip_reason("perceptscore score s3://b/p -t q") is not None
    assert skip_reason("perceptscore weights fetch all") is not None
    assert skip_reason("perceptscore weights list") is None


def test_a_line_reading_what_a_skipped_line_writes_is_skipped_within_its_section() -> None:
    text = """## S
```bash
perceptscore score urls.parquet -o s.parquet
perceptscore score --retry-errors s.parquet -o s.parquet
perceptscore train -t memorability -o runs/mem
perceptscore score photos/ --checkpoint memorability=runs/mem/x.safetensors
perceptscore score photos/ --checkpoint memorability=runs/mem/export/lamem.safetensors
perceptscore score photos/ -o s.parquet
perceptscore rank s.parquet
```
## T
```bash
perceptscore score urls.parquet -o t.parquet
perceptscore rank s.parquet
```
"""
    reasons = decisions(examples(text))
    assert [reason is None for reason in reasons] == [
        False,
        False,
        False,
        False,
        True,
        True,
        True,
        False,
        True,
    ]
    assert reasons[1] == "reads the output of a skipped line (perceptscore score urls.parquet -o s.parquet)"


@pytest.mark.parametrize(("example", "reason"), PLAN, ids=[short(e) for e, _ in PLAN])
def test_readme_example(example: Example, reason: str | None, sandbox: Sandbox) -> None:
    if reason is not None:
        pytest.skip(f"{reason}: {example.line}")
    line = mirrored(example.line, sandbox.root)
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", line],
        cwd=sandbox.cwd, env=sandbox.env, capture_output=True, text=True, timeout=300,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 0, (
        f"README example ({example.section}) exited {done.returncode}: {example.line}\n"
        f"ran in {sandbox.cwd} as: {line}\nstderr:\n{done.stderr}\n"
        "If it cannot run offline with the tiny test checkpoints, add its reason to SKIPS in "
        "tests/test_readme_examples.py; if it needs a file, add it to the sandbox fixture there."
    )
    missing = [out for out in outputs(line) if out != "-" and not (sandbox.cwd / out).exists()]
    assert not missing, f"README example exited 0 but wrote no {missing}: {example.line}\n{done.stderr}"

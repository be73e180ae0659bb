"""``perceptscore weights list | path | fetch | import | convert | verify``: where each task's weights are,
getting, importing and converting them, and checking a file."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from perceptscore.errors import CheckpointError, UsageError
from perceptscore.folders import check_output_folder
from perceptscore.tasks import Task, get_task


def task_of_file(path: str | Path, task: str | None) -> Task:
    """The task a weights file serves: as given; for one of our files, its metadata; else the task its
    name says (the release's file name, or a task name or alias as a word: ``iqa_finetune.pth``); else the
    one task with as many outputs as the file's head (8: emotion)."""
    if task:
        asked, released = get_task(task), _release_named(Path(path).name)
        if released is not None and released.name != asked.name:  # both have one output: nothing else tells
            raise UsageError(
                f"{Path(path).name} is the {released.name} release, not {asked.name}'s: drop --task, or "
                f"rename the file if it really holds {asked.name} weights"
            )
        return asked
    if Path(path).suffix.lower() == ".safetensors":
        from perceptscore.checkpoints import read_metadata

        return get_task(read_metadata(path)["task"])
    return _task_named_by(Path(path).name) or _task_by_outputs(Path(path))


def _release_named(name: str) -> Task | None:
    """The task whose released file has this name, if one has."""
    from perceptscore.tasks import all_tasks

    return next((t for t in all_tasks().values() if name.lower() == t.release.filename.lower()), None)


def _task_named_by(name: str) -> Task | None:
    from perceptscore.tasks import all_tasks

    if (released := _release_named(name)) is not None:
        return released
    specs = list(all_tasks().values())
    words = set(re.split(r"[^a-z0-9]+", Path(name).stem.lower()))
    named = [spec for spec in specs if words & {spec.name, *spec.aliases}]
    return named[0] if len(named) == 1 else None  # two tasks named: the content decides


def _task_by_outputs(path: Path) -> Task:
    from perceptscore.checkpoints import read_release_state_dict
    from perceptscore.tasks import all_tasks

    head = read_release_state_dict(path).get("mlp.fc3.weight")
    outputs = int(head.shape[0]) if head is not None and head.ndim == 2 else None
    fits = [spec for spec in all_tasks().values() if spec.outputs == outputs]
    if len(fits) == 1:
        return fits[0]
    why = f" ({outputs} output{'s' * (outputs != 1)}: {' or '.join(s.name for s in fits)})" if fits else ""
    raise UsageError(f"cannot tell which task {path.name} is for{why}: add --task")


def convert(
    src: str, dst: str, task: str | None, precision: str, source: str | None = None
) -> dict[str, Any]:
    """Release .pth (or one of ours) -> our standalone safetensors file; returns a report."""
    from perceptscore.checkpoints import load_model, save_converted
    from perceptscore.hub import file_sha256

    if Path(dst).suffix.lower() != ".safetensors":
        raise UsageError(f"convert writes safetensors: name the output *.safetensors, not {dst!r}")
    check_output_folder(dst)  # before loading the model, not after
    spec = task_of_file(src, task)
    model = load_model(spec.name, src, merge=False)
    sha = file_sha256(src)
    save_converted(model, spec, dst, source=source or Path(src).name, source_sha256=sha, precision=precision)
    return {
        "task": spec.name,
        "source": src,
        "source_sha256": sha,
        "output": dst,
        "bytes": Path(dst).stat().st_size,
    }


def fetch(task: str) -> dict[str, Any]:
    """Download (or find in the hub cache) a task's release file and convert it into our cache, split: the
    frozen base goes to a shared base-<hash>.safetensors, the task keeps its 11 MB of adapters and head."""
    from perceptscore.checkpoints import load_model, save_converted
    from perceptscore.hub import converted_cache, file_sha256, resolve

    spec = get_task(task)
    cached = converted_cache() / f"{spec.name}.safetensors"
    release = resolve(spec, download=True) if not cached.is_file() else None
    if release is not None and release.path.suffix.lower() == ".safetensors":
        cached, release = release.path, None  # already ours (from $PERCEPTSCORE_WEIGHTS)
    if release is not None:
        model = load_model(spec.name, release.path, merge=False)
        source = f"{spec.release.repo_id}/{spec.release.filename}@{spec.release.revision}"
        cached.parent.mkdir(parents=True, exist_ok=True)
        save_converted(
            model, spec, cached, source=source, source_sha256=file_sha256(release.path), split=True
        )
    return {
        "task": spec.name,
        "path": str(cached),
        "origin": release.origin if release else "converted cache",
    }


def verify(path: str, task: str | None) -> dict[str, Any]:
    """Load a weights file completely (every key checked) and report what it is."""
    from perceptscore.checkpoints import load_model, read_metadata
    from perceptscore.hub import file_sha256

    spec = task_of_file(path, task)
    model = load_model(spec.name, path, merge=False)
    report = {"task": spec.name, "path": path, "sha256": file_sha256(path), "outputs": model.arch.outputs}
    report["architecture"] = (
        f"ViT width {model.arch.width}, {model.arch.layers} layers, LoRA r={model.arch.lora_rank}"
    )
    if Path(path).suffix.lower() == ".safetensors":
        metadata = read_metadata(path)
        report |= {k: metadata[k] for k in ("source", "source_sha256", "precision")}
    return report


def weights_status() -> list[dict[str, str]]:
    """Per task: the released file and where a local copy would be taken from now (no network)."""
    from perceptscore.hub import local_candidates
    from perceptscore.tasks import all_tasks

    rows = []
    for spec in all_tasks().values():
        found = next(((p, o) for p, o in local_candidates(spec) if p.is_file()), None)
        rows.append(
            {
                "task": spec.name,
                "release": f"{spec.release.repo_id}/{spec.release.filename} ({spec.release.size})",
                "local": f"{found[0]} ({found[1]})" if found else "not downloaded",
            }
        )
    return rows


# ---- import: a file brought by hand into the cache, as `fetch` would have put it -----------------------


def release_status(spec: Task, name: str, sha256: str) -> str:
    """How a file relates to the task's release: ``release`` (its sha256 is the pinned one), ``unpinned``
    (the registry pins no sha256: nothing to check against) or ``own`` (another file: a checkpoint of the
    user's). A file named as the release whose sha256 differs is refused: it claims to be the release and
    is not (a damaged copy, most likely), and scores would cite the release for weights that are not it."""
    pin, release = spec.release.sha256, spec.release
    if pin is None:
        return "unpinned"
    if sha256 == pin:
        return "release"
    if name.lower() == release.filename.lower():
        raise CheckpointError(
            f"{name} is not the released {release.repo_id}/{release.filename}: sha256 {sha256[:12]}..., the "
            f"release's {pin[:12]}... (a damaged copy?); download it again, or rename it to import it as "
            "your own checkpoint"
        )
    return "own"


def _source(spec: Task, path: Path, status: str) -> str:
    """What provenance will name as the weights' source (the import's file sha256 goes beside it)."""
    release = spec.release
    if status == "release":
        return f"{release.repo_id}/{release.filename}@{release.revision}"  # as `fetch` writes it
    if path.suffix.lower() == ".safetensors":
        from perceptscore.checkpoints import read_metadata

        return f"imported {path.name} ({read_metadata(path).get('source', '')})"
    if status == "own":
        return f"imported {path.name} (not the release: its sha256 differs)"
    if path.name.lower() == release.filename.lower():
        return f"imported {path.name} (sha256 not checked: no pinned sha256 for {release.repo_id})"
    return f"imported {path.name}"


def _already_cached(cached: Path, sha256: str, replace: bool) -> bool:
    """Whether the cache holds this very import already; refuses to put it over other weights unasked."""
    from perceptscore.checkpoints import read_metadata

    if not cached.is_file() or replace:
        return False
    try:
        held = read_metadata(cached)
    except CheckpointError:
        return False  # a damaged cache file of ours: replaced, it would fail every run anyway
    if held.get("source_sha256") == sha256:
        return True
    raise UsageError(
        f"the cache already holds {held.get('task')} weights ({held.get('source')}, {cached}): "
        "add --replace to put this file in their place"
    )


def import_weights(src: str, task: str | None = None, replace: bool = False) -> dict[str, Any]:
    """Convert a weights file brought by hand (a release ``.pth`` or one of our ``.safetensors``) into our
    cache, where ``resolve`` finds it: after this, scoring needs no flag and no network."""
    from perceptscore.checkpoints import load_model, save_converted
    from perceptscore.hub import converted_cache, file_sha256

    path = Path(src)
    if not path.is_file():
        raise UsageError(f"{src}: no such file" if not path.exists() else f"{src}: not a file")
    spec = task_of_file(path, task)
    sha = file_sha256(path)
    status = release_status(spec, path.name, sha)
    cached = converted_cache() / f"{spec.name}.safetensors"
    report = {"task": spec.name, "source": str(path), "sha256": sha, "status": status, "path": str(cached)}
    if path.resolve() == cached.resolve() or _already_cached(cached, sha, replace):
        return {**report, "imported": False, **_in_use(spec, cached)}
    model = load_model(spec.name, path, merge=False)  # every key checked before the cache is touched
    cached.parent.mkdir(parents=True, exist_ok=True)
    save_converted(model, spec, cached, source=_source(spec, path, status), source_sha256=sha, split=True)
    return {**report, "imported": True, **_in_use(spec, cached)}


def _in_use(spec: Task, cached: Path) -> dict[str, Any]:
    """The file scoring will take for the task now: a ``$PERCEPTSCORE_WEIGHTS`` file comes before ours."""
    from perceptscore.hub import local_candidates

    first = next((p for p, _ in local_candidates(spec) if p.is_file()), cached)
    return {"used": str(first), "shadowed": first != cached}


def import_notes(report: dict[str, Any]) -> tuple[list[str], list[str]]:
    """What the CLI says after an import, beside the summary line: notes, and warnings."""
    spec = get_task(report["task"])
    repo, sha = spec.release.repo_id, report["sha256"]
    notes, warnings = [], []
    if report["status"] == "release":
        notes.append(f"sha256 {sha[:12]}... is the release's ({repo}/{spec.release.filename})")
    elif report["status"] == "unpinned" and not report["source"].endswith(".safetensors"):
        notes.append(f"sha256 {sha[:12]}... not checked: the registry pins none for {repo}")
    elif report["status"] == "own":
        warnings.append(
            f"not the released {spec.release.filename} (sha256 differs): imported as your own checkpoint; "
            "scores record its sha256"
        )
    if report["shadowed"]:
        warnings.append(
            f"scoring takes {report['used']} first ($PERCEPTSCORE_WEIGHTS): unset it or remove it"
        )
    return notes, warnings


def weights_paths(tasks: list[str]) -> list[dict[str, Any]]:
    """Per task: every place its weights are looked for, in order, and the file scoring takes (no network)."""
    from perceptscore.hub import search_order

    rows = []
    for name in tasks:
        spec = get_task(name)
        places = search_order(spec)
        used = next((place for place in places if place.found), None)
        rows.append({"task": spec.name, "places": places, "used": used})
    return rows

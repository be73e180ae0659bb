"""``perceptscore weights list | fetch | convert | verify``: where each task's weights are, getting and
converting them, and checking a file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from perceptscore.errors import UsageError
from perceptscore.folders import check_output_folder
from perceptscore.tasks import Task, get_task


def task_of_file(path: str | Path, task: str | None) -> Task:
    """The task a weights file serves: as given, from our metadata, or from the release's file name."""
    if task:
        return get_task(task)
    from perceptscore.tasks import all_tasks

    if Path(path).suffix.lower() == ".safetensors":
        from perceptscore.checkpoints import read_metadata

        return get_task(read_metadata(path)["task"])
    for spec in all_tasks().values():
        if Path(path).name == spec.release.filename:
            return spec
    raise UsageError(f"cannot tell which task {Path(path).name} is for: add --task")


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

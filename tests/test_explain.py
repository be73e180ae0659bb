"""``explain``: the maps are the published rules computed right, they mean something (localisation,
deletion, randomisation), and the command writes what it says, upright, with the scores `score` gives."""

from __future__ import annotations

import subprocess
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import perceptscore
from perceptscore.checkpoints import load_model, save_converted
from perceptscore.cli import app
from perceptscore.explain import Explainer, attention_shift_maps, paste, relevance_maps
from perceptscore.heatmap import MIN_WIDTH, hatched
from perceptscore.images import decode
from perceptscore.preprocess import random_crop_offsets, resize
from perceptscore.tasks import get_task

from photos import sample
from quadrants import quadrant_images, train_quadrant_model

EXE = str(Path(sysconfig.get_path("scripts")) / "perceptscore")


def _first_output(out: torch.Tensor) -> torch.Tensor:
    return out[:, 0]


def _score_relevance(model: perceptscore.PerceptModel, x: torch.Tensor) -> torch.Tensor:
    """The maps explain computes for a score (memorability, quality): evidence for and against."""
    return relevance_maps(model, x, _first_output, either_way=True)


# ---- the rules, against an independent computation on the release's own structure -------------------


def _reference_attentions(reference, x: torch.Tensor, outputs: int = 0):  # type: ignore[no-untyped-def]
    """transformers' eager attention probabilities of the release structure, and its raw outputs."""
    reference.model.config._attn_implementation = "eager"
    try:
        out = reference.model(pixel_values=x, output_attentions=True)
    finally:
        reference.model.config._attn_implementation = "sdpa"
    return out.attentions, reference.mlp(reference.proj(out.pooler_output))


@pytest.mark.parametrize(("merge", "either_way"), [(False, False), (True, False), (True, True)])
def test_relevance_is_chefers_rule_on_the_release_structure(release_checkpoints, merge, either_way) -> None:
    path, reference = release_checkpoints["memorability"]
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    attentions, raw = _reference_attentions(reference, x.requires_grad_(True))
    grads = torch.autograd.grad(raw[:, 0].sum(), attentions)  # autograd.grad: nothing lands in x.grad
    expected = []
    for b in range(2):  # the rule, written out per image in float64
        r = np.eye(attentions[0].shape[-1])
        for a, g in zip(attentions, grads, strict=True):
            weighted = g[b].double().numpy() * a[b].detach().double().numpy()
            cam = (np.abs(weighted) if either_way else np.maximum(weighted, 0)).mean(axis=0)
            r = r + cam @ r
        expected.append(r[0, 1:].reshape(16, 16))
    model = load_model("memorability", checkpoint=path, merge=merge)
    before = x.detach().clone()
    got = relevance_maps(model, x, _first_output, either_way).numpy()  # x requires grad, as a user's may
    assert got.shape == (2, 16, 16)
    np.testing.assert_allclose(got, np.stack(expected), rtol=1e-3, atol=1e-4 * np.abs(expected).max())
    assert x.grad is None and x.equal(before)  # relevance_maps leaves its input alone


def test_attention_shift_is_tuned_minus_base_clip_attention(release_checkpoints) -> None:
    path, reference = release_checkpoints["emotion"]
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        tuned, _ = _reference_attentions(reference, x)
        with reference.model.disable_adapter():
            base, _ = _reference_attentions(reference, x)
    expected = (tuned[-1][:, :, 0, 1:].mean(1) - base[-1][:, :, 0, 1:].mean(1)).reshape(2, 16, 16)
    model = load_model("emotion", checkpoint=path, merge=False)
    got = attention_shift_maps(model, x)
    assert torch.allclose(got, expected, atol=1e-6, rtol=0), (got - expected).abs().max()
    assert expected.abs().max() > 1e-5  # the adapters really move attention: the comparison is not 0 == 0
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # the adapters are back on after the base pass
    with pytest.raises(ValueError, match="unmerged"):
        attention_shift_maps(load_model("emotion", checkpoint=path, merge=True), x)


def test_pasted_crops_are_averaged_where_they_overlap_and_nan_where_none_reached() -> None:
    grids = torch.arange(1.0, 4.0)[:, None, None].expand(3, 2, 2)  # crop i is constant i + 1
    offsets = [(0, 0), (1, 1), (3, 0)]
    got = paste(grids, offsets, crop=3, shape=(6, 5))
    total, count = np.zeros((6, 5)), np.zeros((6, 5))
    for value, (top, left) in zip((1, 2, 3), offsets, strict=True):
        total[top : top + 3, left : left + 3] += value
        count[top : top + 3, left : left + 3] += 1
    expected = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert np.isnan(got[0, 4]) and got[1, 1] == pytest.approx(1.5)


# ---- the maps mean something: a tiny tower that must look at one quadrant ---------------------------


@pytest.fixture(scope="module")
def quadrant_models() -> dict[str, perceptscore.PerceptModel]:
    return {q: train_quadrant_model(q, seed) for seed, q in enumerate(("top-left", "bottom-right"))}


def _images(n: int = 16, seed: int = 100) -> torch.Tensor:
    return quadrant_images(n, "top-left", torch.Generator().manual_seed(seed))[0]


def _shares(maps: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Each image's share of its map's mass in the quadrant (rows, cols)."""
    half = maps.shape[-1] // 2
    inside = maps[:, rows * half : (rows + 1) * half, cols * half : (cols + 1) * half].sum(dim=(1, 2))
    return inside / maps.sum(dim=(1, 2))


@pytest.mark.slow
def test_localisation_most_relevance_falls_in_the_quadrant_the_label_depends_on(quadrant_models) -> None:
    x = _images()
    for quadrant, (rows, cols) in (("top-left", (0, 0)), ("bottom-right", (1, 1))):
        maps = _score_relevance(quadrant_models[quadrant], x)
        shares = _shares(maps, rows, cols)
        # per image (the median: most maps point there, not a few strong ones; 0.91 and 1.00 when written)
        assert float(shares.median()) >= 0.6, (quadrant, shares.tolist())
        pooled = _shares(maps.sum(dim=0, keepdim=True), rows, cols)
        assert float(pooled) >= 0.6, (quadrant, float(pooled))


@pytest.mark.slow
def test_localisation_of_a_class_logit_with_chefers_exact_rule() -> None:
    """Emotion's path: the predicted class's logit, positive part (clamp) kept, on a 2-class tower."""
    model = train_quadrant_model("top-left", seed=0, classes=True)
    x, brightness = quadrant_images(16, "top-left", torch.Generator().manual_seed(100))
    with torch.no_grad():
        predicted = model(x).argmax(dim=1)
    assert float((predicted == (brightness > 0.6)).float().mean()) >= 0.8  # it learned the quadrant's class

    def logit_of_prediction(out: torch.Tensor) -> torch.Tensor:
        return out.gather(1, out.detach().argmax(dim=1, keepdim=True))[:, 0]

    shares = _shares(relevance_maps(model, x, logit_of_prediction, either_way=False), 0, 0)
    assert float(shares.median()) >= 0.6, shares.tolist()  # 0.98 when written


def test_deletion_blanking_the_most_relevant_patches_moves_the_output_most(quadrant_models) -> None:
    model, x = quadrant_models["top-left"], _images(seed=200)
    maps = _score_relevance(model, x).flatten(1)  # (n, 64 patches)
    patches, k, side = maps.shape[1], round(0.2 * maps.shape[1]), x.shape[-1] // 8

    def blanked(order: torch.Tensor) -> torch.Tensor:
        images = x.clone()
        for i, chosen in enumerate(order[:, :k]):
            for p in chosen.tolist():
                r, c = divmod(p, 8)
                images[i, :, r * side : (r + 1) * side, c * side : (c + 1) * side] = 0  # the mean colour
        return images

    with torch.no_grad():
        before = model(x)[:, 0]
        relevant = (model(blanked(maps.argsort(dim=1, descending=True)))[:, 0] - before).abs().mean()
        rng = torch.Generator().manual_seed(0)
        random = torch.stack([
            (model(blanked(torch.rand(len(x), patches, generator=rng).argsort(dim=1)))[:, 0] - before)
            .abs().mean()
            for _ in range(5)
        ]).mean()  # fmt: skip
    assert relevant > 1.5 * random, (float(relevant), float(random))


def test_randomisation_other_training_other_map_same_checkpoint_same_map(quadrant_models, tmp_path) -> None:
    x = _images(8, seed=300)
    path = tmp_path / "top-left.safetensors"
    save_converted(quadrant_models["top-left"], get_task("memorability"), path, "test", "0" * 64)
    first, second = (_score_relevance(load_model("memorability", checkpoint=path), x) for _ in range(2))
    assert torch.equal(first, second)  # the same checkpoint twice: the same map, bit for bit
    other = _score_relevance(quadrant_models["bottom-right"], x)
    untrained = _score_relevance(train_quadrant_model("top-left", seed=7, steps=0), x)
    for different in (other, untrained):
        correlation = np.corrcoef(first.flatten().numpy(), different.flatten().numpy())[0, 1]
        assert correlation < 0.5, correlation


# ---- the command and the Python API on real photos ---------------------------------------------------


@pytest.fixture(scope="module")
def rotated_photo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Image.Image]:
    """A JPEG stored 300x200 with EXIF orientation 6: upright it is 200x300."""
    folder = tmp_path_factory.mktemp("explain-photos")
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = sample("astronaut.png").resize((300, 200))
    stored.save(folder / "portrait.jpg", exif=exif, quality=95)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return folder / "portrait.jpg", stored.transpose(Image.Transpose.ROTATE_270)


def _run(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "300"})


def test_explain_writes_an_upright_overlay_and_the_raw_map(release_checkpoints, rotated_photo, tmp_path):
    photo, _ = rotated_photo
    ckpt = str(release_checkpoints["memorability"][0])
    result = _run("explain", str(photo), "-t", "mem", "--checkpoint", ckpt, "-o", str(tmp_path / "out"),
                  "--raw", "--device", "cpu")  # fmt: skip
    assert result.exit_code == 0, result.output
    png, npy = (
        tmp_path / "out/portrait.memorability.relevance.png",
        tmp_path / "out/portrait.memorability.relevance.npy",
    )
    heat = np.load(npy, allow_pickle=False)
    # upright 200x300 -> short side 224: 224x336 (w x h); the centre crop keeps rows 56..279
    assert heat.shape == (336, 224) and heat.dtype == np.float32
    assert np.isnan(heat[:56]).all() and np.isnan(heat[280:]).all() and np.isfinite(heat[56:280]).all()
    picture = np.asarray(Image.open(png).convert("RGB"))
    # the photo at the top left; the legend below it, on a canvas wide enough for its words
    assert picture.shape[1] == MIN_WIDTH and picture.shape[0] > 300 + 60
    upright = np.asarray(Image.open(photo).convert("RGB").transpose(Image.Transpose.ROTATE_270), dtype=float)
    # rows the model never saw are the upright photo, hatched: not the stored (sideways) one
    np.testing.assert_allclose(picture[:30, :200], np.round(hatched(upright)[:30]), atol=1)
    assert np.abs(picture[150, :200] - upright[150]).mean() > 5  # the rows it saw are tinted
    assert "memorability" in result.output and str(png) in result.output


def test_scores_in_explanations_are_the_scores_of_score(release_checkpoints, rotated_photo) -> None:
    photo, _ = rotated_photo
    upright = decode(photo)
    paths = {t: release_checkpoints[t][0] for t in ("quality", "emotion")}
    frame = perceptscore.Scorer(["quality", "emotion"], paths, device="cpu", precision="fp32").score(
        [str(photo)]
    )
    quality = Explainer("quality", paths["quality"], device="cpu", precision="fp32").explain(photo)
    assert quality.score == pytest.approx(frame["quality"][0], abs=1e-5)
    # quality's 15 crops of the 384x512 resize, pasted where scoring took them: NaN exactly elsewhere
    pixels = np.asarray(resize(upright, (512, 384)))
    covered = np.zeros((512, 384), dtype=bool)
    for top, left in random_crop_offsets(pixels, 15, 224):
        covered[top : top + 224, left : left + 224] = True
    assert quality.map.shape == (512, 384) and (np.isfinite(quality.map) == covered).all()
    emotion = Explainer("emotion", paths["emotion"], device="cpu", precision="fp32")
    predicted = emotion.explain(photo)
    assert predicted.label == frame["emotion"][0]
    assert predicted.score == pytest.approx(frame["emotion_confidence"][0], abs=1e-5)
    other = next(label for label in get_task("emotion").labels if label != predicted.label)
    chosen = emotion.explain(photo, label=other)
    assert chosen.label == other and chosen.target == f"logit of {other}"
    assert chosen.score == pytest.approx(frame[f"emotion_{other}"][0], abs=1e-5)
    assert not np.allclose(np.nan_to_num(chosen.map), np.nan_to_num(predicted.map))


def test_attention_shift_from_the_command_and_a_bad_file_is_one_line(
    release_checkpoints, rotated_photo, tmp_path
):
    photo, _ = rotated_photo
    ckpt = str(release_checkpoints["emotion"][0])
    inputs = [str(photo), str(photo.with_name("broken.jpg")), str(photo)]  # a name twice: -1
    options = [
        "-t",
        "emotion",
        "--method",
        "attention-shift",
        "--checkpoint",
        ckpt,
        "--raw",
        "--device",
        "cpu",
    ]
    result = _run("explain", *inputs, *options, "-o", str(tmp_path))
    assert result.exit_code == 1, result.output  # one file failed; the other was explained
    assert "failed:" in result.output and "broken.jpg" in result.output and "Traceback" not in result.output
    heat = np.load(tmp_path / "portrait.emotion.attention-shift.npy")
    assert np.nanmin(heat) < 0 < np.nanmax(heat)  # a shift: attention moved to some patches, from others
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "portrait.emotion.attention-shift-1.npy", "portrait.emotion.attention-shift-1.png",
        "portrait.emotion.attention-shift.npy", "portrait.emotion.attention-shift.png",
    ]  # fmt: skip
    again = np.load(tmp_path / "portrait.emotion.attention-shift-1.npy")
    assert np.array_equal(heat, again, equal_nan=True)  # the same image, the same map


@pytest.mark.parametrize(("task", "label"), [("memorability", None), ("emotion", None), ("emotion", "awe"),
                                              ("quality", None)])  # fmt: skip
def test_a_batch_of_images_gives_the_maps_of_one_at_a_time(release_checkpoints, task, label) -> None:
    sizes = {"astronaut.png": (300, 200), "coffee.png": (240, 260), "chelsea.png": (256, 256)}
    photos = [sample(name).resize(size) for name, size in sizes.items()]
    ckpt = release_checkpoints[task][0]
    alone = Explainer(task, ckpt, device="cpu", batch_size=1)
    batched = Explainer(task, ckpt, device="cpu", batch_size=7)  # quality: a batch spans two images' crops
    assert alone.precision == batched.precision == "fp32"  # auto: fp32 on every device, for the gradients
    together = batched.explain_many(photos, label)
    assert batched.images_per_batch == (7 if task != "quality" else 1)
    for photo, got in zip(photos, together, strict=True):
        one = alone.explain(photo, label)
        assert (got.label, got.target) == (one.label, one.target)
        assert got.score == pytest.approx(one.score, abs=1e-6)
        np.testing.assert_allclose(got.map, one.map, rtol=1e-5, atol=1e-5 * np.nanmax(np.abs(one.map)))
    assert not np.allclose(
        np.nan_to_num(together[0].map)[:200, :200], np.nan_to_num(together[2].map)[:200, :200]
    )


def test_a_pil_image_is_turned_upright_like_a_file(release_checkpoints, rotated_photo) -> None:
    photo, _ = rotated_photo
    explainer = Explainer("memorability", release_checkpoints["memorability"][0], device="cpu")
    with Image.open(photo) as stored:  # 300x200 with EXIF orientation 6, as the file holds it
        from_pil = explainer.explain(stored)
    from_file = explainer.explain(photo)
    assert from_pil.map.shape == from_file.map.shape == (336, 224)
    np.testing.assert_array_equal(from_pil.map, from_file.map)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-t", "memorability", "--class", "awe"], "memorability has no classes"),
        (["-t", "emotion", "--class", "joy"], "known: amusement"),
        (["-t", "memorability", "--method", "saliency"], "choose relevance or attention-shift"),
        (["-t", "memorability", "-o", "FILE"], "is a file"),
        (["-t", "memorability", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["-t", "memorability", "--batch-size", "-1"], "--batch-size must be at least 1, got -1"),
        (["-t", "mem", "--checkpoint", "quality=q.pth"], "this run explains memorability"),
        (["-t", "mem", "--checkpoint", "memorabilty=m.pth"], "did you mean 'memorability'"),
    ],
)
def test_explain_usage_mistakes_are_one_line_and_exit_2(rotated_photo, tmp_path, args, message) -> None:
    photo, _ = rotated_photo
    (tmp_path / "taken").write_text("not a folder")
    args = [a.replace("FILE", str(tmp_path / "taken")) for a in args]
    if "-o" not in args:
        args += ["-o", str(tmp_path / "out")]
    done = subprocess.run([EXE, "explain", str(photo), *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1  # one line, no traceback
    assert not (tmp_path / "out").exists()


# ---- never over an input, never its own outputs -------------------------------------------------------


def _explain_cli(checkpoint: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EXE, "explain", *args, "-t", "memorability", "--checkpoint", str(checkpoint), "--device", "cpu"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_explain_refuses_to_write_over_an_input_with_an_output_name(release_checkpoints, tmp_path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    sample("astronaut.png").resize((96, 64)).save(photos / "a.jpg")
    sample("coffee.png").resize((64, 64)).save(photos / "a.memorability.relevance.png")  # a user's photo
    before = _contents(photos)
    ckpt = release_checkpoints["memorability"][0]
    for args in (
        [str(photos), "-o", str(photos)],  # the folder walked is the output folder
        [str(photos / "a.jpg"), str(photos / "a.memorability.relevance.png"), "-o", str(photos)],
    ):
        done = _explain_cli(ckpt, *args)
        assert done.returncode == 2, done.stderr
        assert "would overwrite the input" in done.stderr and "a.memorability.relevance.png" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
        assert _contents(photos) == before  # byte for byte, and nothing added


@pytest.mark.slow
def test_explain_into_the_photo_folder_explains_only_the_photos_and_a_rerun_is_refused(
    release_checkpoints, tmp_path
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    sample("astronaut.png").resize((96, 64)).save(photos / "a.jpg")
    original = (photos / "a.jpg").read_bytes()
    ckpt = release_checkpoints["memorability"][0]
    done = _explain_cli(ckpt, str(photos), "-o", str(photos))
    assert done.returncode == 0, done.stderr
    assert sorted(_contents(photos)) == ["a.jpg", "a.memorability.relevance.png"]
    assert done.stderr.count(" -> ") == 1  # the heatmap written in this run was not explained in it
    heatmap = (photos / "a.memorability.relevance.png").read_bytes()
    again = _explain_cli(ckpt, str(photos), "-o", str(photos))  # the heatmap is now an input
    assert again.returncode == 2 and "would overwrite the input" in again.stderr, again.stderr
    assert (photos / "a.jpg").read_bytes() == original
    assert (photos / "a.memorability.relevance.png").read_bytes() == heatmap


@pytest.mark.slow
def test_explain_into_a_folder_inside_the_input_never_explains_its_outputs(release_checkpoints, tmp_path):
    photos = tmp_path / "p2"
    (photos / "sub").mkdir(parents=True)
    sample("astronaut.png").resize((96, 64)).save(photos / "a.jpg")
    sample("coffee.png").resize((64, 64)).save(photos / "sub" / "b.png")
    before = _contents(photos)
    ckpt = release_checkpoints["memorability"][0]
    for run in range(2):  # the second run finds the first run's heatmaps under the folder it walks
        done = _explain_cli(ckpt, str(photos), "-o", str(photos / "heat"), "--raw")
        assert done.returncode == 0, (run, done.stderr)
        assert done.stderr.count(" -> ") == 2, (run, done.stderr)
        assert sorted(p.name for p in (photos / "heat").iterdir()) == [
            "a.memorability.relevance.npy", "a.memorability.relevance.png",
            "b.memorability.relevance.npy", "b.memorability.relevance.png",
        ]  # fmt: skip
        assert {k: v for k, v in _contents(photos).items() if not k.startswith("heat")} == before

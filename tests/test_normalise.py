"""The scoring path's normalisation (``preprocess.Normalizer``, used by ``predict``) against the reference
``preprocess.normalize``: the same bits in every precision, and the same raw outputs, with its buffers
reused from call to call and never shared between threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from perceptscore.batches import decode_item
from perceptscore.checkpoints import load_model
from perceptscore.items import Item
from perceptscore.locators import locate
from perceptscore.predict import Predictor, raw_outputs
from perceptscore.preprocess import Normalizer, normalize
from perceptscore.tasks import get_task

CLIP = get_task("memorability").architecture
DTYPES = [None, torch.float32, torch.float16, torch.bfloat16]


def pixels(n: int, side: int = 16, seed: int = 0, channels_last: bool = True) -> torch.Tensor:
    """Random uint8 crops with every value 0..255 present (the extremes round differently in fp16), laid
    out (n, H, W, 3) in memory as decoded crops are (``preprocess.crops_of``), or contiguous (n, 3, H, W)
    as the Ray engine rebuilds them from bytes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, side, side, 3), dtype=torch.uint8, generator=g)
    x.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)
    x = x.permute(0, 3, 1, 2)
    return x if channels_last else x.contiguous()


def test_decoded_crops_are_channels_last_in_memory(photo_dir) -> None:
    """What the layout tests below rest on: the crops the decoders hand over are (H, W, 3) in memory."""
    task = get_task("memorability")
    d = decode_item(Item(0, locate(str(photo_dir / "a_square.jpg"))), [task.preprocess], None)
    crops = torch.from_numpy(d.pixels[task.preprocess])
    assert crops.shape == (1, 3, 224, 224) and crops.stride() == pixels(1, side=224).stride()


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_normalizer_gives_normalize_bits(dtype: torch.dtype | None, channels_last: bool) -> None:
    norm = Normalizer(CLIP.mean, CLIP.std)
    for n, seed in [(5, 0), (2, 1), (7, 2)]:  # shrink into the buffer, then grow it
        x = pixels(n, seed=seed, channels_last=channels_last)
        got, want = norm(x, dtype), normalize(x, CLIP.mean, CLIP.std, dtype)
        assert got.dtype == want.dtype == (dtype or torch.float32)
        assert got.shape == want.shape == (n, 3, 16, 16)
        # the model gets the layout it got before: a convolution's kernel can depend on it
        assert got.stride() == want.stride() == x.stride()
        assert torch.equal(got, want)  # max abs difference 0: the same operations in the same order


def test_normalizer_reuses_its_buffer_and_survives_inference_mode() -> None:
    norm = Normalizer(CLIP.mean, CLIP.std)
    with torch.inference_mode():  # as raw_outputs calls it
        first = norm(pixels(4, seed=0), torch.bfloat16)
        first_ptr = first.data_ptr()
    second = norm(pixels(3, seed=1), torch.bfloat16)  # outside: the buffer made inside is still writable
    assert second.data_ptr() == first_ptr  # no new memory for a batch that fits the one held
    assert torch.equal(second, normalize(pixels(3, seed=1), CLIP.mean, CLIP.std, torch.bfloat16))


def test_normalizer_threads_do_not_share_a_buffer() -> None:
    norm = Normalizer(CLIP.mean, CLIP.std)
    results: dict[int, torch.Tensor] = {}
    barrier = threading.Barrier(2)

    def work(seed: int) -> None:
        out = norm(pixels(6, seed=seed))
        barrier.wait()  # both results held at once: one buffer would hold only the later one's values
        results[seed] = out.clone()

    threads = [threading.Thread(target=work, args=(seed,)) for seed in (3, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seed, got in results.items():
        assert torch.equal(got, normalize(pixels(6, seed=seed), CLIP.mean, CLIP.std))


def reference_raw(
    model: torch.nn.Module, crops: torch.Tensor, crops_per_image: int, batch: int
) -> np.ndarray:
    """raw_outputs as it was: the whole batch normalised at once by ``normalize``, then the model's chunks."""
    with torch.inference_mode():
        x = normalize(crops, CLIP.mean, CLIP.std, torch.float32)
        out = torch.cat([model(chunk).float() for chunk in x.split(batch)])
    return out.view(-1, crops_per_image, out.shape[-1]).mean(dim=1).numpy()


@pytest.mark.parametrize("task_name", ["quality", "emotion"])
def test_raw_outputs_equal_the_reference_on_real_photos(
    task_name: str, release_checkpoints, photo_dir
) -> None:
    """fp32 CPU, tiny random release model, real photos decoded as scoring decodes them; chunks of 4 crops
    cut across images (quality takes 15 crops an image)."""
    task = get_task(task_name)
    path, release = release_checkpoints[task_name]
    model = load_model(task_name, path, device="cpu", precision="fp32")
    photos = sorted(p for p in photo_dir.iterdir() if p.suffix.lower() in {".jpg", ".png"})[:3]
    decoded = [decode_item(Item(i, locate(str(p))), [task.preprocess], None) for i, p in enumerate(photos)]
    assert all(d.error is None for d in decoded)
    crops = torch.from_numpy(np.concatenate([d.pixels[task.preprocess] for d in decoded]))
    norm = Normalizer(CLIP.mean, CLIP.std)
    got = raw_outputs(model, task, crops, torch.device("cpu"), torch.float32, 4, norm)
    again = raw_outputs(model, task, crops, torch.device("cpu"), torch.float32, 4, norm)  # reused buffers
    want = reference_raw(model, crops, task.preprocess.crops, 4)
    assert got.shape == (3, task.outputs)
    assert float(np.abs(got - want).max()) == 0.0
    assert np.array_equal(again, got)
    # and the release's own model on the reference input, as the 1e-4 contract reads
    with torch.inference_mode():
        x = normalize(crops, CLIP.mean, CLIP.std)
        theirs = release(x).view(3, task.preprocess.crops, -1).mean(dim=1).numpy()
    assert float(np.abs(got - theirs).max()) <= 1e-5


def test_predictor_rows_use_the_same_bits_in_bf16(release_checkpoints) -> None:
    """A Predictor (the scoring engines' model side) in bf16: its raw values equal the reference's."""
    task = get_task("memorability")
    model = load_model("memorability", release_checkpoints["memorability"][0], precision="bf16")
    predictor = Predictor([task], {task.name: model}, torch.device("cpu"), torch.bfloat16, 3)
    crops = pixels(7, side=224, seed=5)
    batch = predictor.rows([f"{i}.jpg" for i in range(7)], [None] * 7, [None] * 7, {task.preprocess: crops})
    with torch.inference_mode():
        x = normalize(crops, CLIP.mean, CLIP.std, torch.bfloat16)
        want = torch.cat([model(c).float() for c in x.split(3)]).numpy()[:, 0]
    got = batch.column("memorability").to_numpy()
    assert float(np.abs(got - want).max()) == 0.0

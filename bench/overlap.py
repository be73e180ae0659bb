"""The GPU overlapped with the scoring process (issue 25, item 3), measured on CPU with a stand-in device.

    python bench/overlap.py [--images 400] [--workers 1] [--batch-size 16] [--device-ms 40] [--repeats 3]

A GPU computes a batch while the scoring process goes on: the engines submit batch N+1
(``Predictor.submit``) before they wait for batch N's rows. Without a GPU here, the stand-in device is a
clock: ``submit`` scores the batch with the minimal random model (the real rows) and books ``--device-ms``
on one device (the kernels' time, after the last batch's, the CPU free meanwhile, as on a GPU);
``result`` waits until then. The ``serial`` variant waits at once (``submit(batch).result()``: what the
engines did before). Both run the real local engine (``Scorer.score``, decode workers, batching, row
assembly) on the same loose JPEGs.

Per batch, the scoring process needs S ms of its own (reading the workers' batch, the stand-in's real
forward, which a GPU would only queue, so S is an upper bound; the rows) and the device G ms: serial costs
S + G, overlapped max(S, G) (when the workers decode fast enough). It prints both times, their ratio, S
measured with ``--device-ms 0``, and the serial share S / (S + G). Interleaved rounds, medians; ratios
per round.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from inputs import MODELS  # noqa: E402
from overhead import photo_bytes  # noqa: E402

from perceptscore.batches import Batch  # noqa: E402
from perceptscore.predict import Pending, Predictor  # noqa: E402
from perceptscore.scorer import Scorer  # noqa: E402

from release_reference import make_release_checkpoint  # noqa: E402


class StandInDevice:
    """Wraps a Predictor: a batch's rows are ready ``seconds`` after its submit (a thread's timer), as a
    GPU's would be; ``serial`` waits for them inside submit."""

    def __init__(self, inner: Predictor, seconds: float, serial: bool) -> None:
        self.inner, self.seconds, self.serial = inner, seconds, serial
        self.specs, self.tasks = inner.specs, inner.tasks
        self.free_at = 0.0  # one device: a batch's kernels start when the last one's have ended

    def submit(self, batch: Batch) -> Pending:
        rows = self.inner.submit(batch).result()
        done_at = max(time.perf_counter(), self.free_at) + self.seconds
        self.free_at = done_at

        def result() -> object:
            time.sleep(max(0.0, done_at - time.perf_counter()))
            return rows

        pending = Pending(result)  # type: ignore[arg-type]
        if self.serial:
            pending.result()
        return pending

    def __call__(self, batch: Batch) -> object:
        return self.submit(batch).result()


def timed(scorer: Scorer, inputs: list[str], seconds: float, serial: bool) -> float:
    inner = scorer.predictor
    stand_in = StandInDevice(inner, seconds, serial)
    scorer.engine.make_predictor = lambda _: stand_in  # type: ignore[assignment,return-value]
    start = time.perf_counter()
    frame = scorer.score(inputs)
    took = time.perf_counter() - start
    scorer.engine.make_predictor = lambda _: inner  # type: ignore[assignment]
    assert frame["error"].isna().all() and len(frame) == len(inputs)
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device-ms", type=float, default=40.0)
    parser.add_argument("--repeats", type=int, default=3)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        paths = []
        for n, data in enumerate(photo_bytes(opts.images)):
            (work / f"{n:05d}.jpg").write_bytes(data)
            paths.append(str(work / f"{n:05d}.jpg"))
        checkpoint = work / "minimal.pth"
        make_release_checkpoint(checkpoint, 1, MODELS["minimal"], seed=0)
        scorer = Scorer(["memorability"], {"memorability": str(checkpoint)}, device="cpu",
                        batch_size=opts.batch_size, workers=opts.workers)  # fmt: skip
        g = opts.device_ms / 1000
        timed(scorer, paths, g, True)  # warm-up: page cache, worker start-up paths
        rounds: dict[str, list[float]] = {"own (device 0 ms)": [], "serial": [], "overlapped": []}
        for _ in range(opts.repeats):
            rounds["own (device 0 ms)"].append(timed(scorer, paths, 0.0, True))
            rounds["serial"].append(timed(scorer, paths, g, True))
            rounds["overlapped"].append(timed(scorer, paths, g, False))
    batches = -(-opts.images // opts.batch_size)
    print(f"{opts.images} JPEGs 640x480, batches of {opts.batch_size}, {opts.workers} decode worker(s), "
          f"stand-in device {opts.device_ms:.0f} ms a batch; medians of {opts.repeats} rounds")  # fmt: skip
    print(f"{'run':<22}{'seconds':>9}{'ms/batch':>10}")
    for name, values in rounds.items():
        median = statistics.median(values)
        print(f"{name:<22}{median:>9.2f}{1000 * median / batches:>10.1f}")
    ratios = [s / o for s, o in zip(rounds["serial"], rounds["overlapped"], strict=True)]
    own = 1000 * statistics.median(rounds["own (device 0 ms)"]) / batches
    share = own / (own + opts.device_ms)
    print(f"overlapped / serial speed-up: {statistics.median(ratios):.2f}x (rounds {min(ratios):.2f}-"
          f"{max(ratios):.2f}); the scoring process's own share S/(S+G) = {share:.0%}")  # fmt: skip


if __name__ == "__main__":
    main()

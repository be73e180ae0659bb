"""Decoder faults for the tests, in processes the tests cannot patch: isolated decoder children and the
Ray workers that start them. Python imports this at start-up when this folder is on PYTHONPATH; it acts
only when PERCEPTSCORE_TEST_DECODER_FAULTS=1. A file whose name holds "crash-the-decoder" kills its
decoding process with SIGSEGV (what a decoder bug in C does); "hang-the-decoder" never returns."""

import os

if os.environ.get("PERCEPTSCORE_TEST_DECODER_FAULTS") == "1":
    import signal
    import time

    import perceptscore.images

    _real_decode = perceptscore.images.decode

    def _faulty_decode(f, *args, **kwargs):  # type: ignore[no-untyped-def]
        name = os.path.basename(str(getattr(f, "name", "")))
        if "crash-the-decoder" in name:
            os.kill(os.getpid(), signal.SIGSEGV)
        if "hang-the-decoder" in name:
            time.sleep(3600)
        return _real_decode(f, *args, **kwargs)

    perceptscore.images.decode = _faulty_decode  # before perceptscore.batches imports it by name

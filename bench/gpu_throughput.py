"""Replaced by bench/gpu_check.py (issue 25): the same speeds plus CPU-checked precision and CLI runs."""

raise SystemExit("bench/gpu_throughput.py is replaced by bench/gpu_check.py: see bench/README.md")

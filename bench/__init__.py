"""Benchmarks: each module is a script (`python -m bench.NAME`, or `python bench/NAME.py` for
the single-file ones) that prints or writes figures measured side by side in one run."""

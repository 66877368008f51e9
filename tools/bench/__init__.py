"""Machinery of ``tools/benchmark.py``: arms, data subsets, the two routes, cost measurement, report."""

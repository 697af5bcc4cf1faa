"""Benchmarks of colorquant_ops (``python -m benchmarks``, ``make bench``); see :mod:`benchmarks.main`."""

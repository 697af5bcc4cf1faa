"""Kernel micro-benchmarks of colorquant_ops (``python -m benchmarks``)."""

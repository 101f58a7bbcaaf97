"""Benchmark problems and the runner behind ``python -m pydiffbridge bench``."""

"""Benchmarks: one script per anchor comparison (see _common.py)."""

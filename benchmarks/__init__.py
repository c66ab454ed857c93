"""Benchmarks: one runner for every backend (sdtrt's and the diffusers peers), rows as JSONL, a table and a plot.

Run ``python -m benchmarks.run --help`` (or ``make bench``).
"""

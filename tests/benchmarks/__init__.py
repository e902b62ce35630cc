"""Benchmarks: `make bench` or `python -m tests.benchmarks NAME` (never part of `make test`).

Each `bench_NAME.py` has `main() -> dict`, measures the workbench and a plain baseline on the
same work in one run, and reports through `report()`.
"""

"""Benchmarks: load generator, in-process limit, and the side-by-side report.

A tool, not a test: nothing here runs in ``make test`` beyond a smoke test of the tool.
"""

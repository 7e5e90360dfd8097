"""Benchmarks of relexd: ingest cost, the paper's batch baseline, accuracy, preview writes.

Run everything with ``python -m bench.run_all [--quick]``; see bench/README.md for the results.
"""

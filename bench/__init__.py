"""Benchmark harness of the Orchestrator: the seven figures of BRIEF §4 beside same-run baselines.

Run with ``python -m bench`` (``make bench``) or ``python -m bench --quick`` (``make bench-quick``).
"""

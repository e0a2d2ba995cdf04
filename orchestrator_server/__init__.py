"""Orchestrator server: the control plane agents register with, stay connected to and get work from."""

__version__ = "0.1.0"

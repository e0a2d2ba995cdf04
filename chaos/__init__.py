"""`make chaos`: SIGKILL the orchestrator under SDK agents and a steady submitter, then count what
was lost, left unfinished, completed twice or run again. See docs/RELIABILITY.md."""

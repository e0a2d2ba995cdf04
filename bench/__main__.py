"""Entry point: ``python -m bench``."""

# The guard matters: multiprocessing's spawn start method re-imports the main module in every worker.
if __name__ == "__main__":
    from bench.cli import main

    raise SystemExit(main())

"""A local cluster to try replicas with: a throwaway PostgreSQL and several `orchestrator serve`.

`python -m local_cluster` (what `make cluster` runs) starts them on loopback and stops them on
Ctrl-C; `local_cluster.postgres` is the throwaway PostgreSQL, which the test suite uses too.
"""

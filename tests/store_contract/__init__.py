"""The store contract: what every backend of `orchestrator_server.store.Store` must do."""

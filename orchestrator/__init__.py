"""Generated from proto/orchestrator/v1 by `make proto`; do not edit."""

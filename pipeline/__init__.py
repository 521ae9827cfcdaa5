"""Pure document logic and model runtime: no database, no queue, no HTTP."""

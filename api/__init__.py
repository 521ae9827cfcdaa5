"""FastAPI app: thin routes over storage and workers. Never imports torch."""

"""The serving engine's torch-free core: request types, the KV block pool and its prefix cache, the
KV manager (block tables per request) and the scheduler. Nothing here imports torch, so all of it is
tested on CPU in plain Python; pipeline/engine/runner.py turns a step plan into tensors."""

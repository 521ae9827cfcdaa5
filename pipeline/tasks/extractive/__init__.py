"""The extractive backend (CPU, offline) and its task strategies: no generation, every output is text
of the document itself, cited by pages and char offsets.

backend.py   ExtractiveBackend: sentence embeddings (all-MiniLM-L6-v2) with a per-document cache
segments.py  documents -> citable sentence-sized segments (torch-free)
summarize.py, qa.py, classify.py   the strategies the registry names for engine kind "extractive"

Importing this package imports nothing heavy; backend.py imports torch.
"""

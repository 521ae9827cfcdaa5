"""The MPT task strategies: summarize, qa and classify on the serving engine's shared document prefix.

Each task module exposes `run(engine, doc, params, progress) -> dict` (the registry calls it for
engine kind "mpt"); `engine.serving` is the ServingEngine (submit / tokenizer / max_model_len /
model_name). Prompts are built at the token level, document first (prompts.py), so every request of
one document starts with the same token ids and the engine prefills that prefix once. Which strategy
ran is in the result's `method`: "whole_document" when document + instructions + output fit the
context, else "map_reduce" (summarize), "retrieval" (qa) or "leading_retrieval" (classify).
"""

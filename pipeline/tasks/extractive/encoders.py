"""Sentence encoders for the extractive backend: token ids -> mean-pooled, L2-normalized embeddings.

Two runtimes for the same all-MiniLM-L6-v2 weights, chosen at load:
- ONNX Runtime (preferred): the model exported once per machine to an ONNX file cached under
  ~/.cache/longdoc/onnx (keyed by the weights, the library versions and the export recipe), its
  attention fused by ONNX Runtime's transformer optimizer (_export), then run by onnxruntime.
  Measured on the dev box: ~1.4x less CPU per segment than torch, identical embeddings (cosine
  1.0000000 on 128 corpus segments), and a backend that loads without importing torch once the file
  exists. onnxruntime's worker threads do not spin while idle, so CPU freed between batches goes to
  the parse children sharing the machine (see bench/RESULTS.md on embedded vs service mode).
- torch + transformers (fallback when onnxruntime or the exporter is missing).

Tokenization uses the `tokenizers` library directly (the model's tokenizer.json), for both.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

MAX_INPUT_TOKENS = 256  # the model's own limit (sentence_bert_config.json)
ONNX_CACHE = Path.home() / ".cache" / "longdoc" / "onnx"
EXPORT_VERSION = "eager-fused-1"  # what _export writes; part of the cache key, so a new recipe re-exports
FUSED_TOLERANCE = 1e-4  # the fused graph's hidden states must match the plain export's this closely


class Tokens:
    """The model's WordPiece tokenizer (tokenizers library), truncating at MAX_INPUT_TOKENS."""

    def __init__(self, model_dir: Path) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=MAX_INPUT_TOKENS)

    def ids(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids, [CLS] ... [SEP], truncated at MAX_INPUT_TOKENS."""
        return [e.ids for e in self.tokenizer.encode_batch(texts)]

    @staticmethod
    def pad(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """input_ids and attention_mask [B, T] int64, padded to the longest row."""
        width = max(len(r) for r in rows)
        ids = np.zeros((len(rows), width), dtype=np.int64)  # [B, T], 0 = [PAD]
        mask = np.zeros((len(rows), width), dtype=np.int64)  # [B, T]
        for row, r in enumerate(rows):
            ids[row, :len(r)] = r
            mask[row, :len(r)] = 1
        return ids, mask

    def batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """input_ids and attention_mask [B, T] int64, padded to the batch's longest text."""
        return self.pad(self.ids(texts))

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)


def _pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean over real tokens, then L2 normalization: [B, T, D], [B, T] -> [B, D] (sentence-transformers'
    pooling for this model)."""
    weights = mask[..., None].astype(np.float32)  # [B, T, 1]
    pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)  # [B, D]
    return pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-9, None)


class OnnxEncoder:
    runtime = "onnxruntime"

    def __init__(self, onnx_path: Path) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.inter_op_num_threads = 1
        # ORT's default (0) ran one thread on the 2-core dev box (CPU time = wall time); the cores this
        # process may use halve an idle machine's wall time, and cost ~10% more CPU under load
        options.intra_op_num_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        hidden = self.session.run(None, {"input_ids": ids, "attention_mask": mask})[0]  # [B, T, D]
        return _pool(hidden, mask).astype(np.float32)


class TorchEncoder:
    runtime = "torch"

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoModel

        self.model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()

    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            hidden = self.model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
            return _pool(hidden.last_hidden_state.float().numpy(), mask)  # [B, T, D] -> [B, D]


def _onnx_path(model_dir: Path) -> Path:
    import onnxruntime

    weights = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin"))
    key = hashlib.sha256(repr([(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in weights]
                              + [onnxruntime.__version__, EXPORT_VERSION]).encode()).hexdigest()[:16]
    return ONNX_CACHE / f"{model_dir.name}-{key}.onnx"


def _export(model_dir: Path, target: Path) -> None:
    """Export the encoder to ONNX (torch's exporter), atomically: concurrent loaders never see half a file.

    Attention is exported in its eager form, which ONNX Runtime's transformer optimizer fuses (for BERT
    models: one Attention operator per layer that reads the real lengths from the mask, fused embedding
    and skip layer norms, bias + GELU). Measured on the contract bench's batches: 8-15% less wall time
    than the SDPA export, hidden states within 2e-7 of it, and a text's embedding identical (max abs
    difference 0) batched or alone. The fused graph is kept only when it matches the plain one."""
    import torch
    from transformers import AutoModel

    class LastHidden(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    model = AutoModel.from_pretrained(model_dir, local_files_only=True, attn_implementation="eager").eval()
    ids = torch.ones((1, 8), dtype=torch.int64)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.partial")
    axes = {0: "batch", 1: "tokens"}
    torch.onnx.export(LastHidden(model), (ids, torch.ones_like(ids)), str(partial), dynamo=False,
                      input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                      dynamic_axes={"input_ids": axes, "attention_mask": axes, "last_hidden_state": axes},
                      opset_version=17)
    if model.config.model_type == "bert":
        _fuse(partial, model.config.num_attention_heads, model.config.hidden_size)
    os.replace(partial, target)


def _fuse(path: Path, heads: int, hidden: int) -> None:
    """Replace the exported file at `path` by its ORT-fused form when that computes the same hidden states."""
    import onnxruntime as ort
    from onnxruntime.transformers import optimizer

    fused_path = path.with_suffix(".fused")
    try:
        optimizer.optimize_model(str(path), model_type="bert", num_heads=heads, hidden_size=hidden,
                                 opt_level=0).save_model_to_file(str(fused_path))
        rng = np.random.default_rng(0)
        ids = rng.integers(1000, 20000, (3, 24), dtype=np.int64)  # [B, T] with padding in two rows
        mask = np.ones_like(ids)
        mask[1, 17:], mask[2, 5:] = 0, 0
        plain, fused = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(
            None, {"input_ids": ids, "attention_mask": mask})[0] for p in (path, fused_path))  # [B, T, D]
        real = mask.astype(bool)  # padded positions' states are never pooled
        if np.abs(plain[real] - fused[real]).max() <= FUSED_TOLERANCE:
            os.replace(fused_path, path)
        else:
            log.warning("the fused ONNX graph differs from the plain export; keeping the plain one")
    except Exception as exc:  # noqa: BLE001 - fusion is an optimization: the plain export still works
        log.warning("ONNX Runtime could not fuse the encoder graph, keeping the plain export: %s", exc)
    finally:
        fused_path.unlink(missing_ok=True)


def load_encoder(model_dir: Path, runtime: str = "auto") -> OnnxEncoder | TorchEncoder:
    """runtime: "auto" (ONNX Runtime when it and the exporter work, else torch), "onnx" or "torch"."""
    if runtime in ("auto", "onnx"):
        try:
            path = _onnx_path(model_dir)
            if not path.is_file():
                log.info("exporting %s to ONNX (once per machine): %s", model_dir.name, path)
                _export(model_dir, path)
            return OnnxEncoder(path)
        except Exception as exc:  # noqa: BLE001 - any failure means "use torch"
            if runtime == "onnx":
                raise
            log.warning("ONNX Runtime unavailable for %s, using torch: %s", model_dir.name, exc)
    return TorchEncoder(model_dir)

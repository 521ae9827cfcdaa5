"""Attention backend registry.

A backend is a module ``pipeline.engine.backends.<name>`` exposing
``is_available(device: torch.device) -> bool`` and at least one of ``prefill`` / ``decode`` with the
signatures documented in pipeline/engine/attention.py. Modules that are missing or fail to import
(e.g. flash-attn-4 not installed) are skipped, so selection follows what is installed.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

import torch

from pipeline.engine.attention import AttentionBackend

log = logging.getLogger(__name__)

# Preference order per device type. fa4 (flash-attn-4 CuTe DSL, sm90), then flash-attn 2 (native
# alibi_slopes, sm80+), beat FlexAttention for prefill. For decode, the Triton split-K kernel (ALiBi
# inline, no bias row) edged out SDPA with a per-sequence bias row inside the H200 decode step (4.38 vs
# 4.44 ms/token at 4K, 11.70 vs 11.77 at 65K; bench/NOTES.md run 11); SDPA where Triton is absent.
PREFILL_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("fa4", "fa2", "flex", "blockwise"),
    "cpu": ("blockwise",),
}
DECODE_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("splitk", "sdpa", "fa2", "flex", "blockwise"),
    "cpu": ("blockwise",),
}


class BackendUnavailable(RuntimeError):
    """The requested attention backend is not installed or does not run on this device."""


def _load(name: str, device: torch.device) -> ModuleType | None:
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except ImportError as exc:  # the backend's own dependency (flash_attn, triton, ...) is absent
        log.debug("attention backend %s not importable: %s", name, exc)
        return None
    try:
        ok = bool(module.is_available(device))
    except Exception as exc:  # a probe that fails means "not usable here", never a crash
        log.warning("attention backend %s availability probe failed: %s", name, exc)
        return None
    return module if ok else None


def _first(order: tuple[str, ...], kind: str, device: torch.device) -> tuple[str, ModuleType]:
    for name in order:
        module = _load(name, device)
        if module is not None and hasattr(module, kind):
            return name, module
    raise BackendUnavailable(f"no {kind} attention backend available for {device} (tried {order})")


def select_backend(device: torch.device | str, prefer: str | None = None) -> AttentionBackend:
    """Pick prefill and decode kernels for `device` (CPU: blockwise; CUDA: the first available in
    PREFILL_ORDER / DECODE_ORDER); `prefer` forces a backend for prefill (and for decode too when that
    module implements decode)."""
    device = torch.device(device)
    kind = device.type if device.type in PREFILL_ORDER else "cpu"
    if prefer is not None:
        module = _load(prefer, device)
        if module is None or not hasattr(module, "prefill"):
            raise BackendUnavailable(f"attention backend {prefer!r} is not available on {device}")
        prefill_name, prefill_mod = prefer, module
        if hasattr(module, "decode"):
            decode_name, decode_mod = prefer, module
        else:
            decode_name, decode_mod = _first(DECODE_ORDER[kind], "decode", device)
    else:
        prefill_name, prefill_mod = _first(PREFILL_ORDER[kind], "prefill", device)
        decode_name, decode_mod = _first(DECODE_ORDER[kind], "decode", device)
    name = prefill_name if prefill_name == decode_name else f"{prefill_name}+{decode_name}"
    return AttentionBackend(
        name=name,
        prefill=prefill_mod.prefill,
        decode=decode_mod.decode,
        prefill_name=prefill_name,
        decode_name=decode_name,
        compile_prefill=getattr(prefill_mod, "compile_kernels", None),
    )

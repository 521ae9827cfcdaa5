"""HF transformers' MptForCausalLM over the SAME weights as our engine (the seed's recipe, measured side
by side in bench/engine.py). Parameters are aliased, not copied, so both fit on one GPU."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from pipeline.engine.model import Mpt


def hf_config(model: Mpt) -> Any:
    from transformers import MptConfig

    cfg = model.config
    if cfg.alibi_bias_max != 8:
        # HF's MPT always builds slopes with alibi_bias_max=8: a comparison at 16 would compare two models
        raise ValueError("compare with HF only at alibi_bias_max=8 (HF ignores the checkpoint's value)")
    return MptConfig(
        d_model=cfg.d_model,
        n_heads=cfg.n_heads,
        n_layers=cfg.n_layers,
        expansion_ratio=cfg.expansion_ratio,
        max_seq_len=cfg.max_seq_len,
        vocab_size=cfg.vocab_size,
        no_bias=cfg.no_bias,
        attn_config={"alibi": True, "alibi_bias_max": 8, "attn_type": "multihead_attention"},
    )


def hf_model(model: Mpt, *, dtype: torch.dtype | None = None) -> nn.Module:
    """MptForCausalLM whose parameters are our model's tensors (dtype None) or float copies of them."""
    from transformers import MptForCausalLM

    with torch.device("meta"):
        hf = MptForCausalLM(hf_config(model))
    ours = dict(model.named_parameters())
    for name, _ in list(hf.named_parameters()):
        if name == "lm_head.weight":
            continue
        src = ours[name.removeprefix("transformer.")]
        value = src if dtype is None else src.detach().to(dtype)
        owner_path, _, leaf = name.rpartition(".")
        hf.get_submodule(owner_path)._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    hf.lm_head.weight = hf.transformer.wte.weight  # tied, as MPT ships
    leftover = [n for n, t in list(hf.named_parameters()) + list(hf.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"HF model has tensors without values: {leftover[:3]}")
    return hf.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def last_logits(hf: nn.Module, ids: torch.Tensor, last: int = 1) -> torch.Tensor:
    return hf(ids, use_cache=False).logits[:, -last:].float()


@torch.inference_mode()
def time_prefill(hf: nn.Module, ids: torch.Tensor) -> dict[str, Any]:
    """The anchor's recipe: one warm-up, one timed forward (full logits, as HF computes them)."""
    device = ids.device
    try:
        hf(ids, use_cache=False).logits[:, -1].float()
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        hf(ids, use_cache=False).logits[:, -1].float()
        sync(device)
        seconds = time.perf_counter() - start
    except torch.OutOfMemoryError:
        return {"s": "OOM"}
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    return {"s": round(seconds, 4), "peak_gb": None if peak is None else round(peak, 1)}


@torch.inference_mode()
def time_decode(hf: nn.Module, ids: torch.Tensor, new_tokens: int = 32) -> dict[str, Any]:
    """ms/token of model.generate(use_cache=True): (time for 8 + n tokens - time for 8) / n."""
    device = ids.device

    def run(n: int) -> float:
        sync(device)
        start = time.perf_counter()
        hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True)
        sync(device)
        return time.perf_counter() - start

    try:
        run(4)
        short, long = run(8), run(8 + new_tokens)
    except torch.OutOfMemoryError:
        return {"ms_per_token": "OOM"}
    return {"ms_per_token": round((long - short) / new_tokens * 1e3, 3)}

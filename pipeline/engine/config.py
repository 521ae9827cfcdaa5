"""MptConfig: the fields of an HF-format MPT config.json that the engine honours, plus ALiBi slopes."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


class UnsupportedConfig(ValueError):
    """The checkpoint asks for an MPT variant this engine does not implement."""


@dataclass(frozen=True)
class MptConfig:
    d_model: int
    n_heads: int
    n_layers: int
    vocab_size: int
    expansion_ratio: float = 4
    max_seq_len: int = 2048
    alibi_bias_max: float = 8
    clip_qkv: float | None = None
    qk_ln: bool = False
    softmax_scale: float | None = None
    no_bias: bool = True
    tie_word_embeddings: bool = True
    low_precision_layernorm: bool = True
    layer_norm_epsilon: float = 1e-5
    logit_scale: float | None = None
    eos_token_id: int | None = None

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        return int(self.expansion_ratio * self.d_model)

    @property
    def scale(self) -> float:
        return self.softmax_scale if self.softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], *, max_seq_len: int | None = None) -> MptConfig:
        """Build from a parsed config.json; `max_seq_len` may only raise the checkpoint's value
        (ALiBi extrapolates; StoryWriter's card runs 83,968 tokens)."""
        attn = dict(raw.get("attn_config") or {})
        if not attn.get("alibi", True):
            raise UnsupportedConfig("only ALiBi MPT checkpoints are supported (attn_config.alibi is false)")
        if attn.get("attn_type", "multihead_attention") != "multihead_attention":
            raise UnsupportedConfig(f"attn_type {attn.get('attn_type')!r} is not supported (multihead only)")
        if attn.get("prefix_lm"):
            raise UnsupportedConfig("prefix-LM MPT checkpoints are not supported")
        ffn_type = (raw.get("ffn_config") or {}).get("ffn_type", "mptmlp")
        if ffn_type != "mptmlp":
            raise UnsupportedConfig(f"ffn_type {ffn_type!r} is not supported")
        d_model, n_heads = int(raw["d_model"]), int(raw["n_heads"])
        if d_model % n_heads:
            raise UnsupportedConfig(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        seq = int(raw.get("max_seq_len", 2048))
        if max_seq_len is not None:
            if max_seq_len < seq:
                raise ValueError(f"max_seq_len may only be raised ({max_seq_len} < checkpoint's {seq})")
            seq = max_seq_len
        logit_scale = raw.get("logit_scale")
        if logit_scale == "inv_sqrt_d_model":
            logit_scale = 1.0 / math.sqrt(d_model)
        eos = raw.get("eos_token_id")
        return cls(
            d_model=d_model,
            n_heads=n_heads,
            n_layers=int(raw["n_layers"]),
            vocab_size=int(raw["vocab_size"]),
            expansion_ratio=raw.get("expansion_ratio", 4),
            max_seq_len=seq,
            alibi_bias_max=attn.get("alibi_bias_max", 8),
            clip_qkv=attn.get("clip_qkv"),
            qk_ln=bool(attn.get("qk_ln", False)),
            softmax_scale=attn.get("softmax_scale"),
            no_bias=bool(raw.get("no_bias", True)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
            low_precision_layernorm=raw.get("norm_type", "low_precision_layernorm") == "low_precision_layernorm",
            layer_norm_epsilon=float(raw.get("layer_norm_epsilon", 1e-5)),
            logit_scale=None if logit_scale is None else float(logit_scale),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
        )

    @classmethod
    def from_json(cls, path: Path, *, max_seq_len: int | None = None) -> MptConfig:
        return cls.from_hf_dict(json.loads(Path(path).read_text()), max_seq_len=max_seq_len)


def alibi_slopes(n_heads: int, alibi_bias_max: float = 8, device: torch.device | str | None = None) -> torch.Tensor:
    """Per-head ALiBi slopes [n_heads] float32, as llm-foundry's `gen_slopes` computes them.

    Slopes are 2^-(i * alibi_bias_max / n) for i = 1..n over the next power of two n; for a head count
    that is not a power of two, llm-foundry (and FasterTransformer, HF) keep the odd-indexed slopes
    first, then the even-indexed ones, truncated to n_heads.
    """
    padded = 2 ** math.ceil(math.log2(n_heads))
    m = torch.arange(1, padded + 1, dtype=torch.float32, device=device) * (alibi_bias_max / padded)
    slopes = 1.0 / torch.pow(2, m)
    if padded != n_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:n_heads]
    return slopes

"""MPT in plain PyTorch: embedding, pre-norm blocks (LayerNorm, fused Wqkv, ALiBi attention, GELU MLP),
final norm, tied LM head. Parameter names match HF checkpoints minus the "transformer." prefix."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.engine import fused, gemv
from pipeline.engine.attention import AttentionBackend
from pipeline.engine.cache import KVCache
from pipeline.engine.config import MptConfig, alibi_slopes
from pipeline.engine.metadata import DecodeMeta, PrefillMeta


class LayerCache(Protocol):
    """One layer of a KV cache (cache.DenseLayer, paged_cache.PagedLayer): the only code that knows
    where K/V live."""

    def write_prefill(self, k: torch.Tensor, v: torch.Tensor, meta: PrefillMeta) -> None: ...
    def prefill_kv(self, meta: PrefillMeta) -> tuple[torch.Tensor, torch.Tensor]: ...
    def write_decode(self, k: torch.Tensor, v: torch.Tensor, meta: DecodeMeta) -> None: ...
    def decode_attention(self, q: torch.Tensor, meta: DecodeMeta, backend: AttentionBackend,
                         slopes: torch.Tensor, scale: float) -> torch.Tensor: ...


class Cache(Protocol):
    """A whole KV cache as the model sees it (cache.KVCache, paged_cache.PagedKVCache)."""

    def layer(self, index: int) -> LayerCache: ...
    def check_prefill(self, meta: PrefillMeta) -> None: ...
    def decode_meta(self, positions: torch.Tensor) -> DecodeMeta: ...


def add_linear(x: torch.Tensor, inp: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """x + linear(inp) for the residual stream x [..., N]. Where `gemm_accumulates` allows it, one GEMM
    that accumulates into x in place (beta = 1: cuBLAS reads x in its epilogue), so the separate add
    kernel's two reads and one write of a [T, d_model] tensor go; the sum is rounded once instead of
    twice. x is then overwritten: callers pass a residual stream they own."""
    if not gemm_accumulates(x, linear):
        return x + linear(inp)
    x.view(-1, x.shape[-1]).addmm_(inp.reshape(-1, inp.shape[-1]), linear.weight.t())  # [..., N] -> [M, N]
    return x


def gemm_accumulates(x: torch.Tensor, linear: nn.Linear) -> bool:
    """Whether add_linear runs as one in-place GEMM: on CUDA (where the add is a memory-bound kernel of
    its own), bias-free, contiguous, eager (Inductor fuses the add itself)."""
    return (
        fused.KERNELS.residual_gemm
        and x.is_cuda
        and linear.bias is None
        and x.is_contiguous()
        and not torch.compiler.is_compiling()
    )


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias. MPT's low-precision LayerNorm runs in the activations' dtype;
    the plain one runs in float32 and casts back."""

    def __init__(self, dim: int, *, eps: float, bias: bool, low_precision: bool) -> None:
        super().__init__()
        self.dim, self.eps, self.low_precision = dim, eps, low_precision
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.low_precision:
            return F.layer_norm(x, (self.dim,), self.weight, self.bias, self.eps)
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), (self.dim,), self.weight.float(), bias, self.eps).to(x.dtype)

    def as_prologue(self) -> gemv.Norm:
        """This norm as the input transform of a fused decode GEMV (pipeline/engine/gemv.py)."""
        return gemv.Norm(self.weight, self.bias, self.eps, self.low_precision)

    def add_forward(self, x: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual, norm(residual)) with residual = x + delta (x when delta is None): one fused kernel
        on CUDA (pipeline/engine/fused.py), else the same ops as `x + delta` then forward."""
        if fused.fusable_norm(x):
            return fused.add_layer_norm(x, delta, self.weight, self.bias, self.eps)
        residual = x if delta is None else x + delta
        return residual, self(residual)


def _norm(config: MptConfig) -> LayerNorm:
    return LayerNorm(
        config.d_model,
        eps=config.layer_norm_epsilon,
        bias=not config.no_bias,
        low_precision=config.low_precision_layernorm,
    )


class Attention(nn.Module):
    def __init__(self, config: MptConfig) -> None:
        super().__init__()
        self.config = config
        self.Wqkv = nn.Linear(config.d_model, 3 * config.d_model, bias=not config.no_bias)
        self.out_proj = nn.Linear(config.d_model, config.d_model, bias=not config.no_bias)
        if config.qk_ln:
            self.q_ln = _norm(config)
            self.k_ln = _norm(config)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, d_model] -> q, k, v each [B, T, H, D]."""
        return self.heads(self.Wqkv(x))

    def heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The fused projection's output [B, T, 3 * d_model] -> q, k, v each [B, T, H, D] (clip, qk_ln)."""
        cfg = self.config
        b, t, _ = qkv.shape
        if cfg.clip_qkv:
            qkv = qkv.clamp(min=-cfg.clip_qkv, max=cfg.clip_qkv)
        q, k, v = qkv.split(cfg.d_model, dim=-1)  # each [B, T, d_model]
        if cfg.qk_ln:
            q, k = self.q_ln(q), self.k_ln(k)
        shape = (b, t, cfg.n_heads, cfg.head_dim)
        return q.reshape(shape), k.reshape(shape), v.reshape(shape)  # [B, T, d_model] -> [B, T, H, D]

    def output(self, attn: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """out_proj of attn [B, T, H, D]; with `residual`, residual + that (residual is overwritten)."""
        b, t, _, _ = attn.shape
        flat = attn.reshape(b, t, self.config.d_model)  # [B, T, H, D] -> [B, T, d_model]
        return self.out_proj(flat) if residual is None else add_linear(residual, flat, self.out_proj)


class MLP(nn.Module):
    def __init__(self, config: MptConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(config.d_model, config.ffn_hidden, bias=not config.no_bias)
        self.down_proj = nn.Linear(config.ffn_hidden, config.d_model, bias=not config.no_bias)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """down(gelu(up(x))); with `residual`, residual + that (residual is overwritten)."""
        hidden = fused.gelu(self.up_proj(x), inplace=True)
        return self.down_proj(hidden) if residual is None else add_linear(residual, hidden, self.down_proj)


class Block(nn.Module):
    def __init__(self, config: MptConfig) -> None:
        super().__init__()
        self.norm_1 = _norm(config)
        self.attn = Attention(config)
        self.norm_2 = _norm(config)
        self.ffn = MLP(config)

    def prefill(
        self, x: torch.Tensor, kv: LayerCache, meta: PrefillMeta | Sequence[PrefillMeta],
        backend: AttentionBackend, slopes: torch.Tensor,
    ) -> torch.Tensor:
        """x [B, T, d_model] at positions [meta.start, meta.end) of the sequences `meta` names; or, with
        a list of metas (B = 1), several sequences' chunks one after another along T: the projections
        and the MLP run once over all of them, attention chunk by chunk."""
        _, h = self.norm_1.add_forward(x, None)
        q, k, v = self.attn.project(h)
        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, part: PrefillMeta) -> torch.Tensor:
            kv.write_prefill(k, v, part)
            keys, values = kv.prefill_kv(part)  # [B, end, H, D] each
            return backend.prefill(q, keys, values, slopes, scale=self.attn.config.scale)

        if isinstance(meta, PrefillMeta):
            a = attend(q, k, v, meta)
        else:
            a = torch.empty_like(q)
            offset = 0
            for part in meta:
                rows = slice(offset, offset + part.num_tokens)
                a[:, rows] = attend(q[:, rows], k[:, rows], v[:, rows], part)
                offset += part.num_tokens
        x = self.attn.output(a, residual=x)
        _, h = self.norm_2.add_forward(x, None)
        return self.ffn(h, residual=x)

    def decode(
        self,
        x: torch.Tensor,
        pending: torch.Tensor | None,
        kv: LayerCache,
        meta: DecodeMeta,
        backend: AttentionBackend,
        slopes: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, 1, d_model] is the residual stream without `pending` (the previous block's MLP output,
        None for the first block), so that add and norm_1 run as one kernel. The new token of row b
        sits at meta.positions[b]. Returns (residual stream, this block's MLP output): the caller adds
        the latter (fused into the next norm)."""
        x, h = self.norm_1.add_forward(x, pending)
        q, k, v = self.attn.project(h)
        kv.write_decode(k[:, 0], v[:, 0], meta)  # [B, H, D]: one slot per row
        a = kv.decode_attention(q, meta, backend, slopes, self.attn.config.scale)
        x, h = self.norm_2.add_forward(x, self.attn.output(a))
        return x, self.ffn(h)


    def decode_fused(
        self,
        x: torch.Tensor,
        kv: LayerCache,
        meta: DecodeMeta,
        backend: AttentionBackend,
        slopes: torch.Tensor,
    ) -> torch.Tensor:
        """Block.decode with each projection one fused GEMV kernel (pipeline/engine/gemv.py): the norms
        run inside the GEMV that reads their output, GELU inside down_proj's, the residual adds in the
        out_proj / down_proj epilogues. x [B, 1, d_model] is the whole residual stream; returns it."""
        attn, ffn = self.attn, self.ffn
        qkv = gemv.gemv(x, attn.Wqkv.weight, bias=attn.Wqkv.bias, norm=self.norm_1.as_prologue())
        q, k, v = attn.heads(qkv)
        kv.write_decode(k[:, 0], v[:, 0], meta)
        a = kv.decode_attention(q, meta, backend, slopes, attn.config.scale)
        flat = a.reshape(x.shape)  # [B, 1, H, D] -> [B, 1, d_model]
        x = gemv.gemv(flat, attn.out_proj.weight, bias=attn.out_proj.bias, residual=x)
        hidden = gemv.gemv(x, ffn.up_proj.weight, bias=ffn.up_proj.bias, norm=self.norm_2.as_prologue())
        return gemv.gemv(hidden, ffn.down_proj.weight, bias=ffn.down_proj.bias, gelu=True, residual=x)


class Mpt(nn.Module):
    def __init__(self, config: MptConfig, backend: AttentionBackend | None = None) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm_f = _norm(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.backend = backend
        self.register_buffer("slopes", alibi_slopes(config.n_heads, config.alibi_bias_max), persistent=False)

    def reset_slopes(self, device: torch.device | str) -> None:
        """Recompute the ALiBi slopes on `device` (after building on the meta device)."""
        self.slopes = alibi_slopes(self.config.n_heads, self.config.alibi_bias_max, device=device)

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.wte.weight.dtype

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache.for_model(self.config, batch, max_len, device=self.device, dtype=self.dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., d_model] (before norm_f) -> float32 logits [..., vocab]."""
        return self._head(self.norm_f(hidden))

    def _backend(self) -> AttentionBackend:
        if self.backend is None:
            raise RuntimeError("no attention backend set on the model (see pipeline.engine.load)")
        return self.backend

    @torch.inference_mode()
    def prefill(
        self,
        tokens: torch.Tensor,
        cache: Cache,
        *,
        start: int = 0,
        rows: slice | None = None,
        logits_from: int | None = -1,
        meta: PrefillMeta | None = None,
    ) -> torch.Tensor | None:
        """Run tokens [B, T] at positions [start, start + T) of cache rows `rows` (default: the first B),
        or where `meta` says (a paged cache's block table), writing their K/V. Returns float32 logits
        [B, n, vocab] for the chunk positions `[logits_from:]` only (default -1: the last position,
        n = 1), or None when logits_from is None (a middle chunk of a long prompt needs no logits)."""
        b, t = tokens.shape
        if meta is None:
            meta = PrefillMeta(start=start, num_tokens=t, rows=rows if rows is not None else slice(0, b))
        cache.check_prefill(meta)
        backend = self._backend()
        x = self.wte(tokens)  # [B, T, d_model]
        for i, block in enumerate(self.blocks):
            x = block.prefill(x, cache.layer(i), meta, backend, self.slopes)
        if logits_from is None:
            return None
        return self.logits(x[:, logits_from:])

    @torch.inference_mode()
    def prefill_segments(self, tokens: torch.Tensor, cache: Cache, metas: Sequence[PrefillMeta],
                         logit_rows: torch.Tensor | None) -> torch.Tensor | None:
        """Several sequences' chunks as one forward: tokens [1, T] hold them one after another (metas[i]
        names the next metas[i].num_tokens), so each weight matrix is read once for all of them.
        Returns float32 logits [N, vocab] at positions logit_rows [N] (indices into T), or None."""
        for meta in metas:
            cache.check_prefill(meta)
        backend = self._backend()
        x = self.wte(tokens)  # [1, T, d_model]
        for i, block in enumerate(self.blocks):
            x = block.prefill(x, cache.layer(i), metas, backend, self.slopes)
        return None if logit_rows is None else self.logits(x[0].index_select(0, logit_rows))  # [N, vocab]

    def decode(
        self, tokens: torch.Tensor, cache: Cache, positions: torch.Tensor, meta: DecodeMeta | None = None
    ) -> torch.Tensor:
        """One step for every cache row: tokens [B] at positions [B] -> float32 logits [B, vocab].
        `meta` (paged caches) carries the block tables; dense caches derive it from `positions`.
        Shapes are static and nothing syncs with the host, so the step can be compiled / graph-captured."""
        backend = self._backend()
        meta = meta if meta is not None else cache.decode_meta(positions)
        x = self.wte(tokens)[:, None]  # [B] -> [B, 1, d_model]
        if self._fused_gemv_decode(x):
            for i, block in enumerate(self.blocks):
                x = block.decode_fused(x, cache.layer(i), meta, backend, self.slopes)
            logits = gemv.gemv(x[:, 0], self._head_weight(), norm=self.norm_f.as_prologue()).float()
            return logits * self.config.logit_scale if self.config.logit_scale is not None else logits
        pending = None
        for i, block in enumerate(self.blocks):
            x, pending = block.decode(x, pending, cache.layer(i), meta, backend, self.slopes)
        _, h = self.norm_f.add_forward(x, pending)
        return self._head(h[:, 0])

    def _fused_gemv_decode(self, x: torch.Tensor) -> bool:
        """Whether this step runs every projection as a fused GEMV kernel (batch-1 decode on CUDA; the
        kernels' own check, on the first block's shapes, which every block shares)."""
        first = self.blocks[0]
        return gemv.fusable_gemv(
            x, first.attn.Wqkv.weight, bias=first.attn.Wqkv.bias, norm=first.norm_1.as_prologue()
        )

    def _head_weight(self) -> torch.Tensor:
        return self.wte.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def _head(self, normed: torch.Tensor) -> torch.Tensor:
        """normed [..., d_model] (after norm_f) -> float32 logits [..., vocab], as `logits` computes them."""
        out = F.linear(normed, self._head_weight()).float()
        return out * self.config.logit_scale if self.config.logit_scale is not None else out

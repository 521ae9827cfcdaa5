"""Blockwise attention for any device (the CPU path): never a T x T matrix, float32 accumulation.

Each block of queries attends to its own diagonal block (causal mask) and to every earlier key block
(no mask); the per-block results are merged exactly through their log-sum-exp. ALiBi splits into a
fixed pattern -slope_h * (i - j) over block-local indices, shared by all blocks, plus one constant per
head, -slope_h * (q0 - k0), which is added to the block's log-sum-exp instead of to every score.
On CPU each block runs PyTorch's fused flash-attention CPU kernel (it returns the log-sum-exp);
elsewhere, or where that private op is absent, a plain matmul/softmax does the same.
Peak extra memory is O(B * H * block_q * block_k).
"""

from __future__ import annotations

import torch

BLOCK_Q = 512
BLOCK_K = 2048
DECODE_BLOCK_K = 8192

_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def is_available(device: torch.device) -> bool:
    return True


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, H, tq, D], k/v [B, H, tk, D], bias broadcastable to [B, H, tq, tk] (float32, -inf = masked)
    -> out [B, H, tq, D] and log-sum-exp [B, H, tq], both float32."""
    q, k, v = q.float(), k.float(), v.float()
    if q.device.type == "cpu" and _CPU_FLASH is not None:
        out, lse = _CPU_FLASH(q, k, v, 0.0, False, attn_mask=bias.expand(q.shape[0], -1, -1, -1), scale=scale)
        return out, lse
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale).add_(bias)  # [B, H, tq, tk]
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.exp(scores - lse[..., None]), v), lse


def _merge(
    acc: torch.Tensor | None, acc_lse: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two softmax-attention results over disjoint key sets by their log-sum-exp."""
    if acc is None or acc_lse is None:
        return out, lse
    new_lse = torch.logaddexp(acc_lse, lse)
    acc = acc * torch.exp(acc_lse - new_lse)[..., None] + out * torch.exp(lse - new_lse)[..., None]
    return acc, new_lse


def prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    *,
    scale: float,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
) -> torch.Tensor:
    _, tq, h, _ = q.shape
    offset = k.shape[1] - tq  # absolute position of query 0
    out = torch.empty_like(q)
    slope = slopes.to(device=q.device, dtype=torch.float32).view(1, h, 1, 1)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
    i = torch.arange(block_q, device=q.device, dtype=torch.float32)
    j = torch.arange(block_k, device=q.device, dtype=torch.float32)
    far_pattern = -slope * (i[:, None] - j[None, :])  # [1, H, bq, bk]: keys before the query block
    rel = i[:, None] - i[None, :]  # [bq, bq]
    diag_pattern = (-slope * rel).masked_fill(rel < 0, float("-inf"))  # [1, H, bq, bq]: causal block
    for qs in range(0, tq, block_q):
        qe = min(qs + block_q, tq)
        n, q0 = qe - qs, offset + qs
        qb = qh[:, :, qs:qe]
        acc, acc_lse = _attend(qb, kh[:, :, q0 : q0 + n], vh[:, :, q0 : q0 + n], diag_pattern[..., :n, :n], scale)
        for ks in range(0, q0, block_k):
            ke = min(ks + block_k, q0)
            o, lse = _attend(qb, kh[:, :, ks:ke], vh[:, :, ks:ke], far_pattern[..., :n, : ke - ks], scale)
            lse = lse - slope[..., 0] * (q0 - ks)  # the per-head constant left out of the pattern
            acc, acc_lse = _merge(acc, acc_lse, o, lse)
        out[:, qs:qe] = acc.transpose(1, 2).to(q.dtype)  # [B, H, n, D] -> [B, n, H, D]
    return out


def decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slopes: torch.Tensor,
    lengths: torch.Tensor,
    *,
    scale: float,
    block_k: int = DECODE_BLOCK_K,
) -> torch.Tensor:
    b, _, h, _ = q.shape
    out = torch.empty_like(q)
    slope = slopes.to(device=q.device, dtype=torch.float32).view(1, h, 1, 1)
    for row, length in enumerate(lengths.tolist()):  # rows differ in length; CPU batches are small
        qh = q[row : row + 1].transpose(1, 2)  # [1, H, 1, D]
        acc = acc_lse = None
        for ks in range(0, length, block_k):
            ke = min(ks + block_k, length)
            dist = (length - 1) - torch.arange(ks, ke, device=q.device, dtype=torch.float32)  # [bk], >= 0
            bias = -slope * dist  # [1, H, 1, bk]
            kb = k_cache[row : row + 1, ks:ke].transpose(1, 2)  # [1, H, bk, D]
            vb = v_cache[row : row + 1, ks:ke].transpose(1, 2)
            acc, acc_lse = _merge(acc, acc_lse, *_attend(qh, kb, vb, bias, scale))
        assert acc is not None
        out[row : row + 1] = acc.transpose(1, 2).to(q.dtype)  # [1, H, 1, D] -> [1, 1, H, D]
    return out

"""Blockwise attention for any device (the CPU path): never a T x T matrix, float32 accumulation.

Each block of queries attends to its own diagonal block (causal mask) and to every earlier key block
(no mask); the per-block results are merged exactly through their log-sum-exp. ALiBi splits into a
fixed pattern -slope_h * (i - j) over block-local indices, shared by all blocks, plus one constant per
head, -slope_h * (q0 - k0), which is added to the block's log-sum-exp instead of to every score.
On CPU each block runs PyTorch's fused flash-attention CPU kernel (it returns the log-sum-exp);
elsewhere, or where that private op is absent, a plain matmul/softmax does the same.
Key blocks are visited nearest first; once a bound on a head's block log-sum-exp (Cauchy-Schwarz on
q.k plus the ALiBi distance) falls 120 below the running one, its weights would underflow to exactly
0.0 in float32, so that head skips the remaining, farther blocks: steep-slope heads stop after a few
hundred keys, with the same float32 result.
Peak extra memory is O(B * H * block_q * block_k).
"""

from __future__ import annotations

import math

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
    skip_negligible: bool = True,
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
    # Cauchy-Schwarz: q.k <= |q| max|k|; the largest key norm over the earlier keys bounds every far score
    k_max = None  # [B, H]
    if skip_negligible:
        k_max = torch.linalg.vector_norm(kh, dim=-1, dtype=torch.float32).amax(dim=-1)
    for qs in range(0, tq, block_q):
        qe = min(qs + block_q, tq)
        n, q0 = qe - qs, offset + qs
        qb = qh[:, :, qs:qe]
        acc, acc_lse = _attend(qb, kh[:, :, q0 : q0 + n], vh[:, :, q0 : q0 + n], diag_pattern[..., :n, :n], scale)
        q_norm = torch.linalg.vector_norm(qb, dim=-1, dtype=torch.float32) if k_max is not None else None
        heads = torch.arange(h, device=q.device)  # heads whose far keys can still change the result
        for ks in reversed(range(0, q0, block_k)):  # nearest keys first: acc_lse only grows from here
            ke = min(ks + block_k, q0)
            if q_norm is not None and k_max is not None:
                heads = _contributing(heads, q_norm, k_max, acc_lse, slope, scale, q0 - (ke - 1), ke - ks, i[:n])
                if heads.numel() == 0:
                    break
            kb, vb, pattern = kh[:, :, ks:ke], vh[:, :, ks:ke], far_pattern[..., :n, : ke - ks]
            if heads.numel() == h:
                o, lse = _attend(qb, kb, vb, pattern, scale)
                lse = lse - slope[..., 0] * (q0 - ks)  # the per-head constant left out of the pattern
                acc, acc_lse = _merge(acc, acc_lse, o, lse)
                continue
            o, lse = _attend(qb[:, heads], kb[:, heads], vb[:, heads], pattern[:, heads], scale)
            lse = lse - slope[:, heads, :, 0] * (q0 - ks)
            acc[:, heads], acc_lse[:, heads] = _merge(acc[:, heads], acc_lse[:, heads], o, lse)
        out[:, qs:qe] = acc.transpose(1, 2).to(q.dtype)  # [B, H, n, D] -> [B, n, H, D]
    return out


# exp(-120) is far below float32's smallest subnormal (~exp(-103.3)): a key block whose log-sum-exp
# sits that far under the running one adds exactly 0.0 to the float32 result, so skipping it is exact.
NEGLIGIBLE_LOG_WEIGHT = 120.0


def _contributing(
    heads: torch.Tensor,
    q_norm: torch.Tensor,
    k_max: torch.Tensor,
    acc_lse: torch.Tensor,
    slope: torch.Tensor,
    scale: float,
    nearest_distance: int,
    n_keys: int,
    row: torch.Tensor,
) -> torch.Tensor:
    """The subset of `heads` for which a key block at >= `nearest_distance` from query row 0 could still
    add a non-zero float32 weight. Upper bound of the block's log-sum-exp per (b, h, i):
    scale |q_i| max|k| - slope_h (nearest_distance + i) + log(n_keys). With ALiBi the bound only falls
    as blocks get farther, so a head once dropped stays dropped."""
    s = slope[0, heads, 0, 0]  # [A]
    bound = (scale * q_norm[:, heads] * k_max[:, heads, None]  # [B, A, n]
             - s[None, :, None] * (nearest_distance + row)[None, None, :] + math.log(n_keys))
    live = (bound >= acc_lse[:, heads] - NEGLIGIBLE_LOG_WEIGHT).flatten(2).any(dim=2).any(dim=0)  # [A]
    return heads[live]


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

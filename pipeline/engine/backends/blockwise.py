"""Blockwise attention for any device (the CPU path): online softmax over key blocks, float32
accumulation, never a T x T matrix. Peak extra memory is O(B * H * block_q * block_k)."""

from __future__ import annotations

import torch

BLOCK_Q = 512
BLOCK_K = 1024
DECODE_BLOCK_K = 4096


def is_available(device: torch.device) -> bool:
    return True


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
    b, tq, h, d = q.shape
    tk = k.shape[1]
    offset = tk - tq  # absolute position of query 0
    out = torch.empty_like(q)
    slope = slopes.to(device=q.device, dtype=torch.float32).view(1, h, 1, 1)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
    for qs in range(0, tq, block_q):
        qe = min(qs + block_q, tq)
        qb = qh[:, :, qs:qe].float()  # [B, H, bq, D]
        qpos = torch.arange(offset + qs, offset + qe, device=q.device, dtype=torch.float32)
        m = torch.full((b, h, qe - qs, 1), float("-inf"), device=q.device)
        denom = torch.zeros((b, h, qe - qs, 1), device=q.device)
        acc = torch.zeros((b, h, qe - qs, d), device=q.device)
        key_end = offset + qe  # the last query sees keys [0, offset + qe)
        for ks in range(0, key_end, block_k):
            ke = min(ks + block_k, key_end)
            kpos = torch.arange(ks, ke, device=q.device, dtype=torch.float32)
            rel = kpos[None, :] - qpos[:, None]  # [bq, bk], <= 0 where the key is visible
            scores = torch.matmul(qb, kh[:, :, ks:ke].float().transpose(-1, -2))  # [B, H, bq, bk]
            scores.mul_(scale).add_(slope * rel)
            if ke - 1 > offset + qs:  # block reaches past the first query's position: causal mask
                scores.masked_fill_(rel > 0, float("-inf"))
            m, denom, acc = _online_update(scores, vh[:, :, ks:ke], m, denom, acc)
        out[:, qs:qe] = (acc / denom).transpose(1, 2).to(q.dtype)  # [B, bq, H, D]
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
    b, _, h, d = q.shape
    key_end = int(lengths.max())
    slope = slopes.to(device=q.device, dtype=torch.float32).view(1, h, 1, 1)
    qpos = (lengths - 1).to(torch.float32)  # [B]
    qh = q.transpose(1, 2).float()  # [B, H, 1, D]
    m = torch.full((b, h, 1, 1), float("-inf"), device=q.device)
    denom = torch.zeros((b, h, 1, 1), device=q.device)
    acc = torch.zeros((b, h, 1, d), device=q.device)
    for ks in range(0, key_end, block_k):
        ke = min(ks + block_k, key_end)
        kpos = torch.arange(ks, ke, device=q.device, dtype=torch.float32)
        rel = (kpos[None, :] - qpos[:, None]).view(b, 1, 1, ke - ks)  # [B, 1, 1, bk]
        kb = k_cache[:, ks:ke].transpose(1, 2).float()  # [B, H, bk, D]
        scores = torch.matmul(qh, kb.transpose(-1, -2))  # [B, H, 1, bk]
        scores.mul_(scale).add_(slope * rel).masked_fill_(rel > 0, float("-inf"))
        m, denom, acc = _online_update(scores, v_cache[:, ks:ke].transpose(1, 2), m, denom, acc)
    return (acc / denom).transpose(1, 2).to(q.dtype)  # [B, 1, H, D]


def _online_update(
    scores: torch.Tensor, values: torch.Tensor, m: torch.Tensor, denom: torch.Tensor, acc: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold one key block into the running max / denominator / weighted sum (all float32).
    Key 0 is visible to every query, so the first block leaves every row's max finite."""
    m_new = torch.maximum(m, scores.amax(dim=-1, keepdim=True))
    correction = torch.exp(m - m_new)
    p = torch.exp(scores.sub_(m_new))  # in place: the scores block is not needed again
    denom = denom * correction + p.sum(dim=-1, keepdim=True)
    acc = acc * correction + torch.matmul(p, values.float())
    return m_new, denom, acc

"""Exact key skipping in paged decode attention (backends/paged.py, "Exact skipping") on one GPU.

MPT-7B shape (H=32, D=128, bf16, ALiBi bias max 8), pools and tables built as bench/paged_attention.py
builds them (shuffled block ids, the runner's table width). Queries and keys are N(0, std^2): a random
MPT-7B's q and k after LayerNorm have per-element std ~1.3 (Wqkv init std 0.02 over 4,096 inputs), and
how much is skippable depends on |q| |k| against each head's slope, so --std sets it. Per case: the
kernels with key norms ("skip") and without ("full", the same-run baseline), each checked against
paged.torch_decode (float32, reads every key), their difference, and microseconds per call (a CUDA
graph over distinct pools, as paged_attention.py times). Floor: every K/V byte read once at 4.2 TB/s,
the full kernel's; skipping reads fewer, so "skip / floor" can go below 1.

Usage (H200, < 1 minute): PYTHONPATH=. python3 bench/decode_skip.py --out $OUT [--std 1.3]
      (CPU, Triton interpreter, tiny shapes, no timing: TRITON_INTERPRET=1 python bench/decode_skip.py --smoke)
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from bench.paged_attention import MAX_MODEL_LEN, Setup, build, graph_us, rel_err
from pipeline.engine.backends import paged, paged_triton
from pipeline.engine.config import alibi_slopes

COPY_TBPS = 4.2


def key_norms(k: torch.Tensor) -> torch.Tensor:
    """What the cache's writes keep: [blocks, H] float32, each block's largest key norm per head."""
    return torch.linalg.vector_norm(k.float(), dim=-1).amax(dim=1).contiguous()


def write_check(h: int, d: int, bs: int) -> float:
    """paged.write's key norms through the fused kernel against its torch path (the kernel switched
    off) on the same writes (CUDA): max |difference| over the live blocks."""
    from pipeline.engine import fused

    g = torch.Generator(device="cuda").manual_seed(1)
    pool = torch.randn(9, bs, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(3, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    slots = torch.tensor([2 * bs, 5 * bs + 7, 3], device="cuda", dtype=torch.int32)
    norms = []
    try:
        for fused_write in (True, False):
            fused.KERNELS.kv_write = fused_write
            norms.append(torch.full((9, h), 3.0, device="cuda"))
            paged.write(pool.clone(), pool.clone(), k, v, slots, key_norms=norms[-1])
    finally:
        fused.KERNELS.kv_write = True
    return float((norms[0][:8] - norms[1][:8]).abs().max())  # block 8: the scratch block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--std", type=float, default=1.3, help="per-element std of q and k")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    smoke = args.smoke
    device = "cpu" if smoke else "cuda"
    h, d, bs = (4, 16, 16) if smoke else (32, 128, 256)
    slopes = alibi_slopes(h, 8, device=device)
    scale = d**-0.5
    width = 64 if smoke else MAX_MODEL_LEN // bs
    cases = ([("1 x 64", 1, 0, 64, False), ("4 x (48 + 16)", 4, 48, 16, True)] if smoke else
             [("1 x 4096", 1, 0, 4096, False), ("1 x 16384", 1, 0, 16384, False), ("1 x 65536", 1, 0, 65536, False),
              ("8 x 4096", 8, 0, 4096, False), ("4 x (16384 + 64)", 4, 16384, 64, True),
              ("4 x (65536 - 256 + 64)", 4, 65536 - 256, 64, True)])
    rows = []
    if not smoke:
        print("decode write with key norms (fused kernel vs torch rule): max |diff|", write_check(h, d, bs), flush=True)
    print(f"{'case':<24} {'full us':>9} {'skip us':>9} {'floor us':>9} {'skip/full':>9} {'err full':>9} "
          f"{'err skip':>9} {'skip-full':>9}")
    for name, n_rows, prefix, own, share in cases:
        keys = prefix + n_rows * own  # read once each (plain rows have no prefix)
        layers = 1 if smoke else max(1, min(16, int(1.5e9 // (max(keys, 1) * 2 * h * d * 2)) + 1))
        s: Setup = build(n_rows, prefix, own, bs, share=share, layers=layers, h=h, d=d, device=device, width=width)
        s.q = s.q * args.std
        s.pools = [(k * args.std, v) for k, v in s.pools]
        norms = [key_norms(k) for k, _ in s.pools]

        def call(i: int, skip: bool, s: Setup = s, norms: list = norms) -> torch.Tensor:
            k, v = s.pools[i]
            return paged_triton.decode(s.q, k, v, s.tables, s.seq_lens, slopes, scale=scale, cascade=s.cascade,
                                       key_norms=norms[i] if skip else None)

        k0, v0 = s.pools[0]
        ref = paged.torch_decode(s.q, k0, v0, s.tables, s.seq_lens, slopes, scale=scale)
        full, skip = call(0, False), call(0, True)
        row = {"case": name, "err_full": rel_err(full, ref), "err_skip": rel_err(skip, ref),
               "skip_vs_full": rel_err(skip, full), "bitwise_equal": bool(torch.equal(skip, full))}
        if not smoke:
            n_calls = max(len(s.pools), 4)
            for key, on in (("full_us", False), ("skip_us", True)):
                row[key] = round(graph_us([lambda i=i, on=on, s=s: call(i % len(s.pools), on) for i in range(n_calls)], 30), 2)
            row["floor_us"] = round(keys * 2 * h * d * 2 / (COPY_TBPS * 1e12) * 1e6, 2)
            row["skip_over_full"] = round(row["skip_us"] / row["full_us"], 3)
        rows.append(row)
        print(f"{name:<24} {row.get('full_us', float('nan')):9.2f} {row.get('skip_us', float('nan')):9.2f} "
              f"{row.get('floor_us', float('nan')):9.2f} {row.get('skip_over_full', float('nan')):9.3f} "
              f"{row['err_full']:9.2e} {row['err_skip']:9.2e} {row['skip_vs_full']:9.2e}", flush=True)
        del s, norms
        if not smoke:
            torch.cuda.empty_cache()
    meta = {"torch": torch.__version__, "device": "cpu" if smoke else torch.cuda.get_device_name(), "std": args.std,
            "rows": rows}
    with open(os.path.join(args.out, "decode_skip.json"), "w") as fh:
        json.dump(meta, fh, indent=1)


if __name__ == "__main__":
    with torch.no_grad():
        main()

"""Does fa4.compile_kernels compile what long prefills then ask for? (H200, flash-attn-4 bundle.)

Compiles ahead (timed), then runs prefills of the shapes a document's chunks have, with q/k scaled
so the exact-window plans differ, and counts flash-attn-4's compiled kernels after each: a full
prefill or a later long chunk should add none; a prompt tail (short queries over a long prefix, one
plain causal call) adds its own, which the engine warm-up's requests compile.

    source bench/h200_env.sh && python3 bench/fa4_compile_check.py
"""

from __future__ import annotations

import json
import time

import torch

from pipeline.engine.backends import fa4
from pipeline.engine.config import alibi_slopes


def main() -> None:
    from flash_attn.cute.interface import _flash_attn_fwd

    dev = torch.device("cuda")
    slopes = alibi_slopes(32, 8.0, device=dev)
    scale = 128 ** -0.5
    cache = _flash_attn_fwd.compile_cache
    t0 = time.perf_counter()
    calls = fa4.compile_kernels(slopes, scale=scale, head_dim=128, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    out = {"compile_calls": calls, "compile_s": round(time.perf_counter() - t0, 2), "kernels_after": len(cache)}
    print(json.dumps(out), flush=True)  # the compiles alone took > 100 s in session 6: report as it goes
    rows = []
    gen = torch.Generator(device=dev).manual_seed(1)
    for tq, tk, norm in [(4096, 4096, 1.0), (16384, 16384, 1.0), (16384, 16384, 3.0), (16384, 32768, 0.5),
                         (8192, 40960, 2.0), (300, 20000, 1.0), (64, 16384, 1.0)]:
        q = torch.randn(1, tq, 32, 128, device=dev, dtype=torch.bfloat16, generator=gen) * norm
        k = torch.randn(1, tk, 32, 128, device=dev, dtype=torch.bfloat16, generator=gen) * norm
        v = torch.randn(1, tk, 32, 128, device=dev, dtype=torch.bfloat16, generator=gen)
        before = len(cache)
        t = time.perf_counter()
        fa4.prefill(q, k, v, slopes, scale=scale)
        torch.cuda.synchronize()
        rows.append({"tq": tq, "tk": tk, "norm": norm, "new_kernels": len(cache) - before,
                     "s": round(time.perf_counter() - t, 3)})
        print(json.dumps(rows[-1]), flush=True)
    out["prefills"] = rows
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

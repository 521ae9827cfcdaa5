"""Batch-1 decode GEMVs on one GPU: which call reads MPT-7B's weights fastest.

The decode step spends ~3.5 of its ~4.9 ms at 4K context in four weight shapes per layer (Wqkv,
out_proj, up_proj, down_proj) plus the LM head. cuBLAS picks split-K kernels (an extra reduce
kernel each) for some of them. Each variant below runs 32 times inside one CUDA graph (as the decode
step does), is checked against F.linear in float32, and is timed per call.

Usage (H200): PYTHONPATH=. python bench/gemv.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench.cuda_timing import graph_time_us

SHAPES = {"Wqkv": (12288, 4096), "out_proj": (4096, 4096), "up_proj": (16384, 4096), "down_proj": (4096, 16384)}
COPY_TBPS = 4.27
REPEATS = 32

VARIANTS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "linear": lambda x, w: F.linear(x, w),  # x [1, K], w [N, K] -> [1, N]
    "mv": lambda x, w: torch.mv(w, x[0])[None],  # gemv on the row-major weight
    "matmul_wx": lambda x, w: torch.matmul(w, x.t()).t(),  # [N, K] @ [K, 1] -> [N, 1] -> [1, N]
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    torch.manual_seed(0)
    res: dict[str, dict] = {}
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = F.linear(x.float(), w.float())
        row: dict[str, object] = {"floor_us": round(w.numel() * 2 / COPY_TBPS / 1e6, 2)}
        for variant, fn in VARIANTS.items():
            try:
                err = ((fn(x, w).float() - ref).norm() / ref.norm()).item()
                row[variant] = {"us": round(graph_time_us([lambda fn=fn, x=x, w=w: fn(x, w)] * REPEATS, 20), 2), "rel_err": err}
            except Exception as exc:  # a variant that cannot run or capture is reported, not fatal
                row[variant] = repr(exc)[:200]
        res[name] = row
        print(name, json.dumps(row), flush=True)
    with open(os.path.join(args.out, "gemv.json"), "w") as fh:
        json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()

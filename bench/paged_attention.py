"""Paged decode attention (backends/paged_triton.py) on one GPU: plain rows and shared-prefix groups.

MPT-7B shape (H=32, D=128, bf16, ALiBi bias max 8). Block tables are as wide as the runner makes
them (max_model_len 65,536 / block_size columns) and hold shuffled block ids (a pool after churn);
cascade metadata has the runner's B // 2 group slots, one live. Each variant is one CUDA graph of
calls cycling over distinct pools ("layers", enough to exceed the 60 MB L2), replayed; the time is
the median per call. Every variant is checked on layer 0 against paged.torch_decode (float32, no
cascade) over the same pool: max |err| / max |ref|.

Rows of the table: ours, the same-run baseline (dense splitk.py over the same keys copied into
[B, L, H, D] rows; for cascade, the same rows with their own copies of the prefix and no cascade, and
one row of the prefix alone), the floor (K/V bytes read once at 4.2 TB/s), ours / floor.

Usage (H200, ~2 minutes): PYTHONPATH=. python3 bench/paged_attention.py --out $OUT
          (CPU, Triton interpreter, tiny shapes, no timing: TRITON_INTERPRET=1 python bench/paged_attention.py --smoke)
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch

from pipeline.engine.backends import paged, paged_triton, splitk
from pipeline.engine.backends.paged_triton import DEFAULT, PagedConfig
from pipeline.engine.config import alibi_slopes
from pipeline.engine.metadata import CascadeMeta

COPY_TBPS = 4.2
MAX_MODEL_LEN = 65536


@dataclass
class Setup:
    pools: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: K, V [num_blocks, bs, H, D]
    tables: torch.Tensor  # [B, width] int32
    seq_lens: torch.Tensor  # [B] int32
    cascade: CascadeMeta | None
    q: torch.Tensor  # [B, H, D]


def build(rows: int, prefix: int, own: int, bs: int, *, share: bool, layers: int, h: int, d: int,
          device: str, width: int, seed: int = 0) -> Setup:
    """`rows` rows of prefix + own keys. share: one group reads one copy of the prefix (cascade
    metadata), else every row holds its own copy (plain rows)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    p_blocks, own_blocks = prefix // bs, -(-own // bs)
    n_blocks = (p_blocks if share else rows * p_blocks) + rows * own_blocks + 1
    ids = torch.randperm(n_blocks, generator=gen).tolist()
    shared = [ids.pop() for _ in range(p_blocks)] if share else []
    tables = torch.full((rows, width), ids[-1], dtype=torch.int32)
    for r in range(rows):
        row = (shared if share else [ids.pop() for _ in range(p_blocks)]) + [ids.pop() for _ in range(own_blocks)]
        tables[r, : len(row)] = torch.tensor(row, dtype=torch.int32)
    cascade = None
    if share and prefix:
        groups = max(1, rows // 2)  # the runner's slot count; only slot 0 is live
        ptab = torch.zeros(groups, width, dtype=torch.int32)
        ptab[0, :p_blocks] = torch.tensor(shared, dtype=torch.int32)
        plen = torch.zeros(groups, dtype=torch.int32)
        plen[0] = prefix
        grows = torch.full((groups, rows), -1, dtype=torch.int32)
        grows[0] = torch.arange(rows, dtype=torch.int32)
        cascade = CascadeMeta(ptab.to(device), plen.to(device), torch.zeros(rows, dtype=torch.int32, device=device),
                              grows.to(device))
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(seed)
    pools = [tuple(torch.randn(n_blocks, bs, h, d, device=device, dtype=dt, generator=g) for _ in range(2))
             for _ in range(layers)]
    q = torch.randn(rows, h, d, device=device, dtype=dt, generator=g)
    seq_lens = torch.full((rows,), prefix + own, dtype=torch.int32, device=device)
    return Setup(pools, tables.to(device), seq_lens, cascade, q)  # type: ignore[arg-type]


def graph_us(calls: list[Callable[[], torch.Tensor]], replays: int) -> float:
    from bench.cuda_timing import graph_time_us

    return graph_time_us(calls, replays)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max())


def run_case(name: str, s: Setup, variants: dict[str, Callable[[Setup, int], torch.Tensor]], floor_us: float,
             baseline: str, *, smoke: bool, slopes: torch.Tensor, scale: float) -> list[dict]:
    k0, v0 = s.pools[0]
    ref = paged.torch_decode(s.q, k0, v0, s.tables, s.seq_lens, slopes, scale=scale)
    results = []
    n_calls = max(len(s.pools), 4)
    for vname, fn in variants.items():
        row: dict = {"case": name, "variant": vname}
        try:
            row["err"] = rel_err(fn(s, 0), ref)
            if not smoke:
                row["us"] = round(graph_us([lambda i=i, fn=fn: fn(s, i % len(s.pools)) for i in range(n_calls)], 30), 2)
        except Exception as exc:  # a variant that cannot compile or capture is reported, not fatal
            row["error"] = repr(exc)[:300]
        results.append(row)
    base = next((r.get("us") for r in results if r["variant"] == baseline), None)
    for r in results:
        r["floor_us"] = round(floor_us, 2)
        if "us" in r:
            r["x_floor"] = round(r["us"] / floor_us, 3)
            r["x_base"] = round(r["us"] / base, 3) if base else None
        print(f"{name:<22} {r['variant']:<34} {r.get('us', float('nan')):9.2f} {baseline:<18} "
              f"{base or float('nan'):9.2f} {floor_us:8.2f} {r.get('x_floor', float('nan')):7.3f} "
              f"{r.get('err', float('nan')):9.2e} {r.get('error', '')}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny shapes, no timing")
    args = parser.parse_args()
    smoke = args.smoke
    device = "cpu" if smoke else "cuda"
    h, d = (2, 16) if smoke else (32, 128)
    k4, k32, k65, own = (64, 128, 256, 16) if smoke else (4096, 32768, 65536, 64)
    slopes = alibi_slopes(h, 8, device=device)
    scale = d**-0.5
    kv_bytes = 2 * h * d * 2  # K + V per key, bf16

    def floor(keys: int) -> float:
        return keys * kv_bytes / (COPY_TBPS * 1e12) * 1e6

    def ours(cfg: PagedConfig, cascade: bool = True) -> Callable[[Setup, int], torch.Tensor]:
        def fn(s: Setup, i: int) -> torch.Tensor:
            k, v = s.pools[i]
            return paged_triton.decode(s.q, k, v, s.tables, s.seq_lens, slopes, scale=scale,
                                       cascade=s.cascade if cascade else None, config=cfg)
        return fn

    def dense_splitk(s: Setup) -> Callable[[Setup, int], torch.Tensor]:
        n = int(s.seq_lens[0])
        bs = s.pools[0][0].shape[1]
        ids = s.tables[:, : -(-n // bs)].long()
        dense = [(k[ids].flatten(1, 2)[:, :n].contiguous(), v[ids].flatten(1, 2)[:, :n].contiguous())
                 for k, v in s.pools]  # [B, n, H, D] per layer
        lengths = s.seq_lens.long()

        def fn(_: Setup, i: int) -> torch.Tensor:
            return splitk.decode(s.q[:, None], *dense[i], slopes, lengths, scale=scale)[:, 0]
        return fn

    def layers_for(keys: int) -> int:
        return 1 if smoke else max(1, min(16, math.ceil(1.5e9 / (keys * kv_bytes))))

    results: list[dict] = []
    print(f"{'case':<22} {'variant':<34} {'us':>9} {'baseline':<18} {'base us':>9} {'floor':>8} "
          f"{'x floor':>7} {'rel err':>9}")

    def plain(rows: int, keys: int, bs: int, variants: dict[str, PagedConfig], with_dense: bool) -> None:
        s = build(rows, 0, keys, bs, share=False, layers=layers_for(rows * keys), h=h, d=d, device=device,
                  width=MAX_MODEL_LEN // bs if not smoke else 4 * keys // bs)
        fns = {f"paged bs{bs} {n}": ours(c) for n, c in variants.items()}
        if with_dense and not smoke:
            fns["dense splitk"] = dense_splitk(s)
        base = "dense splitk" if with_dense and not smoke else next(iter(fns))
        results.extend(run_case(f"{rows} x {keys}", s, fns, floor(rows * keys), base, smoke=smoke,
                                slopes=slopes, scale=scale))
        del s
        torch.cuda.empty_cache() if not smoke else None

    sm = dict(block_n=16, min_keys=16, prefix_block_n=16, prefix_min_keys=16) if smoke else {}
    cfg0 = replace(DEFAULT, **sm)
    plain(1, 16 if not smoke else 16, 256 if not smoke else 16, {"default (fixed cost)": cfg0}, False)
    plain(1, k4, 256 if not smoke else 16, {"default": cfg0, "st4": replace(cfg0, num_stages=4),
                                            "min512 st4": replace(cfg0, min_keys=512 if not smoke else 16,
                                                                  num_stages=4)}, True)
    plain(1, k65, 256 if not smoke else 16, {"default": cfg0, "target2048": replace(cfg0, target_programs=2048),
                                             "bn64 st4": replace(cfg0, block_n=64 if not smoke else 16,
                                                                 num_stages=4)}, True)
    plain(32, k4, 256 if not smoke else 16, {"default": cfg0, "target2048": replace(cfg0, target_programs=2048),
                                             "target4096": replace(cfg0, target_programs=4096),
                                             "bn64": replace(cfg0, block_n=64 if not smoke else 16)}, True)
    if not smoke:
        plain(32, k4, 64, {"default": cfg0}, False)
        plain(32, k4, 128, {"default": cfg0}, False)
        plain(1, k65, 64, {"default": cfg0}, False)

    cascade_variants = {"cascade default": cfg0, "cascade ptarget512": replace(cfg0, prefix_target=512),
                        "cascade ptarget1024": replace(cfg0, prefix_target=1024),
                        "cascade pst2": replace(cfg0, prefix_stages=2),
                        "cascade rows16": replace(cfg0, max_rows=16)}
    for n in (8, 32):
        bs = 256 if not smoke else 16
        width = MAX_MODEL_LEN // bs if not smoke else 4 * (k32 + own) // bs
        s = build(n, k32, own, bs, share=True, layers=layers_for(k32), h=h, d=d, device=device, width=width)
        fns = {name: ours(c) for name, c in cascade_variants.items()}
        results.extend(run_case(f"{n} x ({k32} + {own})", s, fns, floor(k32 + n * own), "cascade default",
                                smoke=smoke, slopes=slopes, scale=scale))
        del s
        copies = build(n, k32, own, bs, share=False, layers=1, h=h, d=d, device=device, width=width)
        results.extend(run_case(f"{n} x ({k32} + {own})", copies, {"copies, paged rows": ours(cfg0)},
                                floor(n * (k32 + own)), "copies, paged rows", smoke=smoke, slopes=slopes,
                                scale=scale))
        del copies
        one = build(1, 0, k32 + own, bs, share=False, layers=layers_for(k32), h=h, d=d, device=device, width=width)
        results.extend(run_case(f"1 x {k32 + own}", one, {"one row, paged": ours(cfg0)}, floor(k32 + own),
                                "one row, paged", smoke=smoke, slopes=slopes, scale=scale))
        del one
        torch.cuda.empty_cache() if not smoke else None
    meta = {"torch": torch.__version__, "device": "cpu" if smoke else torch.cuda.get_device_name(),
            "default": asdict(DEFAULT), "rows": results}
    with open(os.path.join(args.out, "paged_attention.json"), "w") as fh:
        json.dump(meta, fh, indent=1)
    bad = [r for r in results if r.get("error") or r.get("err", 1.0) > 2e-2]
    print(f"\n{len(results)} rows, {len(bad)} failed or off by > 2e-2: {[(r['case'], r['variant']) for r in bad]}")


if __name__ == "__main__":
    with torch.no_grad():
        main()

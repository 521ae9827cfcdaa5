"""Fused decode GEMVs (pipeline/engine/gemv.py) against the kernels the model runs today, per MPT-7B shape.

Rows per shape (bf16, batch 1):
  unfused  what the decode step runs today for that projection: cuBLAS F.linear, plus the
           fused.add_layer_norm kernel (with the residual add the fused GEMVs take over) before the
           LayerNorm'd ones, F.gelu before down_proj; out_proj's and down_proj's residual adds ride
           in the next add_layer_norm, so one layer's four rows sum to one layer's work either way
  fused    gemv() with one launch config from a sweep (BLOCK_N, BLOCK_K, num_warps, num_stages)
Each variant runs 32 times inside one CUDA graph on 32 distinct weight tensors (as a decode step
reads 32 layers' weights; one repeated weight would sit in the 50 MB L2), replayed REPLAYS times;
the table gives the median us per call and the share of the 4.27 TB/s copy rate its weight bytes
would need. Errors: max |out - float32 reference| (same math in float32), and for fused rows how
many outputs differ from the unfused bf16 ops at all. A second table checks M = 2 and 8 rows with
each shape's best config (fused.KERNELS.gemv_max_rows = 1 keeps them on the fallback by default). Ends with the CONFIGS entries for pipeline/engine/gemv.py.

Usage (H200): PYTHONPATH=. python3 bench/gemv_fused.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from bench.cuda_timing import graph_time_us
from pipeline.engine import fused
from pipeline.engine.gemv import MAX_ROWS, GemvConfig, Norm, gemv, gemv_reference

COPY_TBPS = 4.27
LAYERS = 32  # distinct weights per graph
REPLAYS = 50
EPS = 1e-5


@dataclass(frozen=True)
class Shape:
    name: str
    n: int
    k: int
    norm: bool = False
    gelu: bool = False
    residual: bool = False


SHAPES = [
    Shape("Wqkv+ln", 12288, 4096, norm=True),
    Shape("out_proj+res", 4096, 4096, residual=True),
    Shape("up_proj+ln", 16384, 4096, norm=True),
    Shape("down_proj+gelu+res", 4096, 16384, gelu=True, residual=True),
    Shape("lm_head+ln", 50432, 4096, norm=True),
]
LAYER_SHAPES = 4  # the first four make one decode layer


def sweep(n: int, k: int) -> list[GemvConfig]:
    """~20 configs around the earlier sweeps' winners (4-8 features x 1-2K columns, 4 warps): tiles of
    4-32 KB per loop step, 2-8 warps (at most 64 fp32 partial sums per thread, at least two 16-byte
    loads each), enough programs for 132 SMs; three with the register prefetch. num_stages only
    pipelines tl.dot operands: it changed nothing in the first sweep, so it stays 1."""
    tiles = [(2, 2048), (4, 1024), (4, 2048), (8, 512), (8, 1024), (8, 2048), (16, 256), (16, 512), (16, 1024)]
    out: list[GemvConfig] = []
    for bn, bk in tiles:
        if -(-n // bn) < 128 or bk > k:
            continue
        for warps in (2, 4, 8):
            if bn * bk > 64 * 32 * warps or bn * bk < 2 * 8 * 32 * warps or (warps == 2 and bn * bk > 4096):
                continue
            out.append(GemvConfig(bn, bk, warps, 1))
    out += [GemvConfig(bn, bk, 4, 1, prefetch=True) for bn, bk in [(4, 2048), (8, 1024), (16, 256)]]
    return list(dict.fromkeys(out))[:24]


class Case:
    """One shape's operands: LAYERS weights, and x / residual / norm / delta shared by every call."""

    def __init__(self, shape: Shape, rows: int = 1) -> None:
        g = torch.Generator(device="cuda").manual_seed(0)
        n, k = shape.n, shape.k
        self.shape = shape

        def randn(*size: int, scale: float = 1.0) -> torch.Tensor:
            return (torch.randn(*size, device="cuda", generator=g) * scale).to(torch.bfloat16)

        self.weights = [randn(n, k, scale=0.02) for _ in range(LAYERS)]  # [N, K] each
        self.x = randn(rows, k, scale=2.0 if shape.gelu else 1.0)  # [M, K]; GELU inputs spread wider
        self.delta = randn(rows, k, scale=0.3)  # the previous projection's output, added before the norm
        # MPT-7B's norms have no bias (no_bias); tests/test_gemv.py covers the bias path
        self.norm = Norm(1.0 + randn(k, scale=0.1), None, EPS) if shape.norm else None
        self.residual = randn(rows, n) if shape.residual else None  # [M, N]

    def fused(self, w: torch.Tensor, config: GemvConfig | None) -> torch.Tensor:
        s = self.shape
        return gemv(self.x, w, norm=self.norm, gelu=s.gelu, residual=self.residual, config=config)

    def unfused(self, w: torch.Tensor) -> torch.Tensor:
        """Today's kernels for this projection (the LN input is x + delta, summed in the LN kernel)."""
        h = self.x
        if self.norm is not None:
            _, h = fused.add_layer_norm(self.x, self.delta, self.norm.weight, self.norm.bias, EPS)
        if self.shape.gelu:
            h = F.gelu(h)
        return F.linear(h, w)

    def unfused_reference(self) -> torch.Tensor:
        """The unfused row's math in float32 (its LayerNorm input is x + delta, no residual)."""
        w, x = self.weights[0], self.x
        norm32 = None
        if self.norm is not None:
            x = x + self.delta
            norm32 = Norm(self.norm.weight.float(), None, EPS)
        return gemv_reference(x.float(), w.float(), norm=norm32, gelu=self.shape.gelu)

    def references(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(the unfused bf16 ops, the same math in float32) for weight 0 and the fused call's inputs."""
        s, w = self.shape, self.weights[0]
        bf16 = gemv_reference(self.x, w, norm=self.norm, gelu=s.gelu, residual=self.residual)
        norm32 = None
        if self.norm is not None:
            norm32 = Norm(self.norm.weight.float(), None, EPS)
        res32 = None if self.residual is None else self.residual.float()
        f32 = gemv_reference(self.x.float(), w.float(), norm=norm32, gelu=s.gelu, residual=res32)
        return bf16, f32


def check(out: torch.Tensor, bf16: torch.Tensor, f32: torch.Tensor) -> dict[str, float]:
    diff = out.float() != bf16.float()
    return {
        "max_err": (out.float() - f32).abs().max().item(),
        "ref_bf16_max_err": (bf16.float() - f32).abs().max().item(),
        "differs_from_unfused": diff.float().mean().item(),
        "max_diff_unfused": (out.float() - bf16.float()).abs().max().item(),
    }


def floor_us(shape: Shape) -> float:
    return shape.n * shape.k * 2 / COPY_TBPS / 1e6


def run_shape(shape: Shape) -> dict:
    case = Case(shape)
    bf16, f32 = case.references()
    floor = floor_us(shape)
    row: dict = {"n": shape.n, "k": shape.k, "floor_us": round(floor, 2), "fused": []}
    us = graph_time_us([lambda w=w: case.unfused(w) for w in case.weights], REPLAYS)
    unfused_err = (case.unfused(case.weights[0]).float() - case.unfused_reference()).abs().max().item()
    row["unfused"] = {"us": round(us, 2), "max_err": unfused_err}
    print(f"{shape.name:20s} {'unfused (cuBLAS + LN/GELU)':34s} {us:8.2f} {100 * floor / us:6.1f}%"
          f" {row['unfused']['max_err']:9.2e}", flush=True)
    for cfg in sweep(shape.n, shape.k):
        start = time.perf_counter()
        try:
            errs = check(case.fused(case.weights[0], cfg), bf16, f32)
            compile_s = time.perf_counter() - start
            us = graph_time_us([lambda w=w, cfg=cfg: case.fused(w, cfg) for w in case.weights], REPLAYS)
        except Exception as exc:  # a config that cannot compile / run is reported, not fatal
            row["fused"].append({"config": asdict(cfg), "error": repr(exc)[:300]})
            print(f"{shape.name:20s} {_label(cfg):34s} failed: {repr(exc)[:100]}", flush=True)
            continue
        row["fused"].append({"config": asdict(cfg), "us": round(us, 2), "compile_s": round(compile_s, 1), **errs})
        print(f"{shape.name:20s} {_label(cfg):34s} {us:8.2f} {100 * floor / us:6.1f}% {errs['max_err']:9.2e}"
              f"  differs {100 * errs['differs_from_unfused']:5.2f}% (max {errs['max_diff_unfused']:.1e})", flush=True)
    timed = [r for r in row["fused"] if "us" in r]
    row["best"] = min(timed, key=lambda r: r["us"]) if timed else None
    return row


def run_rows(shape: Shape, config: GemvConfig, rows: int) -> dict:
    """Batch rows: the same call with M = rows (the kernel reads W once for all of them)."""
    case = Case(shape, rows)
    bf16, f32 = case.references()
    errs = check(case.fused(case.weights[0], config), bf16, f32)
    fused_us = graph_time_us([lambda w=w: case.fused(w, config) for w in case.weights], REPLAYS)
    unfused_us = graph_time_us([lambda w=w: case.unfused(w) for w in case.weights], REPLAYS)
    return {"rows": rows, "fused_us": round(fused_us, 2), "unfused_us": round(unfused_us, 2), **errs}


def _label(cfg: GemvConfig) -> str:
    return f"fused n{cfg.block_n} k{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}" + (" pf" if cfg.prefetch else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--shapes", default=",".join(s.name for s in SHAPES), help="comma-separated names")
    parser.add_argument("--rows", default="2,8", help="extra batch sizes checked with the best config ('' = none)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    wanted = args.shapes.split(",")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    print(f"{'shape':20s} {'variant':34s} {'us/call':>8s} {'%4.27TB/s':>7s} {'max_err':>9s}")
    results: dict[str, dict] = {}
    for shape in SHAPES:
        if shape.name in wanted:
            results[shape.name] = run_shape(shape)
            torch.cuda.empty_cache()  # the shape's weights (up to 13 GB for the LM head) go back
    layer = [s.name for s in SHAPES[:LAYER_SHAPES] if s.name in results and results[s.name]["best"]]
    if len(layer) == LAYER_SHAPES:
        unfused = sum(results[name]["unfused"]["us"] for name in layer)
        best = sum(results[name]["best"]["us"] for name in layer)
        print(f"\nper layer: unfused {unfused:.1f} us, fused {best:.1f} us -> x{LAYERS} layers "
              f"{LAYERS * (unfused - best) / 1000:.3f} ms/token less")
    batch_rows = [int(r) for r in args.rows.split(",") if r]
    fused.KERNELS.gemv_max_rows = MAX_ROWS  # gemv() sends batch rows to the fallback by default
    if batch_rows:
        print(f"\n{'shape':20s} {'rows':>4s} {'fused us':>9s} {'unfused us':>10s} {'max_err':>9s} {'differs':>8s}")
    for name, row in results.items():
        if not row["best"]:
            continue
        cfg = GemvConfig(**row["best"]["config"])  # scaled down for more rows inside gemv()
        shape = next(s for s in SHAPES if s.name == name)
        row["rows"] = []
        for m in batch_rows:
            r = run_rows(shape, cfg, m)
            torch.cuda.empty_cache()
            row["rows"].append(r)
            print(f"{name:20s} {m:4d} {r['fused_us']:9.2f} {r['unfused_us']:10.2f} {r['max_err']:9.2e}"
                  f" {100 * r['differs_from_unfused']:7.2f}%", flush=True)
    print("\n# CONFIGS for pipeline/engine/gemv.py (best per shape, M = 1, bf16)")
    print("CONFIGS: dict[tuple[int, int], GemvConfig] = {")
    for name, row in results.items():
        if row["best"]:
            c = GemvConfig(**row["best"]["config"])
            print(f"    ({row['n']}, {row['k']}): GemvConfig(block_n={c.block_n}, block_k={c.block_k}, "
                  f"num_warps={c.num_warps}, num_stages={c.num_stages}, prefetch={c.prefetch}),  # {name}: {row['best']['us']} us, "
                  f"{100 * row['floor_us'] / row['best']['us']:.0f}% of {COPY_TBPS} TB/s")
    print("}")
    print(f"total {time.perf_counter() - t0:.0f} s")
    with open(os.path.join(args.out, "gemv_fused.json"), "w") as fh:
        json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()

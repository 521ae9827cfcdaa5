"""Attention kernels on one GPU: correctness vs a float64 reference, then one-layer timings.

MPT-7B shape (32 heads x 128), bf16, causal, StoryWriter slopes (alibi_bias_max 16).
  prefill: flash-attn-4 without ALiBi (the target speed), with an identity score_mod (the
           score_mod path's own cost), ALiBi variants (fast / exp2 / aux) and tile options;
           FlexAttention; SDPA flash without ALiBi.
  decode:  SDPA + per-sequence bias row (the CUDA decode backend) vs the bandwidth floor.

Usage (H200): PYTHONPATH=. python bench/attention.py --out $OUT [--quick]
CPU smoke (checks imports and the reference plumbing only): python bench/attention.py --cpu-smoke
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from bench.cuda_timing import time_ms
from pipeline.engine.attention import dense_reference
from pipeline.engine.backends import blockwise, fa4, flex, sdpa
from pipeline.engine.config import alibi_slopes

log = logging.getLogger("bench.attention")
H, D = 32, 128
COPY_TBPS = 4.27  # measured ceilings on the H200 (anchors/h200-hf-baseline.json)
MATMUL_TFLOPS = 795.0


# fa4 ALiBi configurations timed per layer; the single-option ones are also checked for correctness
FA4_CONFIGS: dict[str, dict[str, Any]] = {
    **{f"fa4_{variant}": {"variant": variant} for variant in fa4.VARIANTS},
    "fa4_exp2_128x176": {"variant": "exp2", "tile_mn": (128, 176)},
    "fa4_exp2_128x160": {"variant": "exp2", "tile_mn": (128, 160)},
    "fa4_exp2_128x192": {"variant": "exp2", "tile_mn": (128, 192)},
    "fa4_exp2_pv_ss": {"variant": "exp2", "mma_pv_is_rs": False},
    "fa4_exp2_128x176_pv_ss": {"variant": "exp2", "tile_mn": (128, 176), "mma_pv_is_rs": False},
    "fa4_fast_128x176": {"variant": "fast", "tile_mn": (128, 176)},
    "fa4_fused_128x160": {"variant": "fused", "tile_mn": (128, 160)},
    "fa4_fused_128x176": {"variant": "fused", "tile_mn": (128, 176)},
    # exact windows (alibi_window.py): same output, less work; timed on random q/k (norm ~11)
    "fa4_exp2_128x160_windows": {"variant": "exp2", "tile_mn": (128, 160), "windows": True},
    "fa4_fused_128x160_windows": {"variant": "fused", "tile_mn": (128, 160), "windows": True},
    "fa4_fused_windows": {"variant": "fused", "windows": True},
    "fa4_fused_128x176_windows": {"variant": "fused", "tile_mn": (128, 176), "windows": True},
}


# every timed config is absolute: knobs it does not name run at flash-attn-4's own defaults, not at
# whatever fa4.DEFAULTS holds (run 4 timed "fa4_exp2" with DEFAULTS' 128x160 tiles leaking in)
FA4_BASE: dict[str, Any] = {"tile_mn": None, "mma_pv_is_rs": None, "intra_wg_overlap": None, "windows": False}


def best_fa4_config(layers: dict) -> tuple[str, dict[str, Any]] | None:
    """The fa4 ALiBi config with the lowest 65K time (16K breaks ties), exact variants only."""
    candidates = []
    for name, opts in FA4_CONFIGS.items():
        if opts["variant"] == "kvonly" or opts.get("windows"):
            continue  # kvonly: rounding grows with the key index; windows: a different amount of work
        times = [layers.get(t, {}).get(name) for t in ("65536", "16384")]
        if all(isinstance(x, dict) for x in times):
            candidates.append((times[0]["ms"], times[1]["ms"], name))
    if not candidates:
        return None
    name = min(candidates)[2]
    return name, {**FA4_BASE, **FA4_CONFIGS[name]}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out - ref).norm() / ref.norm()).item()


def causal_attention_flops(t: int) -> float:
    return 2 * 2 * H * D * t * t / 2  # QK^T and PV, half the square


def identity_score_mod() -> Any:
    import cutlass.cute as cute

    @cute.jit
    def identity(score, b_idx, h_idx, q_idx, kv_idx, seqlen_info, aux_tensors):
        return score

    return identity


def prefill_kernels(
    slopes: torch.Tensor, scale: float, *, quick: bool, only: set[str] | None = None
) -> dict[str, Callable[..., torch.Tensor]]:
    """name -> fn(q, k, v) for every prefill variant that can run here (those named in `only`)."""
    kernels = _all_prefill_kernels(slopes, scale, quick=quick)
    return {name: fn for name, fn in kernels.items() if only is None or name in only}


def _all_prefill_kernels(
    slopes: torch.Tensor, scale: float, *, quick: bool
) -> dict[str, Callable[..., torch.Tensor]]:
    kernels: dict[str, Callable[..., torch.Tensor]] = {}
    if fa4.is_available(torch.device("cuda")):
        interface = fa4._flash_attn_module()
        ident = identity_score_mod()
        kernels["fa4_noalibi"] = lambda q, k, v: fa4.prefill_no_alibi(q, k, v, scale=scale)
        kernels["fa4_identity_mod"] = lambda q, k, v: interface._flash_attn_fwd(
            q, k, v, softmax_scale=scale, causal=True, score_mod=ident
        )[0]
        configs = {name: opts for name, opts in FA4_CONFIGS.items() if not quick or len(opts) == 1}
        for name, opts in configs.items():
            kernels[name] = lambda q, k, v, o={**FA4_BASE, **opts}: fa4.prefill(
                q, k, v, slopes, scale=scale, **o
            )
    else:
        log.warning("flash-attn-4 not available: %s", _fa4_import_error())
    kernels["flex"] = lambda q, k, v: flex.prefill(q, k, v, slopes, scale=scale)
    kernels["sdpa_flash_noalibi"] = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale
    ).transpose(1, 2)
    return kernels


def _fa4_import_error() -> str:
    try:
        import flash_attn.cute.interface  # noqa: F401
    except Exception as exc:
        return repr(exc)[:500]
    return "imported, but the device is not sm90"


def check_prefill(
    kernels: dict[str, Callable[..., torch.Tensor]], slopes: torch.Tensor, scale: float
) -> dict:
    """Each ALiBi kernel vs float64 at (B=2, Tq=Tk=2048) and a chunk (B=2, Tq=512 at the end of 1536)."""
    results: dict[str, Any] = {}
    for tq, tk in ((2048, 2048), (512, 1536), (1000, 3000)):
        q = torch.randn(2, tq, H, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(2, tk, H, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(2, tk, H, D, device="cuda", dtype=torch.bfloat16)
        ref = dense_reference(q, k, v, slopes, scale=scale)
        for name, fn in kernels.items():
            if "noalibi" in name or "identity" in name:
                continue
            try:
                results[f"{name}_q{tq}_k{tk}"] = rel_err(fn(q, k, v), ref)
            except Exception as exc:
                results[f"{name}_q{tq}_k{tk}"] = repr(exc)[:300]
                traceback.print_exc()
        results[f"blockwise_q{tq}_k{tk}"] = rel_err(blockwise.prefill(q, k, v, slopes, scale=scale), ref)
        print("check", tq, tk, {k_: v_ for k_, v_ in results.items() if f"q{tq}_k{tk}" in k_}, flush=True)
    return results


def check_windows(slopes: torch.Tensor, scale: float, variants: tuple[str, ...] = ("exp2", "fused")) -> dict:
    """Windowed fa4 vs the same kernel dense. Also runs the same head groups as local attention with a
    window covering every key (nothing skipped), which separates "the skipped weights were not 0.0"
    from "the local kernel rounds differently", and compares both to float64."""
    import functools

    from pipeline.engine.backends.alibi_window import HeadGroup, window_groups, work_fraction

    results: dict[str, Any] = {}
    if not fa4.is_available(torch.device("cuda")):
        return {"skipped": "flash-attn-4 not available"}
    interface = fa4._flash_attn_module()
    for tq, tk in ((2048, 8192), (2048, 16384)):
        q = torch.randn(1, tq, H, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, tk, H, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, tk, H, D, device="cuda", dtype=torch.bfloat16)
        groups = list(window_groups(q, k, slopes, slopes.tolist(), scale=scale))  # as fa4.prefill groups
        entry: dict[str, Any] = {
            "groups": [(g.start, g.stop, g.window) for g in groups],
            "work_fraction": round(work_fraction(groups, tq, tk), 3),
        }
        ref = dense_reference(q, k, v, slopes, scale=scale) if tk <= 8192 else None
        for variant in variants:
            try:
                dense = fa4.prefill(q, k, v, slopes, scale=scale, variant=variant, windows=False)
                windowed = fa4.prefill(q, k, v, slopes, scale=scale, variant=variant, windows=True)
                step = fa4.geometric_step(slopes)
                options = {"tile_mn": tuple(fa4.DEFAULTS["tile_mn"])} if fa4.DEFAULTS.get("tile_mn") else {}
                call = functools.partial(
                    fa4._call, interface, variant=variant, step=step, scale=scale, options=options
                )
                unskipped = torch.empty_like(q)
                for g in groups:
                    hs = slice(g.start, g.stop)
                    window = None if g.window is None else tk  # local kernels where prefill has them
                    call(q[:, :, hs], k[:, :, hs], v[:, :, hs], slopes[hs], HeadGroup(g.start, g.stop, window),
                         out=unskipped[:, :, hs])

                def diff(a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
                    d = (a.float() - b.float()).abs()
                    return {"equal": bool(torch.equal(a, b)), "max_abs": d.max().item(),
                            "n_diff": int((d > 0).sum().item())}

                entry[variant] = {
                    "windowed_vs_dense": diff(windowed, dense),
                    "local_unskipped_vs_dense": diff(unskipped, dense),
                    "windowed_vs_local_unskipped": diff(windowed, unskipped),
                }
                if ref is not None:
                    entry[variant]["rel_err_dense"] = rel_err(dense, ref)
                    entry[variant]["rel_err_windowed"] = rel_err(windowed, ref)
            except Exception as exc:
                traceback.print_exc()
                entry[variant] = repr(exc)[:300]
        results[f"q{tq}_k{tk}"] = entry
        print("windows", tq, tk, entry, flush=True)
        del ref
        torch.cuda.empty_cache()
    return results


def time_prefill(
    kernels: dict[str, Callable[..., torch.Tensor]], lengths: list[int], budget_s: float
) -> dict:
    results: dict[str, Any] = {}
    t0 = time.perf_counter()
    for t in lengths:
        q, k, v = (torch.randn(1, t, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        row: dict[str, Any] = {"floor_ms": round(causal_attention_flops(t) / MATMUL_TFLOPS / 1e9, 2)}
        for name, fn in kernels.items():
            if time.perf_counter() - t0 > budget_s:
                row[name] = "skipped (time budget)"
                continue
            row[name] = _time_one(fn, q, k, v, t)
            print("prefill", t, name, row[name], flush=True)
        base = row.get("fa4_noalibi")
        if isinstance(base, dict):
            for val in row.values():
                if isinstance(val, dict):
                    val["vs_fa4_noalibi"] = round(base["ms"] / val["ms"], 3)
        results[str(t)] = row
        del q, k, v
        torch.cuda.empty_cache()
    return results


def _time_one(
    fn: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, t: int
) -> Any:
    try:
        first = time.perf_counter()
        fn(q, k, v)
        torch.cuda.synchronize()
        first_s = time.perf_counter() - first
        ms = time_ms(lambda: fn(q, k, v), reps=5 if t > 32768 else 15)
    except Exception as exc:
        traceback.print_exc()
        return repr(exc)[:300]
    return {
        "ms": round(ms, 3),
        "tflops": round(causal_attention_flops(t) / ms / 1e9),
        "first_call_s": round(first_s, 1),
    }


def _decode_entry(b: int, ctx: int, slopes: torch.Tensor, scale: float) -> dict[str, Any]:
    k = torch.randn(b, ctx, H, D, device="cuda", dtype=torch.bfloat16)  # cache view bounded to the longest
    v = torch.randn(b, ctx, H, D, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(b, 1, H, D, device="cuda", dtype=torch.bfloat16)
    lengths = torch.full((b,), ctx, device="cuda", dtype=torch.int64)
    if b > 1:
        lengths[0] = ctx - 17  # ragged batch: one shorter sequence
    out = sdpa.decode(q, k, v, slopes, lengths, scale=scale)
    errs = []
    for i in range(min(b, 2)):
        n = int(lengths[i])
        ref = dense_reference(q[i : i + 1], k[i : i + 1, :n], v[i : i + 1, :n], slopes, scale=scale)
        errs.append(rel_err(out[i : i + 1], ref))
    floor_ms = 2 * k.numel() * k.element_size() / COPY_TBPS / 1e9
    entry: dict[str, Any] = {"floor_ms": round(floor_ms, 3), "err": max(errs)}
    step = lambda: sdpa.decode(q, k, v, slopes, lengths, scale=scale)  # noqa: E731
    entry["sdpa_bias_ms"] = round(time_ms(step, 50, 5), 3)
    rebuilt = lambda: sdpa.decode(q, k, v, slopes, lengths.clone(), scale=scale)  # noqa: E731
    entry["sdpa_bias_rebuilt_ms"] = round(time_ms(rebuilt, 50, 5), 3)
    # the same kernel over a head-major [B, H, L, D] cache: does the [B, L, H, D] layout cost reads?
    kh, vh = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()  # [B, H, L, D]
    bias = sdpa.alibi_bias_row(slopes, lengths, ctx, q.dtype)
    head_major = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
        q.transpose(1, 2), kh, vh, attn_mask=bias, scale=scale
    )
    entry["sdpa_bias_head_major_ms"] = round(time_ms(head_major, 50, 5), 3)
    return entry


def check_and_time_decode(slopes: torch.Tensor, scale: float) -> dict:
    results: dict[str, Any] = {}
    lengths = torch.tensor([1, 700, 4096], device="cuda")
    fused = sdpa.alibi_bias_row(slopes, lengths, 4096, torch.bfloat16)
    plain = sdpa._bias_torch(slopes, lengths, 4096, torch.bfloat16)
    same_inf = bool((fused.isinf() == plain.isinf()).all())
    finite = plain.isfinite()
    results["bias_fused_vs_torch"] = {
        "same_mask": same_inf,
        "max_abs_diff": (fused[finite].float() - plain[finite].float()).abs().max().item(),
    }
    for b, ctx in ((1, 4096), (1, 65536), (32, 4096), (4, 32768)):
        entry = _decode_entry(b, ctx, slopes, scale)
        results[f"B{b}_L{ctx}"] = entry
        print("decode", b, ctx, entry, flush=True)
        torch.cuda.empty_cache()
    return results


def cpu_smoke() -> None:
    """Runs the reference plumbing on CPU at tiny sizes (no GPU kernels): catches typos before a
    device call."""
    slopes = alibi_slopes(4, 16)
    q, k, v = (torch.randn(1, 64, 4, 16) for _ in range(3))
    ref = dense_reference(q, k, v, slopes, scale=0.25)
    err = rel_err(blockwise.prefill(q, k, v, slopes, scale=0.25), ref)
    lengths = torch.tensor([40])
    out = sdpa.decode(q[:, :1], k, v, slopes, lengths, scale=0.25)
    derr = rel_err(out, dense_reference(q[:, :1], k[:, :40], v[:, :40], slopes, scale=0.25))
    print(
        json.dumps(
            {"blockwise_err": err, "sdpa_decode_err_cpu": derr, "fa4_step": fa4.geometric_step(slopes)}
        )
    )
    assert err < 1e-5 and derr < 1e-5


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--quick", action="store_true", help="skip tile/kernel-option variants")
    parser.add_argument("--lengths", default="16384,65536")
    parser.add_argument("--budget-s", type=float, default=300.0, help="stop timing new variants after this")
    parser.add_argument("--cpu-smoke", action="store_true")
    parser.add_argument("--configs", default="", help="comma list: time only these kernels (default all)")
    parser.add_argument("--skip-decode", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.cpu_smoke:
        cpu_smoke()
        return
    torch.manual_seed(0)
    slopes = alibi_slopes(H, 16, device="cuda")
    scale = 1.0 / math.sqrt(D)
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    try:
        import flash_attn

        res["flash_attn"] = getattr(flash_attn, "__version__", "?")
    except Exception as exc:
        res["flash_attn"] = repr(exc)[:300]
    only = set(filter(None, args.configs.split(","))) or None
    kernels = prefill_kernels(slopes, scale, quick=args.quick, only=only)
    res["check"] = check_prefill(kernels, slopes, scale)
    res["windows"] = check_windows(slopes, scale)
    print(json.dumps(res["windows"]), flush=True)
    res["decode"] = {} if args.skip_decode else check_and_time_decode(slopes, scale)
    res["prefill"] = time_prefill(kernels, [int(x) for x in args.lengths.split(",")], args.budget_s)
    with open(os.path.join(args.out, "attention.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    print_table(res)


def print_table(res: dict) -> None:
    print("\n== prefill, one layer (ms; x = speed relative to fa4 without ALiBi) ==")
    for t, row in res["prefill"].items():
        print(f"-- T={t} floor {row['floor_ms']} ms")
        for name, val in row.items():
            if isinstance(val, dict):
                print(
                    f"{name:24s} {val['ms']:9.3f} ms {val['tflops']:5d} TF/s  x{val.get('vs_fa4_noalibi', '-')}"
                )
            elif name != "floor_ms":
                print(f"{name:24s} {val}")
    print("== decode, one layer (ms) ==")
    for key, val in res["decode"].items():
        print(key, val)
    print("== correctness (rel err vs float64) ==")
    for key, val in res["check"].items():
        print(f"{key:40s} {val}")


if __name__ == "__main__":
    sys.exit(main())

"""flash-attn-4 (CuTe DSL, Hopper) causal prefill with ALiBi applied as a score_mod.

flash-attn-4 JIT-compiles one kernel per (score_mod, tile options, dtype, head_dim) on first use and
caches it; shapes are dynamic, so chunked prefill with varying Tq / Tk reuses the same kernel. The
kernel aligns the causal mask bottom-right (query i sits at key position Tk - Tq + i), which is the
interface's convention; the score_mod adds the same offset to q_idx (seqlen_k - seqlen_q).

Slope variants (bench/engine.py times each per layer; bench/NOTES.md has the numbers):
- "exp2": slope recomputed per head as 2^(-step * (h + 1)) (exact for MPT's power-of-two head
  counts), key distance converted with a plain int->float. The fallback when "fused" cannot run.
- "fast": as "exp2" but the distance goes to float32 with the 2^23 magic-number trick instead of
  I2F. Measured slower than "exp2" on the H200 (the conversion was not the bottleneck).
- "kvonly": adds slope * kv only (drops the row-constant -slope * q, which softmax ignores); one
  integer op less, but float32 rounding grows with the key index. Measured, never the default.
- "aux": slopes read from an aux tensor by head index. Works for any slopes, but flash-attn-4 then
  wraps every q/kv index with a fast-divmod and runs the score_mod one element at a time: slowest.
- "fused" (default): ALiBi inside the kernel's score hook, the softmax scale kept folded into exp2
  (pipeline/engine/backends/fa4_fused.py patches flash-attn-4 for it; checked against float64 once
  per configuration before use). As fast as an empty score_mod: 90-96% of the no-ALiBi kernel at 65K
  across runs, "exp2" 87%.
The geometric variants are only used when the slopes are exactly that series (checked once per
slopes tensor); otherwise "aux" is used.

Exact windows (option `windows`, on by default): steep-slope heads give keys more than a few
hundred positions back a weight that is exactly 0.0 in float32 (pipeline/engine/backends/
alibi_window.py proves the bound from this call's q/k norms). Heads are grouped and each group runs
as flash-attn-4 local attention with its window. Skipping changes no bit of the local kernel's output
(H200: equal to the same groups with a window over every key); flash-attn-4's local and causal code
paths themselves round ~0.02% of outputs 1 bf16 ulp apart. 1.47x faster than dense no-ALiBi for
StoryWriter's slopes at 65K (random q/k), ~1.1x at 16K.
"""

from __future__ import annotations

import functools
import logging
import math
import weakref
from typing import Any

import torch

from pipeline.engine.backends import fa4_fused
from pipeline.engine.backends.alibi_window import (
    HeadGroup,
    always_full_from,
    causal_work,
    group_align,
    group_starts,
    window_groups,
)
from pipeline.engine.backends.fa4_score_mods import score_mod

log = logging.getLogger(__name__)

NAME = "fa4"
VARIANTS = ("exp2", "fast", "kvonly", "aux", "fused")
# variants that can run a head group starting past head 0 (a compile-time head offset, or aux slopes)
GROUPABLE = ("exp2", "fused", "aux")
# a windowed plan pays for its norm pass and host sync from a full prefill of this many tokens on;
# for a later chunk, from the same causal work (windows_pay)
WINDOW_MIN_KEYS = 4096


def is_available(device: torch.device) -> bool:
    """True on a Hopper (sm90) CUDA device with flash-attn-4's CuTe DSL importable."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    if torch.cuda.get_device_capability(device) != (9, 0):
        return False
    return _flash_attn_module() is not None


@functools.cache
def _flash_attn_module() -> Any | None:
    try:
        from flash_attn.cute import interface
    except Exception as exc:  # ImportError, or the DSL's native libraries failing to load
        log.debug("flash-attn-4 not importable: %s", exc)
        return None
    return interface


def geometric_step(slopes: torch.Tensor) -> float | None:
    """The `step` with slopes[h] == 2^(-step * (h + 1)) for every head, or None.

    MPT's slopes for a power-of-two head count are this series with step = alibi_bias_max / n_heads.
    Compared in float32, as the kernel computes them.
    """
    values = slopes.detach().to("cpu", torch.float64)
    if values.numel() == 0 or bool((values <= 0).any()):
        return None
    step = -math.log2(float(values[0]))
    heads = torch.arange(1, values.numel() + 1, dtype=torch.float64)
    expected = torch.exp2(-step * heads).to(torch.float32)
    if not torch.allclose(expected, values.to(torch.float32), rtol=2e-6, atol=0.0):
        return None
    return step


_SLOPE_MEMO: dict[int, tuple[weakref.ref, int, float | None, list[float]]] = {}


def _slope_info(slopes: torch.Tensor) -> tuple[float | None, list[float]]:
    """(geometric_step, slopes on the host), once per slopes tensor (the model passes the same buffer
    for every layer, and reading it each call would sync with the device). Keyed by the live object
    and its version counter: a new tensor at a recycled address misses."""
    hit = _SLOPE_MEMO.get(id(slopes))
    if hit is not None and hit[0]() is slopes and hit[1] == slopes._version:
        return hit[2], hit[3]
    on_host = slopes.detach().cpu()  # the one device read
    step, host = geometric_step(on_host), [float(x) for x in on_host.tolist()]
    _SLOPE_MEMO[id(slopes)] = (weakref.ref(slopes), slopes._version, step, host)
    return step, host


# Measured best on the H200 (bench/NOTES.md); bench/engine.py may override them for a run.
DEFAULTS: dict[str, Any] = {
    # fused: 56.2 ms per layer at 65K vs exp2's 61.5 (no ALiBi 53.9), bench/NOTES.md run 7
    "variant": "fused",
    # 128x176 tiles: best fused tiles at 65K in run 7 (128x160: 58.9 ms; 16K equal within noise)
    "tile_mn": (128, 176),
    "mma_pv_is_rs": None,
    "intra_wg_overlap": None,
    "windows": True,
}


def prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    *,
    scale: float,
    **overrides: Any,
) -> torch.Tensor:
    """Causal ALiBi attention, q [B, Tq, H, D], k/v [B, Tk, H, D] (Tk >= Tq) -> [B, Tq, H, D].

    `overrides` (variant, windows, tile_mn, mma_pv_is_rs, intra_wg_overlap) are tuning knobs for the
    benchmark; DEFAULTS holds the measured best.
    """
    interface = _flash_attn_module()
    if interface is None:
        raise RuntimeError("flash-attn-4 is not installed (pip install flash-attn-4)")
    if k.shape[1] < q.shape[1]:
        raise ValueError(f"Tk ({k.shape[1]}) must be >= Tq ({q.shape[1]})")
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown fa4 options {sorted(unknown)}")
    options = {**DEFAULTS, **overrides}
    windows = options["windows"]
    variant, step, host_slopes, kernel_options = _resolve(interface, slopes, scale, q.shape[-1], q.device, options)
    call = functools.partial(_call, interface, variant=variant, step=step, scale=scale, options=kernel_options)

    heads, tk = q.shape[2], k.shape[1]
    if not (windows and windows_pay(q.shape[1], tk) and variant in GROUPABLE) or always_full_from(host_slopes, tk) == 0:
        return call(q, k, v, slopes, HeadGroup(0, heads, None))
    out = torch.empty_like(q)
    # each group is launched as soon as it is known (the unplanned heads before the plan's host sync)
    # and writes its heads of `out` in place (strided)
    for group in window_groups(q, k, slopes, host_slopes, scale=scale):
        hs = slice(group.start, group.stop)
        call(q[:, :, hs], k[:, :, hs], v[:, :, hs], slopes[hs], group, out=out[:, :, hs])
    return out


def _resolve(interface: Any, slopes: torch.Tensor, scale: float, head_dim: int, device: torch.device,
             options: dict[str, Any]) -> tuple[str, float | None, list[float], dict[str, Any]]:
    """(variant, slope step, slopes on the host, kernel options) for these slopes and options: the
    geometric variants need the slopes' series (else "aux"); "fused" needs its check to pass. The plan
    option `windows` is not a kernel's and is left out."""
    options = {name: value for name, value in options.items() if name != "windows"}
    variant = options.pop("variant")
    step, host_slopes = _slope_info(slopes)
    if variant == "aux":
        step = None
    if step is None:
        variant = "aux"
    kernel_options = {name: value for name, value in options.items() if value is not None}
    if "tile_mn" in kernel_options:
        kernel_options["tile_mn"] = tuple(kernel_options["tile_mn"])
    if variant == "fused" and not _fused_ok(interface, step, scale, head_dim, device, kernel_options):
        variant = "exp2"
    return variant, step, host_slopes, kernel_options


COMPILE_TOKENS = 1024  # queries of each compile call: several query tiles, as a long prefill's calls have
COMPILE_WINDOW = 256


def compile_kernels(slopes: torch.Tensor, *, scale: float, head_dim: int, dtype: torch.dtype) -> int:
    """Compile now the kernels a long prefill with these slopes can ask for, each JIT-compiled at its
    first use otherwise (seconds apiece, in the middle of a request: bench/NOTES.md session 6 run 3).
    flash-attn-4's compile key holds the score_mod, which carries a head group's first head, and
    whether the call is local (a window) or causal; shapes are dynamic. So one small call per group
    start on the grid, once with a window and once without. (A prompt tail's short-query causal call
    over head 0 is another kernel: the engine warm-up's own requests compile it.) Returns the calls
    made; 0 where flash-attn-4 is absent."""
    interface = _flash_attn_module()
    if interface is None:
        return 0
    device = slopes.device
    variant, step, _, kernel_options = _resolve(interface, slopes, scale, head_dim, device, DEFAULTS)
    heads = slopes.numel()
    starts = group_starts(heads) if variant in GROUPABLE else [0]
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, COMPILE_TOKENS, heads, head_dim, device=device, dtype=dtype, generator=gen)
               for _ in range(3))
    calls = 0
    for start in starts:
        stop = min(heads, start + group_align(heads))
        hs = slice(start, stop)
        for window in (None, COMPILE_WINDOW):
            _call(interface, q[:, :, hs], k[:, :, hs], v[:, :, hs], slopes[hs], HeadGroup(start, stop, window),
                  variant=variant, step=step, scale=scale, options=kernel_options)
            calls += 1
    return calls


def windows_pay(tq: int, tk: int) -> bool:
    """Whether a windowed plan can pay for its norm pass and its host sync (which drains every step
    queued before it): the call's causal work is at least a WINDOW_MIN_KEYS-token prefill's. What
    windows save grows with queries x keys and the sync does not, so a short chunk on a long cached
    prefix (a task's prompt tail after its document: ~20 such chunks per document in the tasks
    path) runs as one plain call instead of syncing once per layer. Equal to tk >= WINDOW_MIN_KEYS
    when tq == tk."""
    return causal_work(None, tq, tk) >= causal_work(None, WINDOW_MIN_KEYS, WINDOW_MIN_KEYS)


_FUSED_CHECKED: dict[tuple, bool] = {}


def _fused_ok(
    interface: Any, step: float | None, scale: float, head_dim: int, device: torch.device, options: dict
) -> bool:
    """The fused variant patches flash-attn-4 internals, so before its first use per (slopes, scale,
    head_dim, tiles) on a device, one small call is checked against the float64 reference; a patch
    that does not apply or computes anything else falls back to "exp2" with a warning."""
    key = (step, scale, head_dim, device, tuple(sorted(options.items())))
    if key not in _FUSED_CHECKED:
        ok = step is not None and fa4_fused.install()
        if ok:
            from pipeline.engine.attention import dense_reference

            gen = torch.Generator(device=device).manual_seed(0)
            q, k, v = (
                torch.randn(1, 384, 4, head_dim, device=device, dtype=torch.bfloat16, generator=gen)
                for _ in range(3)
            )
            slopes = torch.exp2(-step * torch.arange(1, 5, device=device, dtype=torch.float32))
            try:
                got = _call(interface, q[:, 128:], k, v, slopes, HeadGroup(0, 4, None), variant="fused",
                            step=step, scale=scale, options=options)
                want = dense_reference(q[:, 128:], k, v, slopes, scale=scale)
                err = ((got.double() - want.double()).norm() / want.double().norm()).item()
                ok = err < 1e-2  # bf16 kernels land near 2e-3
            except Exception as exc:  # the patched kernel failed to compile or launch
                log.warning("fused ALiBi kernel failed its check: %s", exc)
                err, ok = float("nan"), False
            if not ok:
                log.warning("fused ALiBi variant disabled (rel. error %.3g vs float64): using exp2", err)
        _FUSED_CHECKED[key] = ok
    return _FUSED_CHECKED[key]


def _call(
    interface: Any,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    group: HeadGroup,
    out: torch.Tensor | None = None,
    *,
    variant: str,
    step: float | None,
    scale: float,
    options: dict[str, Any],
) -> torch.Tensor:
    """One flash-attn-4 call over the heads of `group` (q/k/v/slopes already sliced to them)."""
    aux_tensors = None
    if variant == "aux":
        aux_tensors = [slopes.to(device=q.device, dtype=torch.float32).contiguous()]
        mod = score_mod("aux")
    elif variant == "fused":
        assert step is not None
        mod = fa4_fused.score_mod(step, group.start, scale)
    elif variant == "exp2":
        mod = score_mod("exp2", step, group.start)
    elif group.start > 0:
        raise ValueError(f"variant {variant!r} cannot run heads from {group.start} on")
    else:
        mod = score_mod(variant, step)
    return interface._flash_attn_fwd(
        q,
        k,
        v,
        softmax_scale=scale,
        causal=True,
        window_size_left=group.window,
        score_mod=mod,
        aux_tensors=aux_tensors,
        out=out,
        **options,
    )[0]


def prefill_no_alibi(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, **options: Any
) -> torch.Tensor:
    """The same kernel without a score_mod: the speed the ALiBi kernel is measured against."""
    interface = _flash_attn_module()
    if interface is None:
        raise RuntimeError("flash-attn-4 is not installed")
    return interface._flash_attn_fwd(q, k, v, softmax_scale=scale, causal=True, **options)[0]

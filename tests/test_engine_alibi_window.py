"""Exact ALiBi windows (pipeline/engine/backends/alibi_window.py) and fa4's windowed head groups.

The GPU kernel cannot run here; the bound itself is checked in float32 arithmetic on CPU (weights
beyond each head's window are exactly 0.0), and fa4.prefill's grouping, slicing and per-group slope
scalars are checked through a stand-in kernel that honours the same arguments.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from pipeline.engine.attention import dense_reference
from pipeline.engine.backends import alibi_window, fa4
from pipeline.engine.backends.alibi_window import (
    HeadGroup,
    always_full_from,
    causal_work,
    head_windows,
    plan_groups,
)
from pipeline.engine.config import alibi_slopes


def brute_work(window: int | None, tq: int, tk: int) -> int:
    return sum(
        sum(1 for j in range(p + 1) if window is None or p - j <= window) for p in range(tk - tq, tk)
    )


@pytest.mark.parametrize("tq,tk", [(1, 1), (5, 5), (7, 19), (19, 19), (1, 30)])
@pytest.mark.parametrize("window", [None, 0, 1, 3, 6, 18, 40])
def test_causal_work_counts_visible_keys(tq, tk, window):
    assert causal_work(window, tq, tk) == brute_work(window, tq, tk)


def test_plan_groups_is_the_cheapest_contiguous_partition():
    windows = [3, 9, 4, 30, 12, 100, 7]
    tq = tk = 64
    cost_per_call = 150.0
    groups = plan_groups(windows, tq, tk, call_cost=cost_per_call)

    def cost(parts: list[tuple[int, int]]) -> float:
        total = 0.0
        for start, stop in parts:
            span = [None if w >= tk - 1 else w for w in windows[start:stop]]
            window = None if None in span else max(span)
            total += cost_per_call + (stop - start) * causal_work(window, tq, tk)
        return total

    n = len(windows)
    best = math.inf
    for cuts in itertools.product([False, True], repeat=n - 1):
        bounds = [0] + [i + 1 for i, cut in enumerate(cuts) if cut] + [n]
        best = min(best, cost(list(zip(bounds, bounds[1:], strict=False))))
    assert cost([(g.start, g.stop) for g in groups]) == pytest.approx(best)
    assert [g.start for g in groups][0] == 0 and groups[-1].stop == n
    assert all(a.stop == b.start for a, b in zip(groups, groups[1:], strict=False))
    holding_5 = next(g for g in groups if g.start <= 5 < g.stop)
    assert holding_5.window is None  # 100 >= tk - 1: that head sees every key


def test_equal_windows_stay_one_call():
    assert plan_groups([5] * 8, 300, 300) == [HeadGroup(0, 8, 5)]


def float32_alibi_weights(q, k, slopes, scale):
    """softmax weights as a flash kernel computes them in float32: exp2((s - rowmax) * log2 e)."""
    qh, kh = q[0].transpose(0, 1).float(), k[0].transpose(0, 1).float()  # [H, T, D]
    t = q.shape[1]
    pos = torch.arange(t, dtype=torch.float32)
    dist = pos[:, None] - pos[None, :]  # [T, T]
    scores = scale * (qh @ kh.transpose(-1, -2)) - slopes.float().view(-1, 1, 1) * dist
    scores = scores.masked_fill(dist < 0, float("-inf"))
    rowmax = scores.amax(dim=-1, keepdim=True)
    return torch.exp2((scores - rowmax) * math.log2(math.e)), dist  # [H, T, T]


@pytest.mark.parametrize("norm_scale", [0.3, 1.0, 4.0])
def test_weights_beyond_each_heads_window_are_exactly_zero(norm_scale):
    torch.manual_seed(0)
    h, d, t = 8, 16, 1500
    q = torch.randn(1, t, h, d) * norm_scale
    k = torch.randn(1, t, h, d) * norm_scale
    slopes = alibi_slopes(h, 16.0)
    scale = d**-0.5
    windows = head_windows(q, k, slopes, scale=scale)
    weights, dist = float32_alibi_weights(q, k, slopes, scale)
    for head, window in enumerate(windows):
        beyond = dist > window
        assert bool((weights[head][beyond] == 0.0).all()), f"head {head} window {window}"
    # the bound is not vacuous: at moderate norms the steepest head skips most keys at this length
    if norm_scale <= 1.0:
        assert windows[0] < t // 2
    # and it grows with the activations' norms (a bigger reach is never unsafe)
    bigger = head_windows(q * 2, k * 2, slopes, scale=scale)
    assert all(b >= w for b, w in zip(bigger, windows, strict=True))


def test_non_finite_activations_never_shrink_windows():
    q = torch.randn(1, 8, 2, 4)
    q[0, 3, 1, 0] = float("inf")
    windows = head_windows(q, q.clone(), alibi_slopes(2, 8.0), scale=0.5)
    assert windows[1] >= 2**60


class FakeFlashAttn:
    """Stands in for flash_attn.cute.interface: float64 ALiBi attention honouring the arguments the
    windowed path passes (head slice, window_size_left, per-group slope scalars)."""

    def __init__(self, step: float) -> None:
        self.step = step
        self.calls: list[dict] = []

    def _flash_attn_fwd(self, q, k, v, *, softmax_scale, causal, window_size_left, score_mod,
                        aux_tensors, out=None, **options):
        variant, _, head_offset = score_mod
        heads = q.shape[2]
        exponent = -self.step * torch.arange(1 + head_offset, heads + 1 + head_offset, dtype=torch.float64)
        if variant == "aux":
            exponent = torch.log2(aux_tensors[0].double())
        slopes = torch.exp2(exponent)
        self.calls.append({"heads": heads, "window": window_size_left, "variant": variant})
        assert causal
        tq, tk = q.shape[1], k.shape[1]
        out_ref = dense_reference(q.double(), k.double(), v.double(), slopes, scale=softmax_scale)
        if window_size_left is not None:  # recompute with the window mask applied
            qpos = torch.arange(tk - tq, tk)[:, None]
            kpos = torch.arange(tk)[None, :]
            mask = (kpos >= qpos - window_size_left) & (kpos <= qpos)
            qd, kd, vd = (x.double().transpose(1, 2) for x in (q, k, v))
            scores = softmax_scale * qd @ kd.transpose(-1, -2) - slopes.view(1, -1, 1, 1) * (qpos - kpos)
            scores = scores.masked_fill(~mask, float("-inf"))
            out_ref = (torch.softmax(scores, -1) @ vd).transpose(1, 2)
        result = out_ref.to(q.dtype)
        if out is not None:
            out.copy_(result)  # the real kernel writes the caller's (strided) buffer
        return (result if out is None else out,)


@pytest.mark.parametrize("variant", ["exp2", "fused", "aux"])
def test_fa4_windowed_groups_equal_dense_attention(monkeypatch, variant):
    torch.manual_seed(1)
    h, d, t = 8, 16, 640
    slopes = alibi_slopes(h, 16.0)
    step = fa4.geometric_step(slopes)
    fake = FakeFlashAttn(step)
    monkeypatch.setattr(fa4, "_flash_attn_module", lambda: fake)
    monkeypatch.setattr(fa4, "score_mod", lambda name, step=None, head_offset=0: (name, step, head_offset))
    monkeypatch.setattr(fa4.fa4_fused, "score_mod", lambda step, start, scale: ("fused", step, start))
    monkeypatch.setattr(fa4, "_fused_ok", lambda *args: True)  # its own check: the next test
    monkeypatch.setattr(fa4, "WINDOW_MIN_KEYS", 64)
    monkeypatch.setattr(alibi_window, "CALL_COST_ELEMENTS", 1000.0)
    q, k, v = (torch.randn(1, t, h, d, dtype=torch.float64) * 0.5 for _ in range(3))
    chunk = slice(t - 200, t)  # a later prefill chunk: queries sit at the end of the keys
    out = fa4.prefill(q[:, chunk], k, v, slopes, scale=d**-0.5, variant=variant)
    ref = dense_reference(q[:, chunk], k, v, slopes, scale=d**-0.5)
    assert len(fake.calls) > 1, fake.calls  # the steep heads really were split off with a window
    assert any(c["window"] is not None for c in fake.calls)
    assert sum(c["heads"] for c in fake.calls) == h
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_fa4_windows_off_is_one_dense_call(monkeypatch):
    slopes = alibi_slopes(4, 8.0)
    fake = FakeFlashAttn(fa4.geometric_step(slopes))
    monkeypatch.setattr(fa4, "_flash_attn_module", lambda: fake)
    monkeypatch.setattr(fa4, "score_mod", lambda name, step=None, head_offset=0: (name, step, head_offset))
    q = torch.randn(1, 128, 4, 8, dtype=torch.float64)
    fa4.prefill(q, q, q, slopes, scale=0.3, windows=False)
    fa4.prefill(q, q, q, slopes, scale=0.3)  # below WINDOW_MIN_KEYS: not worth a host sync
    assert [c["window"] for c in fake.calls] == [None, None]


class WrongFlashAttn(FakeFlashAttn):
    """A patched kernel that computes something else: its "fused" calls return zeros."""

    def _flash_attn_fwd(self, q, k, v, **kwargs):
        if kwargs["score_mod"][0] != "fused":
            return super()._flash_attn_fwd(q, k, v, **kwargs)
        self.calls.append({"heads": q.shape[2], "window": kwargs["window_size_left"], "variant": "fused"})
        return (torch.zeros_like(q),)


@pytest.mark.parametrize(("kernel", "expected"), [(FakeFlashAttn, "fused"), (WrongFlashAttn, "exp2")])
def test_fused_variant_is_checked_once_against_float64_before_use(monkeypatch, kernel, expected):
    slopes = alibi_slopes(4, 8.0)
    fake = kernel(fa4.geometric_step(slopes))
    monkeypatch.setattr(fa4, "_flash_attn_module", lambda: fake)
    monkeypatch.setattr(fa4, "score_mod", lambda name, step=None, head_offset=0: (name, step, head_offset))
    monkeypatch.setattr(fa4.fa4_fused, "install", lambda: True)
    monkeypatch.setattr(fa4.fa4_fused, "score_mod", lambda step, start, scale: ("fused", step, start))
    monkeypatch.setattr(fa4, "_FUSED_CHECKED", {})
    q = torch.randn(1, 64, 4, 16)
    for _ in range(2):
        fa4.prefill(q, q, q, slopes, scale=0.25, variant="fused", windows=False, tile_mn=None)
    variants = [c["variant"] for c in fake.calls]
    # one check call, then the two real ones: fused when the check passed, exp2 after it failed
    assert variants == ["fused", expected, expected]


@pytest.mark.parametrize("d", [128, 48])
def test_triton_head_norm_max_matches_torch_on_a_strided_view(monkeypatch, d):
    """The CUDA path (a Triton pass over q's strided view), run through Triton's interpreter."""
    pytest.importorskip("triton")
    from pipeline.engine.backends import head_norms

    g = torch.Generator().manual_seed(0)
    b, t, h = 2, 150, 3  # t not a multiple of the kernel's block
    qkv = torch.randn(b, t, 3 * h * d, generator=g).to(torch.bfloat16)
    q = qkv[..., : h * d].reshape(b, t, h, d)  # [B, T, 3*H*D] -> strided [B, T, H, D]
    q[1, 77, 2] *= 9  # one outlier row: the max must find it
    want = torch.linalg.vector_norm(q, dim=-1, dtype=torch.float32).amax(dim=(0, 1))
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # take the Triton path
    got = head_norms.head_norm_max(q)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_heads_that_always_see_every_key_need_no_plan():
    slopes = [2.0 ** -(h + 1) for h in range(8)]  # 0.5 ... 1/256
    # reach with zero norms is UNDERFLOW_NATS / slope (~105 / slope): all of 600 keys from slope ~0.17 down
    assert always_full_from(slopes, 600) == 2
    assert always_full_from(slopes, 10**9) == 8  # nothing is certain for very long keys
    assert always_full_from(slopes, 100) == 0  # everything sees all 100 keys
    assert always_full_from([0.5, 0.0], 10**9) == 1  # a zero slope (no ALiBi) never decays


def test_fa4_launches_the_unplanned_heads_before_reading_norms(monkeypatch):
    torch.manual_seed(2)
    h, d, t = 8, 16, 640
    slopes = alibi_slopes(h, 16.0)
    fake = FakeFlashAttn(fa4.geometric_step(slopes))
    monkeypatch.setattr(fa4, "_flash_attn_module", lambda: fake)
    monkeypatch.setattr(fa4, "score_mod", lambda name, step=None, head_offset=0: (name, step, head_offset))
    monkeypatch.setattr(fa4, "WINDOW_MIN_KEYS", 64)
    monkeypatch.setattr(alibi_window, "CALL_COST_ELEMENTS", 1000.0)
    queued_at: list[int] = []  # kernels already launched when the norms were queued / read on the host
    read_at: list[int] = []
    real_async = alibi_window.head_windows_async

    def spy(q, k, s, *, scale):
        queued_at.append(len(fake.calls))
        pending = real_async(q, k, s, scale=scale)
        real_get = pending.get

        def get():
            read_at.append(len(fake.calls))
            return real_get()

        pending.get = get
        return pending

    monkeypatch.setattr(alibi_window, "head_windows_async", spy)
    q, k, v = (torch.randn(1, t, h, d, dtype=torch.float64) * 0.5 for _ in range(3))
    out = fa4.prefill(q, k, v, slopes, scale=d**-0.5, variant="exp2")
    sure = always_full_from(slopes.tolist(), t)
    assert 0 < sure < h
    assert fake.calls[0] == {"heads": h - sure, "window": None, "variant": "exp2"}
    assert queued_at == [0]  # the norms are queued before that launch (the host waits for them alone)
    assert read_at == [1]  # and read on the host after it
    torch.testing.assert_close(out, dense_reference(q, k, v, slopes, scale=d**-0.5), rtol=1e-10, atol=1e-10)


def test_aligned_plans_start_groups_on_the_grid_only():
    """flash-attn-4 compiles a kernel per group start: aligned plans bound the compiles."""
    from pipeline.engine.backends.alibi_window import plan_groups

    rng = __import__("random").Random(0)
    for _ in range(50):
        windows = sorted(rng.randrange(50, 5000) for _ in range(32))
        groups = plan_groups(windows, 4096, 8192, align=4)
        assert all(g.start % 4 == 0 for g in groups)
        assert [g.start for g in groups][0] == 0 and groups[-1].stop == 32
        assert all(a.stop == b.start for a, b in zip(groups, groups[1:], strict=False))
        for g in groups:  # each group's window covers its heads' windows
            assert g.window is None or g.window >= max(windows[g.start:g.stop])


def test_windows_pay_for_a_full_prefill_as_before_and_not_for_a_short_tail():
    for t in (1, 4095, 4096, 4097, 65536):  # a full prefill: the old rule, keys >= WINDOW_MIN_KEYS
        assert fa4.windows_pay(t, t) == (t >= fa4.WINDOW_MIN_KEYS)
    assert fa4.windows_pay(16384, 32768)  # the second chunk of a long document
    assert not fa4.windows_pay(250, 14336)  # a task's prompt tail after a cached 14K-token document
    assert fa4.windows_pay(250, 65536)  # ... after a 64K-token one: enough work to plan again


def test_fa4_short_chunk_on_a_long_prefix_is_one_plain_call_without_a_host_sync(monkeypatch):
    torch.manual_seed(3)
    h, d, t = 8, 16, 640
    slopes = alibi_slopes(h, 16.0)
    fake = FakeFlashAttn(fa4.geometric_step(slopes))
    monkeypatch.setattr(fa4, "_flash_attn_module", lambda: fake)
    monkeypatch.setattr(fa4, "score_mod", lambda name, step=None, head_offset=0: (name, step, head_offset))
    monkeypatch.setattr(fa4, "WINDOW_MIN_KEYS", 256)  # windows pay from 256 x 257 / 2 score elements
    monkeypatch.setattr(alibi_window, "CALL_COST_ELEMENTS", 1000.0)
    planned: list[int] = []
    real_async = alibi_window.head_windows_async
    monkeypatch.setattr(alibi_window, "head_windows_async",
                        lambda *a, **kw: planned.append(1) or real_async(*a, **kw))
    q, k, v = (torch.randn(1, t, h, d, dtype=torch.float64) * 0.5 for _ in range(3))
    tail = slice(t - 16, t)  # 16 queries x 640 keys: less work than a 256-token prefill
    out = fa4.prefill(q[:, tail], k, v, slopes, scale=d**-0.5, variant="exp2")
    assert [(c["heads"], c["window"]) for c in fake.calls] == [(h, None)] and not planned
    torch.testing.assert_close(out, dense_reference(q[:, tail], k, v, slopes, scale=d**-0.5), rtol=1e-10, atol=1e-10)
    fake.calls.clear()
    fa4.prefill(q[:, t - 200:], k, v, slopes, scale=d**-0.5, variant="exp2")  # 200 x 640: planned
    assert planned and any(c["window"] is not None for c in fake.calls)

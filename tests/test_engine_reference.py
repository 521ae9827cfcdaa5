"""StoryWriter-style settings HF's MPT ignores (alibi_bias_max=16, clip_qkv, 6 heads) against an
independent float64 full-matrix implementation written here from the MPT definition."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from pipeline.engine import DenseGenerator, SamplingParams
from pipeline.engine.init_checkpoint import init_checkpoint
from pipeline.engine.load import load

pytestmark = pytest.mark.usefixtures("engine_single_thread")


def reference_logits(ckpt: Path, ids: list[int]) -> torch.Tensor:
    """Float64, whole sequence at once, explicit [T, T] bias; slopes from the closed form
    2^-(i * alibi_bias_max / 8) over 8 padded heads, odd-indexed first (llm-foundry)."""
    cfg = json.loads((ckpt / "config.json").read_text())
    w = {k: t.double() for k, t in load_file(str(ckpt / "model.safetensors")).items()}
    d, h, clip = cfg["d_model"], cfg["n_heads"], cfg["attn_config"]["clip_qkv"]
    bias_max = cfg["attn_config"]["alibi_bias_max"]
    assert h == 6
    padded = [2.0 ** -(i * bias_max / 8) for i in range(1, 9)]
    slopes = torch.tensor((padded[1::2] + padded[::2])[:h], dtype=torch.float64)
    t = len(ids)

    def lin(x, name):  # Linear with the optional bias
        return x @ w[name + ".weight"].T + w.get(name + ".bias", 0.0)

    def norm(x, name):
        return F.layer_norm(x, (d,), w[name + ".weight"], w.get(name + ".bias"), 1e-5)

    pos = torch.arange(t, dtype=torch.float64)
    dist = pos[:, None] - pos[None, :]  # [T, T]
    bias = -slopes[:, None, None] * dist  # [H, T, T]
    bias = bias.masked_fill(dist < 0, float("-inf"))
    x = w["transformer.wte.weight"][ids]  # [T, d]
    for i in range(cfg["n_layers"]):
        p = f"transformer.blocks.{i}."
        qkv = lin(norm(x, p + "norm_1"), p + "attn.Wqkv").clamp(-clip, clip)
        q, k, v = qkv.split(d, -1)
        if cfg["attn_config"]["qk_ln"]:
            q, k = norm(q, p + "attn.q_ln"), norm(k, p + "attn.k_ln")
        q, k, v = (m.view(t, h, d // h).transpose(0, 1) for m in (q, k, v))  # [T, d] -> [H, T, hd]
        s = q @ k.transpose(1, 2) / math.sqrt(d // h) + bias
        o = (torch.softmax(s, -1) @ v).transpose(0, 1).reshape(t, d)
        x = x + lin(o, p + "attn.out_proj")
        x = x + lin(F.gelu(lin(norm(x, p + "norm_2"), p + "ffn.up_proj")), p + "ffn.down_proj")
    x = norm(x, "transformer.norm_f")
    return x @ w["transformer.wte.weight"].T  # [T, V]


@pytest.fixture(scope="module")
def tiny_ckpt_qk_ln(tmp_path_factory) -> Path:
    """qk_ln, biases everywhere (no_bias=False) and expansion_ratio 3: variants HF's MPT cannot load."""
    return init_checkpoint("tiny", tmp_path_factory.mktemp("tiny-qkln"), seed=4, alibi_bias_max=16,
                           clip_qkv=2.0, qk_ln=True, n_heads=6, d_model=48, no_bias=False, expansion_ratio=3)


@pytest.mark.parametrize("ckpt_fixture", ["tiny_ckpt_sw", "tiny_ckpt_qk_ln"])
def test_logits_and_greedy_tokens_match_float64_reference(ckpt_fixture, request):
    tiny_ckpt_sw = request.getfixturevalue(ckpt_fixture)
    model, tok = load(tiny_ckpt_sw, dtype=torch.float32)
    assert model.config.alibi_bias_max == 16 and model.config.clip_qkv in (0.4, 2.0)
    prompt = tok.encode("Notwithstanding section 4, the licensee may assign this agreement with consent.")
    ours = model.prefill(torch.tensor([prompt]), model.new_cache(1, len(prompt)), logits_from=0)[0]
    ref = reference_logits(tiny_ckpt_sw, prompt)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-4)

    n_new = 20
    (completion,) = DenseGenerator(model, tok, decode_mode="eager").generate_ids(
        [prompt], SamplingParams(max_new_tokens=n_new, greedy=True, stop_at_eos=False))
    ids = list(prompt)
    for _ in range(n_new):  # slow greedy: full recompute each step
        ids.append(int(reference_logits(tiny_ckpt_sw, ids)[-1].argmax()))
    assert completion.tokens == ids[len(prompt):]


def test_reference_differs_from_bias_max_8(tiny_ckpt_sw):
    """The comparison above would not catch a loader that silently used HF's fixed alibi_bias_max=8."""
    model16, tok = load(tiny_ckpt_sw, dtype=torch.float32)
    prompt = tok.encode("the agreement party shall pay the fees " * 4)
    x = torch.tensor([prompt])
    from dataclasses import replace

    from pipeline.engine.model import Mpt
    model8 = Mpt(replace(model16.config, alibi_bias_max=8), backend=model16.backend)
    model8.load_state_dict(model16.state_dict())
    a = model16.prefill(x, model16.new_cache(1, len(prompt)), logits_from=0)
    b = model8.prefill(x, model8.new_cache(1, len(prompt)), logits_from=0)
    assert (a - b).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_copy_wide_is_an_exact_copy_of_strided_views(dtype):
    from pipeline.engine.cache import copy_wide

    qkv = torch.randn(2, 5, 3 * 4 * 8).to(dtype)
    k = qkv[..., 32:64].reshape(2, 5, 4, 8)  # [B, T, 3*H*D] -> strided [B, T, H, D], as in prefill
    cache = torch.zeros(3, 9, 4, 8, dtype=dtype)
    copy_wide(cache[1:3, 2:7], k)
    assert torch.equal(cache[1:3, 2:7], k) and cache[0].abs().sum() == 0 and cache[:, :2].abs().sum() == 0
    shifted = qkv[..., 33:65].reshape(2, 5, 4, 8)  # offset by one element: not word-aligned
    copy_wide(cache[1:3, 2:7], shifted)
    assert torch.equal(cache[1:3, 2:7], shifted)
    odd = torch.randn(2, 3, 3).to(dtype)  # 3 elements per row: not whole words, plain copy
    target = torch.zeros(2, 3, 3, dtype=dtype)
    copy_wide(target, odd)
    assert torch.equal(target, odd)

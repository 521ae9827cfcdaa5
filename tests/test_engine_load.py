"""Checkpoint formats, loader guarantees, tokenizer interop and the CLI."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from longdoc.cli import main
from pipeline.engine import CheckpointError, MptConfig
from pipeline.engine.config import UnsupportedConfig
from pipeline.engine.init_checkpoint import init_checkpoint
from pipeline.engine.load import load
from tests.fixtures_engine import ENGINE_PROMPTS

pytestmark = pytest.mark.usefixtures("engine_single_thread")


def _logits(model, ids):
    return model.prefill(torch.tensor([ids]), model.new_cache(1, len(ids)), logits_from=0)


def test_sharded_safetensors_load_equal_to_single_file(tmp_path, tiny_model):
    sharded = init_checkpoint("tiny", tmp_path / "sharded", seed=1, max_shard_bytes=200_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    model, tok = load(sharded, dtype=torch.float32)
    ids = tok.encode(ENGINE_PROMPTS[0])
    assert torch.equal(_logits(model, ids), _logits(tiny_model[0], ids))


def test_sharded_bin_checkpoint_with_index_loads(tmp_path, tiny_ckpt, hf_tiny, tiny_model):
    """The layout of MosaicML's hub repos: pytorch_model-0000N-of-0000M.bin + index (incl. lm_head copy)."""
    out = tmp_path / "bin"
    out.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_ckpt / name, out / name)
    state = {k: v.clone() for k, v in hf_tiny.state_dict().items()}
    names = sorted(state)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, part in enumerate(halves, 1):
        file = f"pytorch_model-0000{i}-of-00002.bin"
        torch.save({k: state[k] for k in part}, out / file)
        weight_map.update(dict.fromkeys(part, file))
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model, tok = load(out, dtype=torch.float32)
    ids = tok.encode(ENGINE_PROMPTS[1])
    torch.testing.assert_close(_logits(model, ids), _logits(tiny_model[0], ids))


def test_weights_land_on_target_dtype_and_nothing_stays_on_meta(tiny_ckpt, tiny_model):
    from pipeline.engine import DenseGenerator, SamplingParams

    model, tok = load(tiny_ckpt, dtype=torch.bfloat16)
    tensors = list(model.parameters()) + list(model.buffers())
    assert all(t.device.type == "cpu" for t in tensors)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.slopes.dtype == torch.float32
    ids = tok.encode(ENGINE_PROMPTS[2])
    torch.testing.assert_close(_logits(model, ids), _logits(tiny_model[0], ids), rtol=0.05, atol=0.25)
    (out,) = DenseGenerator(model, tok, decode_mode="eager").generate_ids([ids], SamplingParams(max_new_tokens=4, greedy=True,
                                                                                  stop_at_eos=False))
    assert len(out.tokens) == 4


def test_missing_tensor_and_wrong_shape_are_reported(tmp_path, tiny_ckpt):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_ckpt, broken)
    weights = load_file(str(broken / "model.safetensors"))
    weights.pop("transformer.blocks.1.ffn.up_proj.weight")
    save_file(weights, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match="lacks 1 tensors"):
        load(broken)
    weights["transformer.blocks.1.ffn.up_proj.weight"] = torch.zeros(3, 3)
    save_file(weights, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match="shape"):
        load(broken)
    with pytest.raises(CheckpointError, match="not found"):
        load(tmp_path / "nowhere")


def test_config_honours_checkpoint_fields_and_max_seq_len_override(tiny_ckpt):
    raw = json.loads((tiny_ckpt / "config.json").read_text())
    cfg = MptConfig.from_hf_dict(raw, max_seq_len=83_968)
    assert (cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.max_seq_len) == (64, 4, 2, 83_968)
    assert cfg.tie_word_embeddings and cfg.no_bias and cfg.low_precision_layernorm
    with pytest.raises(ValueError, match="only be raised"):
        MptConfig.from_hf_dict(raw, max_seq_len=16)
    with pytest.raises(UnsupportedConfig):
        MptConfig.from_hf_dict({**raw, "attn_config": {"alibi": False}})
    cfg2 = MptConfig.from_hf_dict({**raw, "logit_scale": "inv_sqrt_d_model", "expansion_ratio": 2})
    assert cfg2.logit_scale == pytest.approx(1 / 8) and cfg2.ffn_hidden == 128


def test_tokenizer_loads_in_transformers_with_the_same_ids(tiny_ckpt, tiny_model):
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    _, tok = tiny_model
    for text in ENGINE_PROMPTS:
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
        assert tok.decode(tok.encode(text)) == text
    assert hf_tok.eos_token_id == tok.eos_token_id


def test_cli_init_then_generate(tmp_path, capsys):
    out = tmp_path / "cli-model"
    assert main(["model", "init", "--preset", "tiny", "--out", str(out), "--seed", "5"]) == 0
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    capsys.readouterr()
    args = ["generate", "--model", str(out), "--prompt", "The agreement", "--max-new-tokens", "8", "--greedy"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first and first.strip()
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "checkpoint directory not found" in capsys.readouterr().err
    assert main([*args[:3], "--prompt", "", "--max-new-tokens", "4"]) == 2
    assert "empty" in capsys.readouterr().err
    assert main([*args, "--device", "cpu", "--decode-mode", "graph"]) == 2  # refused, not downgraded
    assert "needs a CUDA model" in capsys.readouterr().err


def test_max_seq_len_raised_at_load_runs_past_the_checkpoint_limit(tiny_ckpt, tiny_model):
    """ALiBi has no learned positions: a 2,600-token prompt runs on a max_seq_len 2,048 checkpoint once
    raised at load; chunking (several key blocks of the blockwise kernel) changes nothing."""
    from pipeline.engine import DenseGenerator, SamplingParams, prefill_chunked

    model, tok = load(tiny_ckpt, dtype=torch.float32, max_seq_len=4096)
    ids = torch.randint(3, 1000, (2600,), generator=torch.Generator().manual_seed(0)).tolist()
    one = prefill_chunked(model, ids, model.new_cache(1, len(ids)), chunk_size=len(ids))
    chunked = prefill_chunked(model, ids, model.new_cache(1, len(ids)), chunk_size=700)
    torch.testing.assert_close(chunked, one, rtol=1e-4, atol=1e-4)
    (out,) = DenseGenerator(model, tok, decode_mode="eager").generate_ids([ids], SamplingParams(max_new_tokens=3, greedy=True))
    assert out.prompt_tokens == 2600 and out.finish_reason in ("length", "eos")
    with pytest.raises(ValueError, match="max_seq_len"):
        DenseGenerator(tiny_model[0], tok, decode_mode="eager").generate_ids([ids], SamplingParams(max_new_tokens=3))

"""Write a random-weight HF-format MPT checkpoint plus a locally trained byte-level BPE tokenizer.

Tests and benchmarks use it (no hub needed). Weights are generated tensor by tensor and written in
safetensors shards of at most `max_shard_bytes`, so the 7B shape never needs a full copy in memory
(peak host memory ~ one shard, 2 GiB by default, plus one tensor).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
PAD = "<|padding|>"


@dataclass(frozen=True)
class Preset:
    d_model: int
    n_heads: int
    n_layers: int
    vocab_size: int
    max_seq_len: int
    tokenizer_vocab: int
    alibi_bias_max: float = 8
    clip_qkv: float | None = None
    qk_ln: bool = False
    no_bias: bool = True
    expansion_ratio: int = 4
    init_std: float = 0.02
    norm_noise: float = 0.0  # LayerNorm weights 1 + N(0, norm_noise): non-trivial norms make tests sharper
    dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    # large init_std: peaked next-token distributions, so greedy comparisons never sit on near-ties
    "tiny": Preset(d_model=64, n_heads=4, n_layers=2, vocab_size=1024, max_seq_len=2048,
                   tokenizer_vocab=1000, init_std=0.15, norm_noise=0.2),
    # MPT-7B-StoryWriter-65k+ shape (random weights)
    "mpt-7b-shape": Preset(d_model=4096, n_heads=32, n_layers=32, vocab_size=50432, max_seq_len=65536,
                           tokenizer_vocab=50277, alibi_bias_max=16, dtype="bfloat16"),
}


def hf_config(p: Preset, eos_id: int) -> dict[str, Any]:
    return {
        "architectures": ["MptForCausalLM"],
        "model_type": "mpt",
        "d_model": p.d_model,
        "n_heads": p.n_heads,
        "n_layers": p.n_layers,
        "expansion_ratio": p.expansion_ratio,
        "max_seq_len": p.max_seq_len,
        "vocab_size": p.vocab_size,
        "attn_config": {
            "attn_type": "multihead_attention",
            "attn_impl": "torch",
            "alibi": True,
            "alibi_bias_max": p.alibi_bias_max,
            "clip_qkv": p.clip_qkv,
            "qk_ln": p.qk_ln,
            "softmax_scale": None,
            "prefix_lm": False,
        },
        "no_bias": p.no_bias,
        "norm_type": "low_precision_layernorm",
        "layer_norm_epsilon": 1e-5,
        "learned_pos_emb": True,
        "logit_scale": None,
        "tie_word_embeddings": True,
        "use_cache": False,
        "eos_token_id": eos_id,
        "bos_token_id": eos_id,
        "torch_dtype": p.dtype,
        **p.extra,
    }


def _tensor_shapes(p: Preset) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init) in checkpoint order; init is "normal", "ones" or "bias" (small normal).
    With no_bias=False every Linear and LayerNorm also carries a bias (as llm-foundry builds them)."""
    d, f = p.d_model, p.expansion_ratio * p.d_model

    def module(name: str, weight: tuple[int, ...], init: str) -> Iterator[tuple[str, tuple[int, ...], str]]:
        yield name + ".weight", weight, init
        if not p.no_bias:
            yield name + ".bias", weight[:1], "bias"

    yield "transformer.wte.weight", (p.vocab_size, d), "normal"
    for i in range(p.n_layers):
        pre = f"transformer.blocks.{i}."
        yield from module(pre + "norm_1", (d,), "ones")
        yield from module(pre + "attn.Wqkv", (3 * d, d), "normal")
        if p.qk_ln:
            yield from module(pre + "attn.q_ln", (d,), "ones")
            yield from module(pre + "attn.k_ln", (d,), "ones")
        yield from module(pre + "attn.out_proj", (d, d), "normal")
        yield from module(pre + "norm_2", (d,), "ones")
        yield from module(pre + "ffn.up_proj", (f, d), "normal")
        yield from module(pre + "ffn.down_proj", (d, f), "normal")
    yield from module("transformer.norm_f", (d,), "ones")


def write_weights(p: Preset, out: Path, *, seed: int, max_shard_bytes: int = 2 << 30) -> list[Path]:
    from safetensors.torch import save_file

    dtype = getattr(torch, p.dtype)
    gen = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    files: list[Path] = []
    weight_map: dict[str, str] = {}

    def flush() -> None:
        if not shards[-1]:
            return
        name = f"shard-{len(files) + 1:05d}.safetensors"
        save_file(shards[-1], str(out / name), metadata={"format": "pt"})
        files.append(out / name)
        weight_map.update(dict.fromkeys(shards[-1], name))
        shards[-1], sizes[-1] = {}, 0

    for name, shape, init in _tensor_shapes(p):
        if init == "ones":
            t = torch.ones(shape, dtype=dtype)
            if p.norm_noise:
                t += torch.empty(shape, dtype=dtype).normal_(0.0, p.norm_noise, generator=gen)
        elif init == "bias":
            t = torch.empty(shape, dtype=dtype).normal_(0.0, 0.1, generator=gen)
        else:
            t = torch.empty(shape, dtype=dtype).normal_(0.0, p.init_std, generator=gen)
        nbytes = t.numel() * t.element_size()
        if sizes[-1] and sizes[-1] + nbytes > max_shard_bytes:
            flush()
        shards[-1][name] = t
        sizes[-1] += nbytes
    flush()
    if len(files) == 1:
        single = out / "model.safetensors"
        files[0].rename(single)
        return [single]
    total = sum(f.stat().st_size for f in files)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return files


_WORDS = (
    "the agreement party parties shall may not any all of to in and or for by with under this that "
    "such provided however notwithstanding section clause term termination notice written days "
    "payment fee fees invoice services company licensor licensee customer supplier distributor "
    "confidential information obligations rights license territory product products warranty "
    "liability damages indemnify law governing court dispute effective date year years month report "
    "summary question answer page document revenue percent total amount net sales exclusive "
    "non-exclusive renewal breach cure period force majeure assignment consent affiliate"
)


def synthetic_text(seed: int, n_words: int = 60_000) -> Iterator[str]:
    """Deterministic contract-flavoured text for tokenizer training when no text files are given."""
    rng = random.Random(seed)
    words = _WORDS.split()
    line: list[str] = []
    for i in range(n_words):
        w = rng.choice(words)
        if rng.random() < 0.08:
            w = w.capitalize()
        if rng.random() < 0.05:
            w = f"{rng.randint(1, 9999)}"
        line.append(w)
        if rng.random() < 0.07:
            line[-1] += rng.choice([".", ",", ";", ":", "?"])
        if len(line) > 14 or i == n_words - 1:
            yield " ".join(line) + "\n"
            line = []


def train_tokenizer(texts: Iterable[str], vocab_size: int, out: Path, *, model_max_length: int) -> int:
    """Byte-level BPE (gpt-neox style) trained on `texts`; writes tokenizer.json and
    tokenizer_config.json; returns the end-of-text token id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": PAD,
        "model_max_length": model_max_length,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    eos_id = tok.token_to_id(EOS)
    assert eos_id is not None
    return eos_id


def init_checkpoint(
    preset: str | Preset,
    out: Path,
    *,
    seed: int = 0,
    text_files: list[Path] | None = None,
    max_shard_bytes: int = 2 << 30,
    **overrides: Any,
) -> Path:
    """Write config.json, safetensors weights and a tokenizer to `out`; `overrides` replace preset fields
    (e.g. alibi_bias_max=16, clip_qkv=0.5)."""
    p = PRESETS[preset] if isinstance(preset, str) else preset
    p = replace(p, **overrides)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if text_files:
        texts: Iterable[str] = (f.read_text(errors="replace") for f in text_files)
    else:
        texts = synthetic_text(seed)
    vocab = min(p.tokenizer_vocab, p.vocab_size)
    eos_id = train_tokenizer(texts, vocab, out, model_max_length=p.max_seq_len)
    (out / "config.json").write_text(json.dumps(hf_config(p, eos_id), indent=2))
    files = write_weights(p, out, seed=seed, max_shard_bytes=max_shard_bytes)
    log.info("wrote %s checkpoint to %s (%d weight files)", p.dtype, out, len(files))
    return out

"""Chunked prefill, batching, sampling, stop strings and scoring on the tiny checkpoint."""

from __future__ import annotations

import pytest
import torch

from pipeline.engine import DenseGenerator, SamplingParams, prefill_chunked
from pipeline.engine.sampling import top_p_filter
from pipeline.engine.score import score, score_texts
from tests.fixtures_engine import ENGINE_PROMPTS

pytestmark = pytest.mark.usefixtures("engine_single_thread")

GREEDY = SamplingParams(max_new_tokens=16, greedy=True, stop_at_eos=False)


def long_prompt(tok) -> list[int]:
    return tok.encode(" ".join(ENGINE_PROMPTS) * 3)


@pytest.mark.parametrize("chunk", [2, 7, 33])
def test_chunked_prefill_equals_one_pass(tiny_model, chunk):
    model, tok = tiny_model
    ids = long_prompt(tok)
    one_cache, chunk_cache = model.new_cache(1, len(ids)), model.new_cache(1, len(ids))
    one = prefill_chunked(model, ids, one_cache, chunk_size=len(ids))
    chunked = prefill_chunked(model, ids, chunk_cache, chunk_size=chunk)
    torch.testing.assert_close(chunked, one, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunk_cache.k, one_cache.k, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [7, 64])
def test_chunked_and_batched_generation_equal_single_requests(tiny_model, chunk):
    model, tok = tiny_model
    prompts = [*ENGINE_PROMPTS, " ".join(ENGINE_PROMPTS) * 2]
    alone = DenseGenerator(model, tok, chunk_size=100_000, decode_mode="eager")
    expected = [alone.generate([p], GREEDY)[0].tokens for p in prompts]
    batched = DenseGenerator(model, tok, chunk_size=chunk, decode_mode="eager").generate(prompts, GREEDY)
    assert [c.tokens for c in batched] == expected


def test_seeded_sampling_is_reproducible_and_seed_dependent(tiny_generator):
    params = SamplingParams(max_new_tokens=24, temperature=1.5, seed=7, stop_at_eos=False)
    a = tiny_generator.generate(ENGINE_PROMPTS[:2], params)
    b = tiny_generator.generate(ENGINE_PROMPTS[:2], params)
    c = tiny_generator.generate(ENGINE_PROMPTS[:2], SamplingParams(max_new_tokens=24, temperature=1.5, seed=8,
                                                                 stop_at_eos=False))
    assert [x.tokens for x in a] == [x.tokens for x in b]
    assert [x.tokens for x in a] != [x.tokens for x in c]


def test_seeded_sample_does_not_depend_on_batch_company(tiny_generator):
    params = SamplingParams(max_new_tokens=12, temperature=1.5, seed=11, stop_at_eos=False)
    (alone,) = tiny_generator.generate(ENGINE_PROMPTS[1:2], params)
    batched = tiny_generator.generate([ENGINE_PROMPTS[0], ENGINE_PROMPTS[1]], params)
    assert batched[1].tokens == alone.tokens


def test_tiny_top_p_samples_only_the_argmax(tiny_generator):
    (greedy,) = tiny_generator.generate(ENGINE_PROMPTS[:1], GREEDY)
    (nucleus,) = tiny_generator.generate(
        ENGINE_PROMPTS[:1], SamplingParams(max_new_tokens=16, temperature=2.0, top_p=1e-6, seed=3, stop_at_eos=False))
    assert nucleus.tokens == greedy.tokens


def test_top_p_filter_keeps_smallest_set_reaching_mass():
    probs = torch.tensor([[0.1, 0.5, 0.15, 0.25], [0.7, 0.1, 0.1, 0.1]])
    out = top_p_filter(probs, 0.7)
    # row 0: 0.5 + 0.25 reaches 0.7 -> two tokens; row 1: 0.7 alone reaches it
    torch.testing.assert_close(out, torch.tensor([[0, 0.5 / 0.75, 0, 0.25 / 0.75], [1.0, 0, 0, 0]]))
    g = torch.Generator().manual_seed(0)
    draws = torch.multinomial(out[0].expand(500, 4), 1, generator=g)
    assert set(draws.flatten().tolist()) == {1, 3}


def test_stop_string_truncates_text(tiny_generator):
    params = SamplingParams(max_new_tokens=24, greedy=True, stop_at_eos=False)
    (full,) = tiny_generator.generate(ENGINE_PROMPTS[:1], params)
    assert len(full.text) > 6
    stop = full.text[4:7]
    (stopped,) = tiny_generator.generate(ENGINE_PROMPTS[:1], SamplingParams(
        max_new_tokens=24, greedy=True, stop_at_eos=False, stop=(stop,)))
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[: full.text.find(stop)]
    assert stopped.tokens == full.tokens[: len(stopped.tokens)] and len(stopped.tokens) < len(full.tokens)


def test_end_of_text_token_ends_a_sequence(tiny_model):
    model, tok = tiny_model
    (full,) = DenseGenerator(model, tok, decode_mode="eager").generate(ENGINE_PROMPTS[:1], GREEDY)
    eos = full.tokens[5]
    first = full.tokens.index(eos)
    gen = DenseGenerator(model, type(tok)(tok.inner, eos_token_id=eos), decode_mode="eager")
    (ended,) = gen.generate(ENGINE_PROMPTS[:1], SamplingParams(max_new_tokens=16, greedy=True))
    assert ended.finish_reason == "eos" and ended.tokens == full.tokens[:first]


def test_bad_requests_raise_clear_errors(tiny_generator):
    with pytest.raises(ValueError, match="empty"):
        tiny_generator.generate_ids([[]], GREEDY)
    with pytest.raises(ValueError, match="max_seq_len"):
        tiny_generator.generate_ids([[1] * 2040], GREEDY)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)


def test_score_equals_log_softmax_sum_of_a_full_forward(tiny_model, hf_tiny):
    model, tok = tiny_model
    prefix = tok.encode(ENGINE_PROMPTS[2])
    conts = [tok.encode(" termination"), tok.encode(" payment of fees"), tok.encode("?")]
    got = score(model, prefix, conts, chunk_size=4)
    for cont, value in zip(conts, got, strict=True):
        ids = prefix + cont
        with torch.no_grad():
            logp = torch.log_softmax(hf_tiny(torch.tensor([ids])).logits[0].double(), -1)  # [T, V]
        expected = sum(logp[len(prefix) - 1 + i, t] for i, t in enumerate(cont))
        assert value == pytest.approx(float(expected), abs=1e-3)
    assert score_texts(model, tok, ENGINE_PROMPTS[2], [" termination"]) == pytest.approx(got[:1], abs=1e-5)


def test_generator_load_and_score_wrappers(tiny_ckpt, tiny_model):
    gen = DenseGenerator.load(tiny_ckpt, device="cpu", chunk_size=16)
    assert gen.model.dtype == torch.float32 and gen.decode_mode == "eager"
    prefix, conts = tiny_model[1].encode(ENGINE_PROMPTS[0]), [[5, 6], [7]]
    assert gen.score(prefix, conts) == pytest.approx(score(tiny_model[0], prefix, conts), abs=1e-5)


def test_shared_prefix_fork_equals_full_prompts_run_alone(tiny_model, tiny_generator):
    _, tok = tiny_model
    prefix = tok.encode(" ".join(ENGINE_PROMPTS))
    suffixes = [tok.encode(" Question: what is the term?"), tok.encode(" Summary:"), tok.encode(" fees")]
    shared = tiny_generator.generate_from_prefix(prefix, suffixes, GREEDY)
    alone = [tiny_generator.generate_ids([prefix + s], GREEDY)[0] for s in suffixes]
    assert [c.tokens for c in shared] == [c.tokens for c in alone]
    assert [c.prompt_tokens for c in shared] == [len(prefix) + len(s) for s in suffixes]


def test_incremental_stop_detection_equals_searching_the_whole_decoded_text(tiny_generator):
    """The incremental detokenizer finds the same first stop string, at the same place, as decoding
    every token each step, over random token streams (multi-byte characters split across byte-level
    BPE tokens included)."""
    import random

    from pipeline.engine.stream import TokenStream

    tok = tiny_generator.tokenizer
    rng = random.Random(0)
    vocab = tok.vocab_size
    stops_pool = [" the", "e", "ab", "\n\n", "é", "ing ", "xyz"]
    checked = 0
    for _ in range(60):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        ids = [i for i in ids if i != tok.eos_token_id] or [0]
        stops = tuple(rng.sample(stops_pool, 2))
        params = SamplingParams(max_new_tokens=len(ids), stop=stops, stop_at_eos=False)
        stream = TokenStream(tok, params)
        for i in ids:
            stream.push(i)
        # the old rule: after each token, search the decode of everything so far
        want_reason, want_text, want_len = "length", None, len(ids)
        for n in range(1, len(ids) + 1):
            text = tok.decode(ids[:n])
            hits = [j for s in stops if (j := text.find(s)) >= 0]
            if hits:
                want_reason, want_text, want_len = "stop", text[: min(hits)], n
                break
        assert stream.finish_reason == want_reason, (ids, stops)
        if want_reason == "stop":
            assert stream.text == want_text and len(stream.tokens) == want_len
            checked += 1
    assert checked >= 10  # the comparison really exercised stops


def test_multibyte_character_split_across_tokens_is_not_matched_early(tiny_generator):
    from pipeline.engine.stream import TokenStream

    tok = tiny_generator.tokenizer
    ids = tok.encode("naïve café ünïcode")
    stream = TokenStream(tok, SamplingParams(max_new_tokens=len(ids), stop=("é",), stop_at_eos=False))
    for i in ids:
        stream.push(i)
    assert stream.finish_reason == "stop" and stream.text == "naïve caf"

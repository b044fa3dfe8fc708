"""stream_generate / generate / batch_generate on tiny random models with a tiny trained
tokenizer: greedy parity with MobileLLM.generate, stopping, sampling options, logits
processors, prompt-cache reuse, bounded caches, saved caches, speculative decoding, batches."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from generation_helpers import collect, force_tokens, ids_of, tiny_model
from mlx_mobilellm import PromptCache, batch_generate, generate, stream_generate
from mlx_mobilellm.cache import RotatingKVCache, load_prompt_cache, save_prompt_cache
from mlx_mobilellm.sampling import min_p_filter, repetition_penalty, sample

TURN1 = "Tell me a story about a llama."
TURN2 = " And then what happened?"


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(tokenizer.vocab_size, seed=0)


@pytest.fixture(scope="module")
def draft(tokenizer):
    return tiny_model(tokenizer.vocab_size, seed=5, num_layers=1, embed_dim=16, num_heads=2,
                      num_kv_heads=1, hidden_dim=32)


def run(model, tokenizer, prompt, max_tokens=12, **kwargs):
    """(text, tokens, responses); EOS off unless asked, so runs have a known length."""
    kwargs.setdefault("eos_token_ids", [])
    return collect(stream_generate(model, tokenizer, prompt, max_tokens, **kwargs))


def reference_greedy(model, ids, count) -> list:
    """MobileLLM.generate (an independent decode loop) at temperature 0, no EOS."""
    out = model.generate(mx.array([ids]), max_new_tokens=count, temperature=0.0, eos_token_id=[])
    return ids_of(out[0, len(ids):])


def last_logits(model, ids) -> np.ndarray:
    """Next-token logits by a full forward pass without a cache."""
    return np.array(model(mx.array([ids])).logits[0, -1].astype(mx.float32))


def penalised(logits: np.ndarray, context, penalty: float) -> np.ndarray:
    """CTRL's repetition penalty by hand."""
    out = logits.copy()
    for token in set(context):
        out[token] = out[token] / penalty if out[token] > 0 else out[token] * penalty
    return out


# --- greedy, lengths, stopping -------------------------------------------------------------------

@pytest.mark.parametrize("seed_prompt", [TURN1, "x", "🦙 你好 " * 8])
def test_greedy_stream_equals_model_generate(model, tokenizer, seed_prompt):
    ids = tokenizer.encode(seed_prompt)
    text, tokens, responses = run(model, tokenizer, ids, 20)
    assert tokens == reference_greedy(model, ids, 20)
    assert text == tokenizer.decode(tokens)
    assert generate(model, tokenizer, ids, 20, eos_token_ids=[]) == text


@pytest.mark.parametrize("max_tokens", [1, 2, 7])
def test_max_tokens_and_finish_reason_length(model, tokenizer, max_tokens):
    _, tokens, responses = run(model, tokenizer, TURN1, max_tokens)
    assert len(tokens) == max_tokens
    assert [r.generation_tokens for r in responses] == list(range(1, max_tokens + 1))
    assert [r.finish_reason for r in responses] == [None] * (max_tokens - 1) + ["length"]


def test_max_tokens_is_capped_by_the_context(tokenizer):
    short = tiny_model(tokenizer.vocab_size, seed=0, max_seq_len=30)
    ids = tokenizer.encode(TURN1)
    _, tokens, responses = run(short, tokenizer, ids, 100)
    assert len(ids) + len(tokens) == 30 and responses[-1].finish_reason == "length"
    with pytest.raises(ValueError, match="context is 30"):
        run(short, tokenizer, ids * 3)
    with pytest.raises(ValueError, match="empty"):
        run(short, tokenizer, [])


def test_eos_token_stops_with_finish_reason_stop(model, tokenizer):
    ids = tokenizer.encode(TURN1)
    greedy = reference_greedy(model, ids, 12)
    eos = greedy[4]
    text, tokens, responses = run(model, tokenizer, ids, 12, eos_token_ids=[eos])
    assert tokens == greedy[: greedy.index(eos) + 1]
    assert responses[-1].finish_reason == "stop"
    assert text == tokenizer.decode(tokens[:-1])  # the EOS token's text is not shown


def test_default_eos_ids_are_the_tokenizers_and_the_models(tokenizer):
    ids = tokenizer.encode(TURN1)
    plain = tiny_model(tokenizer.vocab_size, seed=0)
    greedy = reference_greedy(plain, ids, 12)
    # The model config's EOS id counts as well as the tokenizer's (<|im_end|>, <|eot|>).
    with_eos = tiny_model(tokenizer.vocab_size, seed=0, eos_token_id=greedy[3])
    _, tokens, responses = collect(stream_generate(with_eos, tokenizer, ids, 12))
    assert tokens == greedy[: greedy.index(greedy[3]) + 1]
    assert responses[-1].finish_reason == "stop"
    for eos in tokenizer.eos_token_ids:
        forced = force_tokens([greedy[0], eos], len(ids))
        _, tokens, responses = collect(stream_generate(plain, tokenizer, ids, 12,
                                                       logits_processors=[forced]))
        assert tokens == [greedy[0], eos] and responses[-1].finish_reason == "stop"


# --- sampling ------------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [dict(top_k=1), dict(min_p=0.999), dict(top_p=1e-6)],
                         ids=["top_k=1", "min_p", "top_p"])
def test_filters_that_leave_one_token_equal_greedy(model, tokenizer, options):
    ids = tokenizer.encode(TURN1)
    _, tokens, _ = run(model, tokenizer, ids, 15, temperature=1.0, seed=3, **options)
    assert tokens == reference_greedy(model, ids, 15)


def test_sampling_differs_from_greedy_and_is_seeded(model, tokenizer):
    ids = tokenizer.encode(TURN1)
    first = run(model, tokenizer, ids, 15, temperature=1.0, seed=11)[1]
    assert first == run(model, tokenizer, ids, 15, temperature=1.0, seed=11)[1]
    assert first != run(model, tokenizer, ids, 15, temperature=1.0, seed=12)[1]
    assert first != reference_greedy(model, ids, 15)
    top_p = run(model, tokenizer, ids, 15, temperature=0.8, top_p=0.9, seed=11)[1]
    assert top_p == run(model, tokenizer, ids, 15, temperature=0.8, top_p=0.9, seed=11)[1]


def test_min_p_keeps_tokens_at_least_min_p_times_the_best():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 50)).astype(np.float32) * 2
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    kept = np.isfinite(np.array(min_p_filter(mx.array(logits), 0.3)))
    np.testing.assert_array_equal(kept, probs >= 0.3 * probs.max(-1, keepdims=True))
    # Sampling with min_p draws only kept tokens, and more than one of them.
    rows = mx.array(np.repeat(logits[:1], 400, axis=0))
    drawn = np.array(sample(rows, temperature=1.0, min_p=0.3, key=mx.random.key(0)))
    assert set(drawn.tolist()) <= set(np.flatnonzero(kept[0]).tolist())
    assert len(set(drawn.tolist())) > 1


def test_repetition_penalty_processor_by_hand():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((1, 30)).astype(np.float32)
    history = [3, 7, 7, 12, 29, 0, 5]
    out = repetition_penalty(1.7, context_size=4)(mx.array(history), mx.array(logits))
    np.testing.assert_allclose(np.array(out)[0], penalised(logits[0], history[-4:], 1.7), rtol=1e-6)


def repeating_prompt(model, tokenizer) -> list:
    """A prompt whose greedy next token already occurs in it (random models soon repeat)."""
    ids = tokenizer.encode(TURN1)
    for _ in range(40):
        token = int(np.argmax(last_logits(model, ids)))
        if token in ids[-8:]:
            return ids
        ids = ids + [token]
    raise AssertionError("greedy decoding never repeated a token")


def test_repetition_penalty_equals_hand_computation(model, tokenizer):
    ids = repeating_prompt(model, tokenizer)
    penalty, context = 3.0, 8
    # One step: the first token is the argmax of the penalised logits, and the penalty matters.
    logits = last_logits(model, ids)
    first = int(np.argmax(penalised(logits, ids[-context:], penalty)))
    assert first != int(np.argmax(logits))
    options = dict(repetition_penalty=penalty, repetition_context_size=context)
    _, tokens, _ = run(model, tokenizer, ids, 10, **options)
    assert tokens[0] == first
    # Every step, by full recomputation.
    expected, seq = [], list(ids)
    for _ in range(10):
        token = int(np.argmax(penalised(last_logits(model, seq), seq[-context:], penalty)))
        expected.append(token)
        seq.append(token)
    assert tokens == expected
    assert tokens != reference_greedy(model, ids, 10)


def test_custom_logits_processor_sees_history_and_is_applied(model, tokenizer):
    ids = tokenizer.encode(TURN1)
    target = tokenizer.encode(" forced words 🦙", add_special_tokens=False)
    seen = []
    text, tokens, _ = run(model, tokenizer, ids, len(target),
                          logits_processors=[force_tokens(target, len(ids), seen)])
    assert tokens == target and text == " forced words 🦙"
    for step, history in enumerate(seen[: len(target)]):
        assert history == ids + target[:step]


@pytest.mark.parametrize("value", [dict(temperature=-1.0), dict(top_p=1.5), dict(min_p=-0.1),
                                   dict(top_k=-2)])
def test_bad_sampling_values_raise(model, tokenizer, value):
    with pytest.raises(ValueError, match=next(iter(value))):
        run(model, tokenizer, TURN1, **value)


# --- prompts and responses -----------------------------------------------------------------------

def test_prompt_as_text_equals_prompt_as_ids(model, tokenizer):
    ids = tokenizer.encode(TURN1)
    assert ids[0] == tokenizer.bos_token_id  # text is encoded with BOS, as the tokenizer says
    assert run(model, tokenizer, TURN1)[1] == run(model, tokenizer, ids)[1]
    assert run(model, tokenizer, np.array(ids))[1] == run(model, tokenizer, ids)[1]


def test_each_response_carries_speed_and_memory(model, tokenizer):
    ids = tokenizer.encode(TURN1)
    _, _, responses = run(model, tokenizer, ids, 6)
    for i, r in enumerate(responses):
        assert r.prompt_tokens == len(ids) and r.cached_tokens == 0
        assert r.prompt_tps > 0 and r.peak_memory > 0
        assert (r.generation_tps > 0) if i else (r.generation_tps >= 0)


def test_generate_verbose_prints_text_and_stats(model, tokenizer, capsys):
    text = generate(model, tokenizer, TURN1, 5, verbose=True, eos_token_ids=[])
    out = capsys.readouterr().out
    assert out.startswith(text)
    assert "prompt: " in out and "tokens/s" in out and "peak memory" in out


# --- prompt cache ---------------------------------------------------------------------------------

def two_turns(model, tokenizer, cache, first_options=(), **options):
    """Turn 1 into `cache`; returns the second turn's full prompt (turn 1, its answer, more)."""
    ids = tokenizer.encode(TURN1)
    _, tokens, _ = run(model, tokenizer, ids, 6, prompt_cache=cache, **dict(first_options))
    return ids + tokens + tokenizer.encode(TURN2, add_special_tokens=False)


@pytest.mark.parametrize("options", [{}, dict(temperature=0.9, seed=4)], ids=["greedy", "sampled"])
def test_second_turn_processes_only_new_tokens_and_equals_a_fresh_run(model, tokenizer, options):
    cache = PromptCache.for_model(model)
    prompt = two_turns(model, tokenizer, cache)
    # New: turn 2, and turn 1's last token (handed out, never fed back: no step computed past
    # max_tokens).
    new = len(tokenizer.encode(TURN2, add_special_tokens=False)) + 1
    _, tokens, responses = run(model, tokenizer, prompt, 10, prompt_cache=cache, **options)
    assert responses[0].prompt_tokens == new
    assert responses[0].cached_tokens == len(prompt) - new
    assert tokens == run(model, tokenizer, prompt, 10, **options)[1]
    assert cache.tokens == prompt + tokens[:-1]
    assert cache.cache[0].offset == len(prompt) + len(tokens) - 1


def test_changed_earlier_turn_trims_the_cache_to_the_common_prefix(model, tokenizer):
    cache = PromptCache.for_model(model)
    prompt = two_turns(model, tokenizer, cache)
    changed = list(prompt)
    changed[5] = (changed[5] + 1) % tokenizer.vocab_size
    _, tokens, responses = run(model, tokenizer, changed, 10, prompt_cache=cache)
    assert responses[0].cached_tokens == 5
    assert responses[0].prompt_tokens == len(changed) - 5
    assert tokens == run(model, tokenizer, changed, 10)[1]


def test_same_prompt_again_reprocesses_only_its_last_token(model, tokenizer):
    cache = PromptCache.for_model(model)
    ids = tokenizer.encode(TURN1)
    first = run(model, tokenizer, ids, 8, prompt_cache=cache)[1]
    _, again, responses = run(model, tokenizer, ids, 8, prompt_cache=cache)
    assert responses[0].prompt_tokens == 1 and again == first


def test_repetition_penalty_with_a_prompt_cache_equals_a_fresh_run(model, tokenizer):
    """The penalty looks back over the whole context, cached turns included."""
    options = dict(repetition_penalty=2.0, repetition_context_size=64)
    cache = PromptCache.for_model(model)
    prompt = two_turns(model, tokenizer, cache, options)
    _, tokens, responses = run(model, tokenizer, prompt, 10, prompt_cache=cache, **options)
    assert responses[0].cached_tokens > 0
    assert tokens == run(model, tokenizer, prompt, 10, **options)[1]


# --- bounded (rotating) cache ---------------------------------------------------------------------

def test_rotating_cache_equals_unbounded_while_the_context_fits(model, tokenizer):
    ids = tokenizer.encode(TURN1)
    bounded = run(model, tokenizer, ids, 30, max_kv_size=len(ids) + 30)[1]
    assert bounded == run(model, tokenizer, ids, 30)[1]
    # Also across turns: trimming works while nothing was dropped yet.
    cache = PromptCache.for_model(model, max_kv_size=64)
    prompt = two_turns(model, tokenizer, cache)
    _, tokens, responses = run(model, tokenizer, prompt, 10, prompt_cache=cache)
    assert responses[0].cached_tokens > 0 and tokens == run(model, tokenizer, prompt, 10)[1]


@pytest.mark.parametrize("prompt_len", [10, 40])
def test_rotating_cache_keeps_generating_past_its_bound(model, tokenizer, prompt_len):
    bound = 16
    ids = (tokenizer.encode(TURN1 * 4))[:prompt_len]
    cache = PromptCache.for_model(model, max_kv_size=bound)
    _, tokens, responses = run(model, tokenizer, ids, 60, prompt_cache=cache)
    assert len(tokens) == 60 and responses[-1].finish_reason == "length"
    for layer in cache.cache:
        assert isinstance(layer, RotatingKVCache)
        # The last token was never fed back; the ring has one slot for the newest token.
        assert layer.offset == prompt_len + 59
        assert layer.state[0].shape[2] == bound and layer.keys.shape[2] == bound + 1
    # The next turn continues the rotated cache (no trimming needed), and changing an earlier
    # token starts over instead of attending to stale positions.
    follow = ids + tokens + tokenizer.encode(TURN2, add_special_tokens=False)
    _, more, responses = run(model, tokenizer, follow, 5, prompt_cache=cache)
    assert responses[0].cached_tokens == prompt_len + 59 and len(more) == 5
    changed = [(follow[0] + 1) % tokenizer.vocab_size] + follow[1:]
    _, _, responses = run(model, tokenizer, changed, 5, prompt_cache=cache)
    assert responses[0].cached_tokens == 0 and responses[0].prompt_tokens == len(changed)


# --- saving a prompt cache -------------------------------------------------------------------------

@pytest.mark.parametrize("max_kv_size", [None, 64, 12], ids=["unbounded", "rotating", "rotated"])
def test_saved_prompt_cache_continues_identically(model, tokenizer, tmp_path, max_kv_size):
    cache = PromptCache.for_model(model, max_kv_size)
    prompt = two_turns(model, tokenizer, cache)
    path = tmp_path / "cache.safetensors"
    save_prompt_cache(path, cache.cache, cache.tokens)
    layers, tokens = load_prompt_cache(path)
    assert tokens == cache.tokens and len(layers) == len(cache.cache)
    assert [type(c) for c in layers] == [type(c) for c in cache.cache]
    restored = run(model, tokenizer, prompt, 10, prompt_cache=PromptCache(layers, tokens))
    original = run(model, tokenizer, prompt, 10, prompt_cache=cache)
    assert restored[1] == original[1]
    assert restored[2][0].prompt_tokens == original[2][0].prompt_tokens < len(prompt)
    if max_kv_size != 12:
        assert restored[1] == run(model, tokenizer, prompt, 10)[1]


# --- speculative decoding --------------------------------------------------------------------------

@pytest.mark.parametrize("num_draft", [1, 3, 5])
@pytest.mark.parametrize("which", ["other", "self"])
def test_speculative_decoding_equals_greedy(model, draft, tokenizer, num_draft, which):
    draft_model = draft if which == "other" else model
    ids = tokenizer.encode(TURN1)
    stats = {}
    text, tokens, responses = run(model, tokenizer, ids, 23, draft_model=draft_model,
                                  num_draft_tokens=num_draft, draft_stats=stats)
    assert tokens == reference_greedy(model, ids, 23)
    assert text == tokenizer.decode(tokens) and responses[-1].finish_reason == "length"
    # The first token comes from the prompt; each round adds its accepted drafts and the
    # model's own token.
    if which == "self":
        # Every draft accepted: rounds of num_draft + 1 tokens, the last one cut short so that
        # nothing is drafted past max_tokens.
        rounds = -(-22 // (num_draft + 1))
        assert stats["accepted"] == stats["drafted"] == 22 - rounds
    else:
        assert 0 <= stats["accepted"] < stats["drafted"] <= 22 * num_draft


def test_speculative_decoding_stops_at_eos_and_reuses_a_prompt_cache(model, draft, tokenizer):
    ids = tokenizer.encode(TURN1)
    greedy = reference_greedy(model, ids, 15)
    _, tokens, responses = run(model, tokenizer, ids, 15, draft_model=draft,
                               eos_token_ids=[greedy[6]])
    assert tokens == greedy[: greedy.index(greedy[6]) + 1] and responses[-1].finish_reason == "stop"
    cache = PromptCache.for_model(model)
    prompt = two_turns(model, tokenizer, cache, dict(draft_model=draft))
    _, tokens, responses = run(model, tokenizer, prompt, 12, prompt_cache=cache, draft_model=draft)
    assert responses[0].cached_tokens > 0
    assert tokens == reference_greedy(model, prompt, 12)


def test_speculative_decoding_refuses_a_bounded_cache(model, draft, tokenizer):
    """A rotated cache cannot take back rejected drafts: refused up front, cache untouched."""
    cache = PromptCache.for_model(model, max_kv_size=16)
    for options in (dict(max_kv_size=16), dict(prompt_cache=cache)):
        with pytest.raises(ValueError, match="unbounded KV cache; drop max_kv_size"):
            run(model, tokenizer, TURN1, 40, draft_model=draft, **options)
    assert cache.cache[0].offset == 0


def test_speculative_decoding_refuses_logits_processors(model, draft, tokenizer):
    with pytest.raises(ValueError, match="speculative"):
        run(model, tokenizer, TURN1, draft_model=draft, repetition_penalty=1.5)


# --- batches ---------------------------------------------------------------------------------------

def test_batch_generate_rows_equal_single_prompt_greedy(model, tokenizer):
    prompts = [TURN1, "x", "🦙 你好, a much longer prompt than the others " * 3]
    rows = batch_generate(model, tokenizer, prompts, 12)
    assert len(rows) == 3
    assert len({len(tokenizer.encode(p)) for p in prompts}) == 3
    for prompt, row in zip(prompts, rows):
        assert row == generate(model, tokenizer, prompt, 12)
    as_ids = batch_generate(model, tokenizer, [tokenizer.encode(p) for p in prompts], 12)
    assert as_ids == rows


def test_batch_generate_stops_rows_at_eos(model, tokenizer):
    prompts = [TURN1, "short"]
    greedy = [reference_greedy(model, tokenizer.encode(p), 10) for p in prompts]
    eos_model = tiny_model(tokenizer.vocab_size, seed=0, eos_token_id=greedy[0][3])
    rows = batch_generate(eos_model, tokenizer, prompts, 10)
    assert rows[0] == tokenizer.decode(greedy[0][: greedy[0].index(greedy[0][3])])
    assert rows == [generate(eos_model, tokenizer, p, 10) for p in prompts]

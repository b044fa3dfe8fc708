"""The one decode loop (generate.generate_step) and the ring-buffer RotatingKVCache: logprobs
are the log-softmax of the model's own scores, no forward pass is wasted, generation reaches the
model only through its call, and the ring keeps exactly the positions a plain sliding window
with attention sinks keeps."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from generation_helpers import collect, tiny_model
from mlx_mobilellm import batch_generate, stream_generate
from mlx_mobilellm.cache import KVCache, RotatingKVCache
from mlx_mobilellm.decode import DecodeBatch, generate_step
from mlx_mobilellm.generate import stream_batch_generate
from mlx_mobilellm.models import MobileLLM
from mlx_mobilellm.models.transformer import TransformerDecoder


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(tokenizer.vocab_size, seed=3)


@pytest.fixture
def calls(monkeypatch):
    """(model calls, decoder calls) as lists of the new-token counts, recorded from now on."""
    model_calls, decoder_calls = [], []
    model_call, decoder_call = MobileLLM.__call__, TransformerDecoder.__call__

    def recording_model(self, input_ids, *args, **kwargs):
        model_calls.append(mx.array(input_ids).shape[-1])
        return model_call(self, input_ids, *args, **kwargs)

    def recording_decoder(self, hidden_states, *args, **kwargs):
        decoder_calls.append(hidden_states.shape[1])
        return decoder_call(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(MobileLLM, "__call__", recording_model)
    monkeypatch.setattr(TransformerDecoder, "__call__", recording_decoder)
    return model_calls, decoder_calls


PROMPT = [5, 17, 3, 42, 8, 11, 29]


# --- logprobs ------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_logprobs_are_the_log_softmax_of_a_full_forward_pass(model, tokenizer, temperature):
    responses = list(stream_generate(model, tokenizer, PROMPT, 6, temperature=temperature,
                                     seed=4, eos_token_ids=[]))
    tokens = [r.token for r in responses]
    for i, response in enumerate(responses):
        logits = model(mx.array([PROMPT + tokens[:i]])).logits[0, -1].astype(mx.float32)
        expected = np.array(logits - mx.logsumexp(logits))
        np.testing.assert_allclose(np.array(response.logprobs), expected, atol=1e-5)
        assert np.exp(np.array(response.logprobs)).sum() == pytest.approx(1.0, abs=1e-5)
        if temperature == 0.0:
            assert response.token == int(np.argmax(expected))


def test_batched_steps_give_each_row_its_own_logprobs(model):
    rows = [PROMPT, PROMPT[::-1]]
    steps = list(generate_step(model, mx.array(rows), model.make_cache(), max_tokens=3))
    for row, prompt in enumerate(rows):
        generated = [int(step.tokens[row]) for step in steps]
        for i, step in enumerate(steps):
            logits = model(mx.array([prompt + generated[:i]])).logits[0, -1]
            np.testing.assert_allclose(np.array(step.logprobs[row]),
                                       np.array(logits - mx.logsumexp(logits)), atol=1e-5)


# --- forward passes ------------------------------------------------------------------------

@pytest.mark.parametrize("max_tokens", [1, 2, 9])
def test_n_tokens_cost_the_prefill_and_n_minus_1_steps(model, tokenizer, calls, max_tokens):
    model_calls, decoder_calls = calls
    responses = list(stream_generate(model, tokenizer, PROMPT, max_tokens, eos_token_ids=[]))
    assert len(responses) == max_tokens
    assert model_calls == [len(PROMPT)] + [1] * (max_tokens - 1)
    assert decoder_calls == model_calls  # generation reaches the decoder only through the model


def test_every_generation_path_calls_only_the_model(model, tokenizer, calls):
    model_calls, decoder_calls = calls
    model.generate(mx.array([PROMPT]), max_new_tokens=4, temperature=0.0, eos_token_id=[])
    batch_generate(model, tokenizer, [PROMPT, PROMPT[:3]], 4)
    draft = tiny_model(tokenizer.vocab_size, seed=9, num_layers=1)
    collect(stream_generate(model, tokenizer, PROMPT, 8, draft_model=draft, num_draft_tokens=3,
                            eos_token_ids=[]))
    assert len(model_calls) > 10 and decoder_calls == model_calls


def test_a_row_stopped_by_the_caller_costs_nothing_more(model, calls):
    model_calls, _ = calls
    for count, _ in enumerate(generate_step(model, mx.array([PROMPT]), model.make_cache(),
                                            max_tokens=50), start=1):
        if count == 3:
            break
    # the third token was handed out with the fourth step queued behind it: no more
    assert model_calls == [len(PROMPT), 1, 1, 1]


def test_speculative_decoding_never_drafts_past_max_tokens(model, tokenizer, calls):
    model_calls, _ = calls
    stats = {}
    collect(stream_generate(model, tokenizer, PROMPT, 5, draft_model=model, num_draft_tokens=8,
                            draft_stats=stats, eos_token_ids=[]))
    # the model as its own draft: prompt (both), 3 draft steps, and one call verifying them
    assert stats == {"drafted": 3, "accepted": 3}
    assert model_calls == [len(PROMPT), len(PROMPT), 1, 1, 1, 4]


# --- the ring-buffer rotating cache -----------------------------------------------------------

class SlidingWindow:
    """What a bounded cache with attention sinks must keep, as positions: attention sees the
    kept positions followed by the new ones; then the first `keep` and the most recent
    max_size - keep positions stay."""

    def __init__(self, max_size: int, keep: int):
        self.max_size, self.keep, self.kept, self.offset = max_size, keep, [], 0

    def update(self, new: int) -> list:
        seen = self.kept + list(range(self.offset, self.offset + new))
        self.offset += new
        recent = self.max_size - self.keep
        self.kept = seen if len(seen) <= self.max_size else seen[: self.keep] + seen[-recent:]
        return seen


def positions_of(array: mx.array) -> list:
    return [int(p) for p in np.array(array[0, 0, :, 0])]


def tagged(start: int, count: int) -> mx.array:
    """(1, 1, count, 2) keys whose first feature is their position."""
    positions = mx.arange(start, start + count, dtype=mx.float32)[None, None, :, None]
    return mx.concatenate([positions, -positions], axis=3)


@settings(max_examples=60, deadline=None)
@given(max_size=st.integers(2, 12), keep=st.integers(0, 4),
       chunks=st.lists(st.integers(1, 20), min_size=1, max_size=25))
def test_the_ring_keeps_what_a_sliding_window_keeps(max_size, keep, chunks):
    keep = min(keep, max_size - 1)
    cache, reference = RotatingKVCache(max_size, keep), SlidingWindow(max_size, keep)
    for new in chunks:
        keys = tagged(cache.offset, new)
        fetched_keys, fetched_values = cache.update_and_fetch(keys, -keys)
        expected = reference.update(new)
        fetched = positions_of(fetched_keys)
        if new == 1:  # a one-token query reads the ring as it lies: any order
            assert sorted(fetched) == sorted(expected)
        else:  # a chunk attends causally: the window, then itself, in order
            assert fetched == expected
        assert positions_of(-fetched_values) == fetched
        assert positions_of(cache.state[0]) == reference.kept
        assert cache.offset == reference.offset
        assert cache.keys.shape[2] <= max_size + 1


def test_a_restored_ring_continues_as_the_original():
    cache = RotatingKVCache(6, 2)
    for start, count in ((0, 5), (5, 1), (6, 1), (7, 3), (10, 1), (11, 1)):
        cache.update_and_fetch(tagged(start, count), tagged(start, count))
    restored = RotatingKVCache(6, 2)
    restored.restore(*cache.state, cache.offset)
    for step in range(12, 20):
        a = positions_of(cache.update_and_fetch(tagged(step, 1), tagged(step, 1))[0])
        b = positions_of(restored.update_and_fetch(tagged(step, 1), tagged(step, 1))[0])
        assert sorted(a) == sorted(b)


class ConcatenatingWindow(KVCache):
    """The straightforward bounded cache (concatenate, then cut): the reference for the ring."""

    def __init__(self, max_size: int, keep: int):
        super().__init__()
        self.max_size, self.keep = max_size, keep

    def update_and_fetch(self, keys, values):
        self.offset += keys.shape[2]
        if self.keys is not None:
            keys = mx.concatenate([self.keys, keys], axis=2)
            values = mx.concatenate([self.values, values], axis=2)
        recent = self.max_size - self.keep
        cut = keys.shape[2] > self.max_size
        self.keys = mx.concatenate([keys[..., : self.keep, :], keys[..., -recent:, :]], axis=2) if cut else keys
        self.values = mx.concatenate([values[..., : self.keep, :], values[..., -recent:, :]], axis=2) if cut else values
        return keys, values


@pytest.mark.parametrize("max_size", [9, 16])
def test_generation_past_the_bound_equals_the_concatenating_window(model, max_size):
    prompt = mx.array([PROMPT * 2])  # 14 tokens: the prompt already overflows a 9-slot window
    layers = len(model.make_cache())
    ring = [RotatingKVCache(max_size, 4) for _ in range(layers)]
    reference = [ConcatenatingWindow(max_size, 4) for _ in range(layers)]
    ours = list(generate_step(model, prompt, ring, max_tokens=30))
    theirs = list(generate_step(model, prompt, reference, max_tokens=30))
    assert [int(s.tokens[0]) for s in ours] == [int(s.tokens[0]) for s in theirs]
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(np.array(a.logprobs), np.array(b.logprobs), atol=1e-5)


# --- batches of rows with their own lengths and stops ---------------------------------------

def test_each_batch_row_is_its_own_stream_generate(model, tokenizer):
    prompts = [PROMPT, PROMPT[:3], [9, 8, 7, 6, 5, 4, 3, 2, 1, 12]]
    limits, stops = [5, 12, 8], [[], [tokenizer.decode([PROMPT[0]])], ["zz"]]
    rows = [[] for _ in prompts]
    for row, response in stream_batch_generate(model, tokenizer, prompts, limits, stops=stops,
                                               eos_token_ids=[]):
        rows[row].append(response)
    for prompt, limit, stop, responses in zip(prompts, limits, stops, rows):
        alone = list(stream_generate(model, tokenizer, prompt, limit, stop=stop, eos_token_ids=[]))
        assert [r.token for r in responses] == [r.token for r in alone]
        assert "".join(r.text for r in responses) == "".join(r.text for r in alone)
        assert responses[-1].finish_reason == alone[-1].finish_reason
        assert [r.finish_reason for r in responses[:-1]] == [None] * (len(responses) - 1)


def test_a_row_no_longer_wanted_ends_and_the_others_go_on(model, tokenizer, calls):
    model_calls, _ = calls
    gone = set()
    seen = {0: 0, 1: 0}
    for row, response in stream_batch_generate(model, tokenizer, [PROMPT, PROMPT[::-1]], [20, 6],
                                               eos_token_ids=[], wanted=lambda r: r not in gone):
        seen[row] += 1
        if row == 0 and seen[0] == 3:
            gone.add(0)
    assert seen == {0: 3, 1: 6}
    # the batch stopped once its last row ended: prefill, then one call per step to the 6th
    assert model_calls == [len(PROMPT)] + [1] * 6


# --- continuous batching: rows joining and leaving between steps ------------------------------

def alone(model, prompt, count) -> tuple:
    """(tokens, last logprobs) of `prompt` decoded by itself, greedy."""
    steps = list(generate_step(model, mx.array(prompt), model.make_cache(), max_tokens=count))
    return [int(s.tokens[0]) for s in steps], np.array(steps[-1].logprobs[0])


JOINS = {  # step: who joins (together, in one prefill) or leaves before it
    0: [("join", ["a", "g"])],  # into an empty batch, of two lengths
    2: [("join", ["b"])],  # shorter than the batch: padded in
    4: [("join", ["c", "f"])],  # one longer (the batch is padded), one shorter
    7: [("leave", "a"), ("join", ["d"])],
    9: [("leave", "c")],  # the batch's longest row leaves: its leading slots go
    10: [("leave", "g"), ("join", ["e"])],
}
PROMPTS = {"a": PROMPT, "b": PROMPT[:2], "c": list(range(3, 40)), "d": [7] * 5,
           "e": PROMPT[::-1], "f": [11, 12, 13], "g": PROMPT[:5]}


@pytest.mark.parametrize("overrides", [
    {}, dict(use_qk_norm=True, rope_traditional=True),
    dict(num_layers=3, nope_layers=[1], attn_temperature_tuning=True, floor_scale=4.0,
         attn_scale=0.5),
], ids=["llama", "r1-like", "nope-temperature"])
def test_rows_that_join_and_leave_compute_what_they_would_alone(tokenizer, overrides):
    model = tiny_model(tokenizer.vocab_size, seed=4, **overrides)
    batch, live, got, last = DecodeBatch(model), [], {}, {}
    for t in range(14):
        for action, name in JOINS.get(t, []):
            if action == "join":
                first = batch.join([PROMPTS[n] for n in name])
                for row, joined in enumerate(name):
                    got[joined] = [int(first.tokens[row])]
                    last[joined] = np.array(first.logprobs[row])
                live += name
            else:
                leaving = live.index(name)
                batch.keep([row for row in range(len(live)) if row != leaving])
                live.remove(name)
        step = batch.step()
        for row, name in enumerate(live):
            got[name].append(int(step.tokens[row]))
            last[name] = np.array(step.logprobs[row])
    assert batch.cache[0].offset < len(PROMPTS["c"])  # compacted once c had left
    for name, tokens in got.items():
        expected, logprobs = alone(model, PROMPTS[name], len(tokens))
        assert tokens == expected, name
        np.testing.assert_allclose(last[name], logprobs, atol=1e-4)


def test_a_bounded_cache_takes_no_joining_rows(model):
    batch = DecodeBatch(model)
    batch.start(mx.array([PROMPT]), model.make_cache(max_kv_size=16))
    with pytest.raises(ValueError, match="bounded"):
        batch.join([PROMPT])


@pytest.mark.parametrize("chunk_steps", [[1] * 40, [9, 1, 1, 7, 1, 1, 1, 12, 1, 1, 5, 1, 1]])
def test_a_ring_at_least_a_chunk_wide_attends_as_chunked_attention_does(tokenizer, chunk_steps):
    """Llama 4's chunked attention past the chunk size with a rotated cache: a window that
    holds a whole chunk loses nothing chunked attention would see, so it must give the
    unbounded cache's logits, whatever chunks the tokens come in."""
    model = tiny_model(tokenizer.vocab_size, seed=6, num_layers=2, attention_chunk_size=8,
                       use_qk_norm=True, rope_traditional=True)
    ids = mx.array([[int(t) for t in np.random.default_rng(1).integers(3, 300, sum(chunk_steps))]])
    ring = [RotatingKVCache(12, 4) for _ in model.make_cache()]
    plain = model.make_cache()
    start = 0
    for step in chunk_steps:
        piece = ids[:, start : start + step]
        ours = model(piece, cache=ring).logits
        reference = model(piece, cache=plain).logits
        np.testing.assert_allclose(np.array(ours), np.array(reference), atol=1e-4)
        start += step
    assert ring[0].offset == start > 12 + 8  # rotated, and past several chunks

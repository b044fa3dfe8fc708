"""MobileLLM.generate (KV-cached decoding, batching, EOS, sampling) and sampling.top_p_filter."""

import itertools

import mlx.core as mx
import numpy as np
import pytest

from mlx_mobilellm.models import MobileLLM, MobileLLMConfig
from mlx_mobilellm.models.transformer import TransformerDecoder
from mlx_mobilellm.sampling import sample, top_p_filter
from tiny_models import randomize_weights

VOCAB = 100
PROMPT_LEN = 5


def tiny_model(seed: int = 3, **overrides) -> MobileLLM:
    values = dict(num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, hidden_dim=64,
                  vocab_size=VOCAB, max_seq_len=64, rope_base=10000.0)
    model = MobileLLM(MobileLLMConfig(**{**values, **overrides}))
    return randomize_weights(model, seed)


def random_ids(batch, seq, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(batch, seq))


def greedy_by_recomputation(model, ids, steps, attention_mask=None) -> np.ndarray:
    """Greedy decoding without a cache: run the whole sequence every step, take the argmax."""
    seq = np.array(ids)
    mask = None if attention_mask is None else np.array(attention_mask)
    for _ in range(steps):
        logits = model(seq, attention_mask=mask).logits[:, -1]
        token = np.array(mx.argmax(logits, axis=-1))[:, None]
        seq = np.concatenate([seq, token], axis=1)
        if mask is not None:
            mask = np.concatenate([mask, np.ones_like(token)], axis=1)
    return seq


def gen(model, ids, max_new_tokens, **kwargs) -> np.ndarray:
    kwargs.setdefault("temperature", 0.0)
    return np.array(model.generate(ids, max_new_tokens=max_new_tokens, **kwargs))


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def prompts():
    return random_ids(3, PROMPT_LEN, seed=13)


# --- shape and greedy ----------------------------------------------------------------------

@pytest.mark.parametrize("as_type", [np.asarray, mx.array, lambda a: a.tolist()])
def test_returns_prompt_plus_new_tokens(model, prompts, as_type):
    out = gen(model, as_type(prompts[:2]), 6)
    assert out.shape == (2, PROMPT_LEN + 6)
    np.testing.assert_array_equal(out[:, :PROMPT_LEN], prompts[:2])
    assert ((0 <= out) & (out < VOCAB)).all()


def test_max_new_tokens_zero_returns_prompt(model, prompts):
    np.testing.assert_array_equal(gen(model, prompts[:1], 0), prompts[:1])


def test_greedy_with_cache_equals_full_recomputation(model, prompts):
    steps = 14
    expected = greedy_by_recomputation(model, prompts[:1], steps)
    out = gen(model, prompts[:1], steps)
    np.testing.assert_array_equal(out, expected)
    assert len(set(out[0, PROMPT_LEN:].tolist())) >= 3  # a non-trivial sequence


@pytest.mark.parametrize("overrides", [
    dict(layer_sharing=True),
    dict(tie_word_embeddings=False, qk_norm_weight=True),
    dict(nope_layers=[1], attention_chunk_size=4),
    dict(rope_traditional=False, num_kv_heads=1),
], ids=["layer_sharing", "untied_qk_weight", "nope_chunked", "rotate_half_mqa"])
def test_greedy_cache_equals_recomputation_variants(prompts, overrides):
    variant = tiny_model(**overrides)
    out = gen(variant, prompts[:2], 10)
    np.testing.assert_array_equal(out, greedy_by_recomputation(variant, prompts[:2], 10))


def test_batch_rows_equal_single_row_runs(model, prompts):
    steps = 10
    batched = gen(model, prompts, steps)
    for r in range(len(prompts)):
        np.testing.assert_array_equal(batched[r], gen(model, prompts[r:r + 1], steps)[0])
    np.testing.assert_array_equal(batched, greedy_by_recomputation(model, prompts, steps))


def test_left_padded_batch_with_attention_mask(model, prompts):
    steps = 10
    short = prompts[0, 2:]          # 3 tokens
    long = random_ids(1, 7, seed=14)[0]
    pad = len(long) - len(short)
    for pad_id in (0, 77):
        batch = np.stack([np.r_[np.full(pad, pad_id), short], long])
        mask = np.stack([np.r_[np.zeros(pad), np.ones(len(short))], np.ones(len(long))]).astype(np.int32)
        out = gen(model, batch, steps, attention_mask=mask)
        np.testing.assert_array_equal(out[:, :len(long)], batch)
        np.testing.assert_array_equal(out[0, len(long):], gen(model, short[None], steps)[0, len(short):])
        np.testing.assert_array_equal(out[1], gen(model, long[None], steps)[0])
    # The mask matters: without it the padded row continues differently.
    unmasked = gen(model, batch, steps)
    assert (unmasked[0, len(long):] != out[0, len(long):]).any()


def test_max_new_tokens_capped_by_max_seq_len():
    small = tiny_model(max_seq_len=12)
    ids = random_ids(1, 9, seed=15)
    out = gen(small, ids, 10)
    assert out.shape == (1, 12)
    np.testing.assert_array_equal(out, greedy_by_recomputation(small, ids, 3))


# --- the decode loop never re-runs the prefix ----------------------------------------------

def test_prompt_filling_the_context_is_refused():
    small = tiny_model(max_seq_len=12)
    with pytest.raises(ValueError, match="max_seq_len is 12"):
        small.generate(random_ids(1, 12), max_new_tokens=3, temperature=0)


@pytest.fixture
def decoder_calls(monkeypatch):
    """Records (new tokens, cached tokens before the call) for every decoder call."""
    calls = []
    real = TransformerDecoder.__call__

    def recording(self, hidden_states, attention_mask=None, cache=None):
        calls.append((hidden_states.shape[1], cache[0].offset if cache else 0))
        return real(self, hidden_states, attention_mask, cache)

    monkeypatch.setattr(TransformerDecoder, "__call__", recording)
    return calls


def test_prefill_once_then_one_token_per_step(model, prompts, decoder_calls):
    steps = 7
    gen(model, prompts[:2], steps)
    assert decoder_calls[0] == (PROMPT_LEN, 0)
    assert decoder_calls[1:] == [(1, PROMPT_LEN + i) for i in range(steps - 1)]


def test_prefill_once_with_padding_mask(model, prompts, decoder_calls):
    mask = np.ones((2, PROMPT_LEN), np.int32)
    mask[0, :2] = 0
    gen(model, prompts[:2], 5, attention_mask=mask)
    assert decoder_calls == [(PROMPT_LEN, 0)] + [(1, PROMPT_LEN + i) for i in range(4)]


# --- EOS -----------------------------------------------------------------------------------

def expected_with_eos(greedy_new: np.ndarray, eos_ids, pad_id, max_new):
    """What generate must return after the prompt: each row up to and including its first EOS,
    then pad_id; the result ends when every row has finished (or at max_new)."""
    firsts = []
    for row in greedy_new:
        hits = [i for i, t in enumerate(row) if t in eos_ids]
        firsts.append(hits[0] if hits else None)
    length = max_new if None in firsts else max(firsts) + 1
    rows = []
    for row, first in zip(greedy_new, firsts):
        stop = length if first is None else first + 1
        rows.append(list(row[:stop]) + [pad_id] * (length - stop))
    return np.array(rows), firsts


@pytest.fixture(scope="module")
def eos_case(model, prompts):
    """Greedy first (no EOS), then pick one EOS id per row so that the rows finish at different
    steps, both well before max_new: the test below then sees padding and an early stop."""
    max_new = 16
    free = gen(model, prompts[:2], max_new, eos_token_id=[])[:, PROMPT_LEN:]
    for a, b in itertools.product(free[0, 1:8], free[1, 1:8]):
        eos = [int(a), int(b)]
        _, firsts = expected_with_eos(free, eos, -1, max_new)
        if None not in firsts and firsts[0] != firsts[1] and max(firsts) < max_new - 3:
            return free, eos, max_new
    pytest.fail("no usable EOS pair in the greedy output; change the model seed")


@pytest.mark.parametrize("pad_id", [0, 99])
def test_rows_stop_at_eos_and_are_padded(model, prompts, eos_case, pad_id, decoder_calls):
    free, eos, max_new = eos_case
    expected, firsts = expected_with_eos(free, eos, pad_id, max_new)
    out = gen(model, prompts[:2], max_new, eos_token_id=eos, pad_token_id=pad_id)
    np.testing.assert_array_equal(out[:, :PROMPT_LEN], prompts[:2])
    np.testing.assert_array_equal(out[:, PROMPT_LEN:], expected)
    # Stopped early: one decoder call per token generated, and the one step that was computed
    # ahead (the price of pipelining: it was queued before the last row's EOS was read).
    assert out.shape[1] == PROMPT_LEN + max(firsts) + 1 < PROMPT_LEN + max_new
    assert len(decoder_calls) == max(firsts) + 2


def test_single_int_eos(model, prompts):
    free = gen(model, prompts[:1], 12, eos_token_id=[])[0, PROMPT_LEN:]
    eos = int(free[3])
    first = list(free).index(eos)
    out = gen(model, prompts[:1], 12, eos_token_id=eos)
    np.testing.assert_array_equal(out[0, PROMPT_LEN:], free[:first + 1])


def test_eos_and_pad_default_to_config(prompts, eos_case):
    free, eos, max_new = eos_case
    configured = tiny_model(eos_token_id=eos, pad_token_id=42)
    expected, _ = expected_with_eos(free, eos, 42, max_new)
    np.testing.assert_array_equal(gen(configured, prompts[:2], max_new)[:, PROMPT_LEN:], expected)
    # Without a pad id anywhere, finished rows are padded with the first EOS id.
    no_pad = tiny_model(eos_token_id=eos)
    expected, _ = expected_with_eos(free, eos, eos[0], max_new)
    np.testing.assert_array_equal(gen(no_pad, prompts[:2], max_new)[:, PROMPT_LEN:], expected)


# --- sampling ------------------------------------------------------------------------------

def test_seed_makes_sampling_reproducible(model, prompts):
    kwargs = dict(temperature=1.0, top_p=1.0)
    a = gen(model, prompts[:2], 24, seed=1, **kwargs)
    b = gen(model, prompts[:2], 24, seed=1, **kwargs)
    c = gen(model, prompts[:2], 24, seed=2, **kwargs)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    # Sampling is not greedy.
    assert (a != gen(model, prompts[:2], 24)).any()


def test_seed_reproducible_with_default_top_p(model, prompts):
    a = gen(model, prompts[:1], 16, temperature=0.8, seed=5)
    np.testing.assert_array_equal(a, gen(model, prompts[:1], 16, temperature=0.8, seed=5))


def test_tiny_top_p_equals_greedy(model, prompts):
    greedy = gen(model, prompts, 12)
    for seed in (0, 1):
        np.testing.assert_array_equal(gen(model, prompts, 12, temperature=1.0, top_p=1e-6, seed=seed),
                                      greedy)


HAND_PROBS = np.array([0.05, 0.5, 0.1, 0.2, 0.15])   # order by probability: 1, 3, 4, 2, 0


@pytest.mark.parametrize("top_p,kept", [
    (1e-6, {1}),
    (0.45, {1}),
    (0.55, {1, 3}),
    (0.69, {1, 3}),
    (0.71, {1, 3, 4}),
    (0.86, {1, 3, 4, 2}),
    (0.99, {0, 1, 2, 3, 4}),
])
def test_top_p_filter_keeps_smallest_set_reaching_top_p(top_p, kept):
    logits = np.log(HAND_PROBS) + 3.0  # shift: only differences matter
    rows = np.stack([logits, logits[::-1]])  # second row: the same distribution reversed
    out = np.array(top_p_filter(mx.array(rows.astype(np.float32)), top_p))
    for r, row_kept in enumerate([kept, {4 - i for i in kept}]):
        finite = set(np.flatnonzero(np.isfinite(out[r])).tolist())
        assert finite == row_kept
        idx = sorted(row_kept)
        np.testing.assert_allclose(out[r, idx], rows[r, idx], rtol=1e-6)
        assert (out[r, [i for i in range(5) if i not in row_kept]] == -np.inf).all()


def test_sample_only_draws_kept_tokens():
    logits = mx.array(np.tile(np.log(HAND_PROBS).astype(np.float32), (2000, 1)))
    draws = np.array(sample(logits, temperature=1.0, top_p=0.69, key=mx.random.key(0)))
    assert set(draws.tolist()) == {1, 3}
    # Renormalized over the kept set: 0.5 / 0.7 of the draws are token 1.
    assert abs((draws == 1).mean() - 0.5 / 0.7) < 0.04


def test_sample_temperature_zero_is_argmax():
    logits = mx.array(np.random.default_rng(0).standard_normal((4, VOCAB)).astype(np.float32))
    np.testing.assert_array_equal(np.array(sample(logits, 0.0)), np.argmax(np.array(logits), -1))



def test_top_p_zero_keeps_the_most_likely_token():
    logits = mx.array(np.log(HAND_PROBS).astype(np.float32))[None]
    out = np.array(top_p_filter(logits, 0.0))[0]
    assert set(np.flatnonzero(np.isfinite(out)).tolist()) == {1}


def test_numpy_integer_eos(model, prompts):
    free = gen(model, prompts[:1], 8, eos_token_id=[])[0, PROMPT_LEN:]
    out = gen(model, prompts[:1], 8, eos_token_id=np.int64(free[2]))
    assert out.shape[1] <= PROMPT_LEN + 3

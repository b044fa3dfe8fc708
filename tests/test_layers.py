"""RMSNorm, FeedForward, MultiHeadAttention and TransformerBlock against float64 numpy references."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_mobilellm.cache import KVCache
from mlx_mobilellm.models import (FeedForward, MobileLLMConfig, MultiHeadAttention, RMSNorm,
                                  TransformerBlock)

ATOL = 1e-4


def np_(x) -> np.ndarray:
    return np.array(x.astype(mx.float32), dtype=np.float64)


def randn(*shape, seed=0, scale=1.0) -> mx.array:
    return mx.array((np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32))


def randomize(module: nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    """Give every parameter (norm weights included) distinct random values."""
    rng = np.random.default_rng(seed)
    params = [(name, mx.array((rng.standard_normal(p.shape) * scale + (1.0 if name.endswith("norm.weight") else 0.0))
                              .astype(np.float32)))
              for name, p in tree_flatten(module.parameters())]
    module.load_weights(params)


# --- numpy references ----------------------------------------------------------------------

def ref_rms_norm(x, weight, eps):
    x = np.asarray(x, np.float64)
    out = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps)
    return out if weight is None else out * weight


def ref_silu(x):
    return x / (1 + np.exp(-x))


def ref_ffn(x, gate, up, down):
    return (ref_silu(x @ gate.T) * (x @ up.T)) @ down.T


def ref_rope(x, base, positions, traditional=True):
    """x: (batch, heads, seq, head_dim)."""
    d = x.shape[-1]
    inv_freq = base ** (-np.arange(0, d, 2) / d)              # (d/2,)
    angles = np.asarray(positions)[:, None] * inv_freq[None]  # (seq, d/2)
    cos, sin = np.cos(angles), np.sin(angles)
    if traditional:   # interleaved pairs (x0, x1), (x2, x3), ...
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x0 * sin + x1 * cos
        return out
    half = d // 2     # rotate-half: pairs (x_i, x_{i+d/2})
    x0, x1 = x[..., :half], x[..., half:]
    return np.concatenate([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)


def ref_attention(x, attn: MultiHeadAttention, mask=None, *, qk_norm=True, rope_base=10000.0,
                  traditional=True, eps=1e-5, q_norm_w=None, k_norm_w=None, positions=None):
    """Plain GQA attention: K/V heads repeated num_heads // num_kv_heads times.

    mask: None, "causal", a boolean (q, k) array (True = attend) or an additive (q, k) array.
    """
    x = np.asarray(x, np.float64)
    b, s, _ = x.shape
    h, kvh = attn.num_heads, attn.num_kv_heads
    d = attn.head_dim
    wq, wk, wv, wo = (np_(getattr(attn, n).weight) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    q = (x @ wq.T).reshape(b, s, h, d).transpose(0, 2, 1, 3)
    k = (x @ wk.T).reshape(b, s, kvh, d).transpose(0, 2, 1, 3)
    v = (x @ wv.T).reshape(b, s, kvh, d).transpose(0, 2, 1, 3)
    if qk_norm:
        q, k = ref_rms_norm(q, q_norm_w, eps), ref_rms_norm(k, k_norm_w, eps)
    positions = np.arange(s) if positions is None else positions
    q = ref_rope(q, rope_base, positions, traditional)
    k = ref_rope(k, rope_base, positions, traditional)
    k = np.repeat(k, h // kvh, axis=1)
    v = np.repeat(v, h // kvh, axis=1)
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d)
    if isinstance(mask, str):
        assert mask == "causal"
        mask = np.tril(np.ones((s, s), bool))
    if mask is not None:
        mask = np.asarray(mask)
        scores = np.where(mask, scores, -np.inf) if mask.dtype == bool else scores + mask
    scores = scores - scores.max(-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(-1, keepdims=True)
    out = (probs @ v).transpose(0, 2, 1, 3).reshape(b, s, h * d)
    return out @ wo.T


def make_attention(num_heads=4, num_kv_heads=2, embed_dim=32, seed=0, **kwargs):
    attn = MultiHeadAttention(embed_dim, num_heads, num_kv_heads, rope_base=10000.0,
                              max_seq_len=64, **kwargs)
    randomize(attn, seed)
    return attn


def assert_close(actual, expected, atol=ATOL):
    actual = np_(actual)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=0)


# --- RMSNorm / FeedForward -----------------------------------------------------------------

@pytest.mark.parametrize("eps", [1e-5, 1e-2])
def test_rms_norm_matches_numpy(eps):
    norm = RMSNorm(16, eps=eps)
    norm.weight = randn(16, seed=1)
    x = randn(2, 5, 16, seed=2, scale=0.2)  # small values make eps matter
    assert_close(norm(x), ref_rms_norm(np_(x), np_(norm.weight), eps))


def test_rms_norm_default_weight_is_ones():
    norm = RMSNorm(8)
    np.testing.assert_array_equal(np.array(norm.weight), np.ones(8))
    x = randn(3, 8, seed=3)
    assert_close(norm(x), ref_rms_norm(np_(x), None, 1e-5))


def test_feed_forward_is_swiglu():
    ffn = FeedForward(16, 40)
    randomize(ffn, 4)
    x = randn(2, 3, 16, seed=5)
    expected = ref_ffn(np_(x), np_(ffn.gate_proj.weight), np_(ffn.up_proj.weight),
                       np_(ffn.down_proj.weight))
    assert_close(ffn(x), expected)


# --- MultiHeadAttention --------------------------------------------------------------------

def causal_bool(s):
    return np.tril(np.ones((s, s), bool))


def causal_additive(s):
    return np.where(causal_bool(s), 0.0, -1e9).astype(np.float32)


MASKS = {
    "none": lambda s: (None, None),
    "causal": lambda s: ("causal", "causal"),
    "bool_causal": lambda s: (mx.array(causal_bool(s)), "causal"),
    "additive_causal": lambda s: (mx.array(causal_additive(s)), "causal"),
}


@pytest.mark.parametrize("mask_kind", list(MASKS))
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 1), (4, 4)])
@pytest.mark.parametrize("use_qk_norm", [True, False])
def test_attention_matches_reference(mask_kind, heads, kv_heads, use_qk_norm):
    attn = make_attention(heads, kv_heads, use_qk_norm=use_qk_norm, seed=heads + kv_heads)
    x = randn(2, 7, 32, seed=6)
    mask, ref_mask = MASKS[mask_kind](7)
    expected = ref_attention(np_(x), attn, ref_mask, qk_norm=use_qk_norm)
    assert_close(attn(x, attention_mask=mask), expected)


def test_bool_and_additive_masks_equal_causal():
    attn = make_attention()
    x = randn(1, 6, 32, seed=7)
    causal = np_(attn(x, attention_mask="causal"))
    for kind in ("bool_causal", "additive_causal"):
        np.testing.assert_allclose(np_(attn(x, attention_mask=MASKS[kind](6)[0])), causal,
                                   atol=1e-5, rtol=0)
    # And the mask really matters: no mask differs from causal.
    assert np.abs(np_(attn(x)) - causal).max() > 1e-3


def test_arbitrary_boolean_and_additive_mask():
    attn = make_attention()
    s = 6
    rng = np.random.default_rng(8)
    allowed = rng.random((s, s)) < 0.5
    allowed[np.arange(s), np.arange(s)] = True
    additive = rng.standard_normal((s, s)).astype(np.float32)
    x = randn(2, s, 32, seed=9)
    assert_close(attn(x, attention_mask=mx.array(allowed)), ref_attention(np_(x), attn, allowed))
    assert_close(attn(x, attention_mask=mx.array(additive)), ref_attention(np_(x), attn, additive))


def test_per_row_boolean_mask_broadcasts():
    attn = make_attention()
    s = 5
    allowed = np.stack([causal_bool(s), np.ones((s, s), bool)])[:, None]  # (2, 1, s, s)
    x = randn(2, s, 32, seed=10)
    out = np_(attn(x, attention_mask=mx.array(allowed)))
    np.testing.assert_allclose(out[:1], ref_attention(np_(x[:1]), attn, "causal"), atol=ATOL, rtol=0)
    np.testing.assert_allclose(out[1:], ref_attention(np_(x[1:]), attn, None), atol=ATOL, rtol=0)


def test_rotate_half_rope_matches_reference():
    attn = make_attention(rope_traditional=False)
    x = randn(1, 6, 32, seed=11)
    expected = ref_attention(np_(x), attn, "causal", traditional=False)
    assert_close(attn(x, attention_mask="causal"), expected)
    # ...and is a different layout from the interleaved one.
    interleaved = ref_attention(np_(x), attn, "causal", traditional=True)
    assert np.abs(expected - interleaved).max() > 1e-3


def test_qk_norm_is_weightless_by_default():
    attn = make_attention(use_qk_norm=True)
    names = [name for name, _ in tree_flatten(attn.parameters())]
    assert sorted(names) == ["k_proj.weight", "o_proj.weight", "q_proj.weight", "v_proj.weight"]
    x = randn(1, 5, 32, seed=12, scale=3.0)  # scaling x must not change a normalized q/k
    x_small = x * 0.1
    np.testing.assert_allclose(  # with weightless QK-norm scores are scale-invariant
        np_(attn(x, "causal")) * 0.1, np_(attn(x_small, "causal")), atol=1e-4, rtol=0)


def test_qk_norm_weight_creates_parameters_and_applies_them():
    attn = MultiHeadAttention(32, 4, 2, use_qk_norm=True, rope_base=10000.0, qk_norm_weight=True)
    params = dict(tree_flatten(attn.parameters()))
    assert params["q_norm.weight"].shape == (8,)
    assert params["k_norm.weight"].shape == (8,)
    randomize(attn, 13)
    x = randn(2, 5, 32, seed=14)
    expected = ref_attention(np_(x), attn, "causal", q_norm_w=np_(attn.q_norm.weight),
                             k_norm_w=np_(attn.k_norm.weight))
    assert_close(attn(x, attention_mask="causal"), expected)


def test_qk_norm_weight_without_qk_norm_creates_nothing():
    attn = MultiHeadAttention(32, 4, 2, use_qk_norm=False, qk_norm_weight=True)
    assert "q_norm" not in attn and "k_norm" not in attn


def test_attention_rejects_kv_heads_not_dividing_heads():
    with pytest.raises(ValueError):
        MultiHeadAttention(48, 6, 4)


@pytest.mark.parametrize("prefix", [1, 4])
def test_kv_cache_one_token_at_a_time_equals_full(prefix):
    attn = make_attention()
    s = 9
    x = randn(2, s, 32, seed=15)
    full = np_(attn(x, attention_mask="causal"))
    np.testing.assert_allclose(full, ref_attention(np_(x), attn, "causal"), atol=ATOL, rtol=0)

    cache = KVCache()
    pieces = [attn(x[:, :prefix], attention_mask="causal" if prefix > 1 else None, cache=cache)]
    for t in range(prefix, s):
        pieces.append(attn(x[:, t:t + 1], attention_mask=None, cache=cache))
    assert cache.offset == s
    stepped = np.concatenate([np_(p) for p in pieces], axis=1)
    np.testing.assert_allclose(stepped, full, atol=ATOL, rtol=0)


def test_kv_cache_multi_token_chunk_after_prefix():
    """A chunk of several new tokens after cached ones, with an explicit causal mask over all keys."""
    attn = make_attention()
    s, prefix = 8, 5
    x = randn(1, s, 32, seed=16)
    full = np_(attn(x, attention_mask="causal"))
    cache = KVCache()
    first = np_(attn(x[:, :prefix], attention_mask="causal", cache=cache))
    allowed = mx.array(causal_bool(s)[prefix:])  # (new queries, all keys)
    second = np_(attn(x[:, prefix:], attention_mask=allowed, cache=cache))
    np.testing.assert_allclose(np.concatenate([first, second], 1), full, atol=ATOL, rtol=0)


def test_kv_cache_grows_past_its_step():
    attn = make_attention(embed_dim=16, num_heads=2, num_kv_heads=1)
    cache = KVCache()
    cache.step = 4  # force several reallocations
    x = randn(1, 11, 16, seed=17)
    full = np_(attn(x, attention_mask="causal"))
    out = [np_(attn(x[:, :3], "causal", cache))]
    out += [np_(attn(x[:, t:t + 1], None, cache)) for t in range(3, 11)]
    np.testing.assert_allclose(np.concatenate(out, 1), full, atol=ATOL, rtol=0)


# --- TransformerBlock ----------------------------------------------------------------------

def tiny_config(**overrides):
    values = dict(num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, hidden_dim=48,
                  vocab_size=100, max_seq_len=64, rope_base=10000.0)
    return MobileLLMConfig(**{**values, **overrides})


@pytest.mark.parametrize("use_qk_norm", [True, False])
def test_transformer_block_is_pre_norm_residual(use_qk_norm):
    config = tiny_config(use_qk_norm=use_qk_norm, norm_eps=1e-5)
    block = TransformerBlock(config, layer_idx=0)
    randomize(block, 18)
    block.eval()
    x = randn(2, 6, 32, seed=19)
    xn = np_(x)
    eps = config.norm_eps
    attn_in = ref_rms_norm(xn, np_(block.attention_norm.weight), eps)
    h = xn + ref_attention(attn_in, block.attention, "causal", qk_norm=use_qk_norm,
                           rope_base=config.rope_base, eps=eps)
    ffn_in = ref_rms_norm(h, np_(block.ffn_norm.weight), eps)
    expected = h + ref_ffn(ffn_in, np_(block.ffn.gate_proj.weight), np_(block.ffn.up_proj.weight),
                           np_(block.ffn.down_proj.weight))
    assert_close(block(x, attention_mask="causal"), expected)
    # Composing the library's own parts gives the same thing.
    h2 = x + block.attention(block.attention_norm(x), "causal")
    by_hand = h2 + block.ffn(block.ffn_norm(h2))
    assert_close(block(x, "causal"), np_(by_hand), atol=1e-5)


def test_dropout_only_in_train_mode():
    config = tiny_config(dropout=0.5)
    block = TransformerBlock(config, 0)
    randomize(block, 20)
    plain = TransformerBlock(tiny_config(dropout=0.0), 0)
    plain.update(block.parameters())
    plain.eval()
    x = randn(2, 6, 32, seed=21)
    reference = np_(plain(x, "causal"))

    block.train()
    mx.random.seed(0)
    a, b = np_(block(x, "causal")), np_(block(x, "causal"))
    assert np.abs(a - reference).max() > 1e-2
    assert np.abs(a - b).max() > 1e-2

    block.eval()
    c, d = np_(block(x, "causal")), np_(block(x, "causal"))
    np.testing.assert_array_equal(c, d)
    np.testing.assert_allclose(c, reference, atol=1e-6, rtol=0)

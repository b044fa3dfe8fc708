"""MobileLLM forward: input types, loss, hidden states, padding, dtypes, dropout, checkpointing."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlx.utils import tree_flatten

from mlx_mobilellm.models import MobileLLM, MobileLLMConfig
from tiny_models import randomize_weights

VOCAB = 100


def tiny_config(**overrides) -> MobileLLMConfig:
    values = dict(num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, hidden_dim=64,
                  vocab_size=VOCAB, max_seq_len=64, rope_base=10000.0)
    return MobileLLMConfig(**{**values, **overrides})


def tiny_model(seed: int = 0, **overrides) -> MobileLLM:
    """A tiny model with random weights (norm weights too, so they are not all ones)."""
    model = MobileLLM(tiny_config(**overrides))
    return randomize_weights(model, seed)


def random_ids(batch, seq, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(batch, seq))


def np_(x) -> np.ndarray:
    return np.array(x.astype(mx.float32), dtype=np.float64)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


# --- inputs --------------------------------------------------------------------------------

def test_input_types_give_identical_results(model):
    ids = random_ids(2, 7)
    variants = [mx.array(ids), mx.array(ids.astype(np.int32)), ids, ids.astype(np.int32),
                ids.tolist()]
    outputs = [model(v).logits for v in variants]
    assert outputs[0].shape == (2, 7, VOCAB)
    for out in outputs[1:]:
        np.testing.assert_array_equal(np.array(out), np.array(outputs[0]))


def test_one_dimensional_input_is_one_row(model):
    ids = random_ids(1, 6)
    np.testing.assert_array_equal(np.array(model(ids[0].tolist()).logits),
                                  np.array(model(ids).logits))


def test_forward_alias(model):
    ids = random_ids(1, 5)
    np.testing.assert_array_equal(np.array(model.forward(ids).logits), np.array(model(ids).logits))


def test_no_labels_no_loss(model):
    assert model(random_ids(1, 4)).loss is None


def test_sequence_longer_than_max_seq_len_rejected(model):
    with pytest.raises(ValueError, match="max_seq_len"):
        model(random_ids(1, 65))


def test_logits_are_causal(model):
    ids = random_ids(1, 8)
    changed = ids.copy()
    changed[0, 5:] = (changed[0, 5:] + 1) % VOCAB
    a, b = np.array(model(ids).logits), np.array(model(changed).logits)
    np.testing.assert_allclose(a[:, :5], b[:, :5], atol=1e-5, rtol=0)
    assert np.abs(a[:, 5:] - b[:, 5:]).max() > 1e-3


# --- loss ----------------------------------------------------------------------------------

LABEL_CASES = {
    "labels_equal_inputs": lambda ids: ids.copy(),
    "some_ignored": lambda ids: np.where(np.random.default_rng(3).random(ids.shape) < 0.4, -100, ids),
    "one_row_mostly_ignored": lambda ids: np.concatenate(
        [ids[:1], np.where(np.arange(ids.shape[1]) < ids.shape[1] - 2, -100, ids[1:2])] + [ids[2:]]),
}


@pytest.mark.parametrize("case", list(LABEL_CASES))
def test_loss_matches_torch_cross_entropy(model, case):
    ids = random_ids(3, 9, seed=2)
    labels = LABEL_CASES[case](ids)
    out = model(ids, labels=labels)
    logits = torch.tensor(np_(out.logits))
    target = torch.tensor(labels)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), target[:, 1:].reshape(-1),
                               ignore_index=-100, reduction="mean")
    assert (target[:, 1:] == -100).any() == (case != "labels_equal_inputs")
    assert out.loss.shape == ()
    assert abs(out.loss.item() - expected.item()) < 1e-5


def test_loss_counts_tokens_not_rows(model):
    """Mean over counted tokens: a row with 1 counted token weighs 1/(total), not 1/rows."""
    ids = random_ids(2, 6, seed=4)
    labels = ids.copy()
    labels[0, 1:5] = -100  # row 0 keeps 1 counted target, row 1 keeps 5
    logits = torch.tensor(np_(model(ids).logits))
    per_token = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB),
                                torch.tensor(labels)[:, 1:].reshape(-1),
                                ignore_index=-100, reduction="none")
    expected = per_token.sum() / 6
    assert abs(model(ids, labels=labels).loss.item() - expected.item()) < 1e-5


# --- hidden states -------------------------------------------------------------------------

def decoder_by_hand(model, ids):
    h = model.embed_tokens(mx.array(ids))
    for block in model.decoder.layers:
        h = block(h, "causal")
    return model.decoder.norm(h)


def test_hidden_states_are_final_norm_output_and_tied_head(model):
    ids = random_ids(2, 6, seed=5)
    out = model(ids)
    assert out.hidden_states.shape == (2, 6, 32)
    np.testing.assert_allclose(np_(out.hidden_states), np_(decoder_by_hand(model, ids)),
                               atol=1e-5, rtol=0)
    expected_logits = np_(out.hidden_states) @ np_(model.embed_tokens.weight).T
    np.testing.assert_allclose(np_(out.logits), expected_logits, atol=1e-4, rtol=0)
    # Final norm applied: each hidden vector / norm weight has unit RMS.
    normalized = np_(out.hidden_states) / np_(model.decoder.norm.weight)
    np.testing.assert_allclose(np.sqrt((normalized ** 2).mean(-1)), 1.0, atol=1e-3)


def test_untied_head():
    model = tiny_model(seed=6, tie_word_embeddings=False)
    names = {name for name, _ in tree_flatten(model.parameters())}
    assert "lm_head.weight" in names
    ids = random_ids(1, 5, seed=7)
    out = model(ids)
    np.testing.assert_allclose(np_(out.logits), np_(out.hidden_states) @ np_(model.lm_head.weight).T,
                               atol=1e-4, rtol=0)
    tied = np_(out.hidden_states) @ np_(model.embed_tokens.weight).T
    assert np.abs(np_(out.logits) - tied).max() > 1e-2


def test_num_parameters_tiny(model):
    c = model.config
    head_dim = 32 // 4
    per_layer = 32 * head_dim * (2 * 4 + 2 * 2) + 3 * 32 * 64 + 2 * 32  # q,o + k,v; ffn; norms
    assert model.num_parameters() == VOCAB * 32 + c.num_layers * per_layer + 32
    assert model.num_parameters() == sum(p.size for _, p in tree_flatten(model.parameters()))


# --- padding -------------------------------------------------------------------------------

@pytest.mark.parametrize("pad_id", [0, 57])
def test_left_padding_with_attention_mask(model, pad_id):
    short = random_ids(1, 5, seed=8)[0]
    long = random_ids(1, 8, seed=9)[0]
    pad = 8 - 5
    batch = np.stack([np.concatenate([np.full(pad, pad_id), short]), long])
    mask = np.stack([np.r_[np.zeros(pad), np.ones(5)], np.ones(8)]).astype(np.int32)
    out = np_(model(batch, attention_mask=mask).logits)
    alone_short = np_(model(short[None]).logits)[0]
    alone_long = np_(model(long[None]).logits)[0]
    assert np.abs(out[0, pad:] - alone_short).max() <= 1e-4
    assert np.abs(out[1] - alone_long).max() <= 1e-4
    assert np.isfinite(out).all()
    # Without the mask the padding leaks into the short row.
    unmasked = np_(model(batch).logits)
    assert np.abs(unmasked[0, pad:] - alone_short).max() > 1e-3


def test_all_ones_attention_mask_changes_nothing(model):
    ids = random_ids(2, 6, seed=10)
    np.testing.assert_allclose(np_(model(ids, attention_mask=np.ones((2, 6), np.int32)).logits),
                               np_(model(ids).logits), atol=1e-5, rtol=0)


# --- cache at model level ------------------------------------------------------------------

def test_model_cache_prefill_then_steps_and_chunk(model):
    ids = random_ids(2, 10, seed=11)
    full = np_(model(ids).logits)
    cache = model.make_cache()
    parts = [model(ids[:, :4], cache=cache).logits, model(ids[:, 4:7], cache=cache).logits]
    parts += [model(ids[:, t:t + 1], cache=cache).logits for t in range(7, 10)]
    stepped = np.concatenate([np_(p) for p in parts], axis=1)
    np.testing.assert_allclose(stepped, full, atol=1e-4, rtol=0)


# --- dtypes --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(mx.float16, 0.05), (mx.bfloat16, 0.25)])
def test_half_precision_close_to_float32(dtype, tol):
    ids = random_ids(2, 8, seed=12)
    reference = tiny_model(seed=13)
    expected = reference(ids, labels=ids)
    model = tiny_model(seed=13)
    model.set_dtype(dtype)
    assert all(p.dtype == dtype for _, p in tree_flatten(model.parameters()))
    out = model(ids, labels=ids)
    assert out.logits.dtype == dtype
    logits = np_(out.logits)
    assert np.isfinite(logits).all()
    scale = np.abs(np_(expected.logits)).max()
    assert np.abs(logits - np_(expected.logits)).max() <= tol * scale
    assert np.isfinite(out.loss.item())
    assert abs(out.loss.item() - expected.loss.item()) < 0.05 * expected.loss.item()
    # Same greedy choice almost everywhere.
    agree = (logits.argmax(-1) == np_(expected.logits).argmax(-1)).mean()
    assert agree >= 0.8


# --- dropout -------------------------------------------------------------------------------

def test_model_dropout_train_vs_eval():
    ids = random_ids(2, 6, seed=14)
    model = tiny_model(seed=15, dropout=0.5)
    reference = np_(tiny_model(seed=15)(ids).logits)

    model.train()
    a, b = np_(model(ids).logits), np_(model(ids).logits)
    assert np.abs(a - b).max() > 1e-2
    assert np.abs(a - reference).max() > 1e-2

    model.eval()
    c, d = np_(model(ids).logits), np_(model(ids).logits)
    np.testing.assert_array_equal(c, d)
    np.testing.assert_allclose(c, reference, atol=1e-6, rtol=0)


# --- gradient checkpointing ----------------------------------------------------------------

def loss_and_grads(model, ids, labels):
    def loss_fn(m):
        return m(ids, labels=labels).loss

    loss, grads = nn.value_and_grad(model, loss_fn)(model)
    return loss.item(), dict(tree_flatten(grads))


@pytest.mark.parametrize("tied", [True, False])
def test_gradient_checkpointing_same_loss_and_gradients(tied):
    ids = mx.array(random_ids(2, 8, seed=16))
    labels = np.array(ids)
    labels[1, :3] = -100
    labels = mx.array(labels)

    plain = tiny_model(seed=17, num_layers=3, tie_word_embeddings=tied)
    checkpointed = tiny_model(seed=17, num_layers=3, tie_word_embeddings=tied)
    checkpointed.enable_gradient_checkpointing()
    for m in (plain, checkpointed):
        m.train()  # dropout is 0: training mode must not change anything

    loss_a, grads_a = loss_and_grads(plain, ids, labels)
    loss_b, grads_b = loss_and_grads(checkpointed, ids, labels)
    assert abs(loss_a - loss_b) <= 1e-5
    names = {name for name, _ in tree_flatten(plain.trainable_parameters())}
    assert set(grads_a) == set(grads_b) == names
    for name in names:
        g_a, g_b = np_(grads_a[name]), np_(grads_b[name])
        assert np.abs(g_a).max() > 0, name  # every parameter gets a real gradient
        np.testing.assert_allclose(g_b, g_a, atol=1e-4, rtol=0, err_msg=name)

    # Disabling returns to the plain path with the same result.
    checkpointed.disable_gradient_checkpointing()
    loss_c, _ = loss_and_grads(checkpointed, ids, labels)
    assert abs(loss_c - loss_a) <= 1e-5


@pytest.mark.parametrize("name", ["decoder.layers.0.ffn.up_proj.weight",
                                  "decoder.layers.0.attention.q_proj.weight",
                                  "decoder.layers.1.attention_norm.weight", "embed_tokens.weight"])
def test_checkpointed_gradient_matches_finite_difference(name):
    """The gradient itself is right, not only equal between the two paths: the loss changes at
    rate |g| along g / |g| (central difference)."""
    model = tiny_model(seed=18)
    model.enable_gradient_checkpointing()
    ids = mx.array(random_ids(1, 6, seed=19))
    _, grads = loss_and_grads(model, ids, ids)
    original = dict(tree_flatten(model.parameters()))[name]
    g = np_(grads[name])
    norm = np.linalg.norm(g)
    direction = mx.array((g / norm).astype(np.float32))
    eps = 1e-2
    values = []
    for sign in (1, -1):
        model.load_weights([(name, original + sign * eps * direction)], strict=False)
        values.append(model(ids, labels=ids).loss.item())
    model.load_weights([(name, original)], strict=False)
    numeric = (values[0] - values[1]) / (2 * eps)
    assert norm > 1e-2
    assert abs(numeric - norm) <= 0.01 * norm


def test_enable_gradient_checkpointing_wraps_every_block(monkeypatch):
    """enable_gradient_checkpointing really routes each block through mlx.nn.utils.checkpoint
    (and only in training calls without a cache)."""
    import mlx_mobilellm.models.transformer as transformer

    wrapped = []
    real = transformer.checkpoint

    def counting_checkpoint(module, *args, **kwargs):
        wrapped.append(module)
        return real(module, *args, **kwargs)

    monkeypatch.setattr(transformer, "checkpoint", counting_checkpoint)
    model = tiny_model(seed=21, num_layers=3)
    ids = random_ids(1, 5, seed=22)
    model(ids)
    assert wrapped == []
    model.enable_gradient_checkpointing()
    model(ids)
    assert [id(m) for m in wrapped] == [id(block) for block in model.decoder.layers]


def test_gradient_checkpointing_with_dropout_matches_plain():
    ids = mx.array(random_ids(2, 8, seed=23))
    results = []
    for checkpointed in (False, True):
        m = tiny_model(seed=24, dropout=0.3)
        m.train()
        if checkpointed:
            m.enable_gradient_checkpointing()
        mx.random.seed(0)  # same dropout masks in both forward passes
        results.append(loss_and_grads(m, ids, ids))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert abs(loss_a - loss_b) <= 1e-5  # this part holds: the forward passes agree
    for name in grads_a:
        np.testing.assert_allclose(np_(grads_b[name]), np_(grads_a[name]), atol=1e-4, rtol=0,
                                   err_msg=name)

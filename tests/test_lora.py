"""LoRA / DoRA adapters on float and quantized (QLoRA) linear layers: the forward against a
hand computation in numpy, which parameters train, fusing back into plain weights, and the
adapter folder's save/load round trip and errors."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from generation_helpers import tiny_model
from mlx_mobilellm.errors import CheckpointError
from mlx_mobilellm.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, DoRALinear, LoRALinear,
                                apply_adapters, fuse, load_adapters, save_adapters)

VOCAB = 64
GROUP, BITS = 32, 4
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
KINDS = {"lora": LoRALinear, "dora": DoRALinear}


def quantize_linears(model, bits: int = BITS) -> None:
    nn.quantize(model, group_size=GROUP, bits=bits,
                class_predicate=lambda _, module: isinstance(module, nn.Linear))


def make_model(quantized: bool, num_layers: int = 3, bits: int = BITS):
    """A tiny random model (width 64, FFN 128: both multiples of the group size); its linear
    layers quantized when asked (the embedding stays float)."""
    model = tiny_model(VOCAB, seed=0, num_layers=num_layers, embed_dim=64, hidden_dim=128)
    if quantized:
        quantize_linears(model, bits)
    return model


def make_linear(quantized: bool, in_features: int = 64, out_features: int = 96, seed: int = 0):
    rng = np.random.default_rng(seed)
    linear = nn.Linear(in_features, out_features, bias=False)
    linear.weight = mx.array(rng.standard_normal((out_features, in_features)).astype(np.float32) * 0.2)
    return nn.QuantizedLinear.from_linear(linear, GROUP, BITS) if quantized else linear


def hand_dequantize(layer) -> np.ndarray:
    """The affine 4/8-bit weight unpacked from its uint32 words by hand: w = q * scale + bias."""
    packed = np.array(layer.weight).astype(np.uint64)
    per_word = 32 // layer.bits
    shifts = (np.arange(per_word) * layer.bits).astype(np.uint64)
    q = ((packed[..., None] >> shifts) & ((1 << layer.bits) - 1)).reshape(packed.shape[0], -1)
    scales = np.repeat(np.array(layer.scales, np.float64), layer.group_size, axis=1)
    biases = np.repeat(np.array(layer.biases, np.float64), layer.group_size, axis=1)
    return q.astype(np.float64) * scales + biases


def weight_of(layer) -> np.ndarray:
    if isinstance(layer, nn.QuantizedLinear):
        return hand_dequantize(layer)
    return np.array(layer.weight, np.float64)


def randomize(adapter, seed: int) -> None:
    """Non-zero B (and, for DoRA, magnitudes off the row norms): an adapter that has learnt."""
    rng = np.random.default_rng(seed)
    adapter.lora_b = mx.array(rng.standard_normal(adapter.lora_b.shape).astype(np.float32) * 0.05)
    if isinstance(adapter, DoRALinear):
        noise = 1 + 0.2 * rng.standard_normal(adapter.magnitude.shape)
        adapter.magnitude = adapter.magnitude * mx.array(noise.astype(np.float32))


def randomize_all(model, seed: int = 1) -> None:
    for number, (_, module) in enumerate(model.named_modules()):
        if isinstance(module, LoRALinear):
            randomize(module, seed * 1000 + number)


def tokens(batch: int = 2, length: int = 12, seed: int = 3) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, VOCAB, (batch, length)), dtype=mx.int32)


def logits(model, ids=None) -> np.ndarray:
    return np.array(model(tokens() if ids is None else ids).logits, np.float64)


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# --- one layer --------------------------------------------------------------------------------

@pytest.mark.parametrize("quantized", [False, True], ids=["float", "quantized"])
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_fresh_adapter_changes_nothing(kind, quantized):
    base = make_linear(quantized)
    x = mx.array(np.random.default_rng(1).standard_normal((2, 5, 64)).astype(np.float32))
    adapter = KINDS[kind](base, rank=4, scale=20.0)
    assert not np.any(np.array(adapter.lora_b))
    assert np.any(np.array(adapter.lora_a))  # A is random: only B = 0 makes the update vanish
    assert max_diff(adapter(x), base(x)) <= 1e-6


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "quantized"])
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_forward_matches_hand_computation(kind, quantized):
    base = make_linear(quantized)
    adapter = KINDS[kind](base, rank=4, scale=3.0)
    randomize(adapter, seed=5)
    x = np.random.default_rng(2).standard_normal((2, 5, 64))
    w = weight_of(base)
    a, b = np.array(adapter.lora_a, np.float64), np.array(adapter.lora_b, np.float64)
    expected = x @ w.T + 3.0 * (x @ a.T) @ b.T
    if kind == "dora":
        merged = w + 3.0 * b @ a
        expected = expected * np.array(adapter.magnitude, np.float64) / np.linalg.norm(merged, axis=1)
    got = np.array(adapter(mx.array(x.astype(np.float32))), np.float64)
    assert max_diff(got, expected) <= 1e-4 * max(1.0, np.abs(expected).max())
    # and the adapter really contributes (the check above is not just the base output)
    assert max_diff(x @ w.T, expected) > 1e-2


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "quantized"])
def test_dora_magnitude_starts_at_row_norms_and_fuses_to_its_forward(quantized):
    base = make_linear(quantized)
    adapter = DoRALinear(base, rank=4, scale=2.0)
    norms = np.linalg.norm(weight_of(base), axis=1)
    assert adapter.magnitude.shape == (96,)
    assert max_diff(adapter.magnitude, norms) <= 1e-5 * norms.max()

    randomize(adapter, seed=7)
    x = mx.array(np.random.default_rng(4).standard_normal((3, 64)).astype(np.float32))
    fused = np.array(adapter.fused_weight(), np.float64)
    # each fused row has exactly the learnt magnitude as its norm
    assert max_diff(np.linalg.norm(fused, axis=1), adapter.magnitude) <= 1e-4
    assert max_diff(np.array(x, np.float64) @ fused.T, adapter(x)) <= 1e-4


# --- which parameters train -------------------------------------------------------------------

def expected_names(layers, keys, kind):
    leaves = ("lora_a", "lora_b") + (("magnitude",) if kind == "dora" else ())
    names = set()
    for index in layers:
        for key in keys:
            module = "attention" if key in ATTENTION else "ffn"
            names |= {f"decoder.layers.{index}.{module}.{key}.{leaf}" for leaf in leaves}
    return names


def expected_count(layers, keys, kind, rank, dims):
    total = 0
    for _ in layers:
        for key in keys:
            in_features, out_features = dims[key]
            total += rank * (in_features + out_features) + (out_features if kind == "dora" else 0)
    return total


@pytest.mark.parametrize("kind", ["lora", "dora"])
@pytest.mark.parametrize("quantized", [False, True], ids=["float", "quantized"])
@pytest.mark.parametrize("num_layers, keys, layers", [
    (None, None, [0, 1, 2]),                    # defaults: attention q/k/v/o and the MLP, all blocks
    (2, None, [1, 2]),                          # the last two blocks only
    (10, None, [0, 1, 2]),                      # more than there are: all
    (1, ["q_proj", "v_proj"], [2]),             # custom keys
    (None, ["down_proj"], [0, 1, 2]),
], ids=["default", "last-2", "more-than-exist", "q-v-last-1", "down-only"])
def test_apply_adapters_trains_only_the_adapters(kind, quantized, num_layers, keys, layers):
    model = make_model(quantized)
    config = {"fine_tune_type": kind, "rank": 4, "scale": 2.0}
    if num_layers is not None:
        config["num_layers"] = num_layers
    if keys is not None:
        config["keys"] = keys
    before = logits(model)
    apply_adapters(model, config)
    wanted = keys or ATTENTION + MLP
    # 4 heads x 16 = 64 wide queries, 2 KV heads x 16 = 32 wide keys/values, FFN 128
    dims = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
            "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}

    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert set(trainable) == expected_names(layers, wanted, kind)
    assert sum(p.size for p in trainable.values()) == expected_count(layers, wanted, kind, 4, dims)
    # everything else is still there, frozen: the base weights, norms and embedding
    everything = dict(tree_flatten(model.parameters()))
    assert "embed_tokens.weight" in everything and "decoder.norm.weight" in everything
    assert len(everything) > len(trainable)
    # the adapted layers are exactly the wanted ones, wrapped around the original base layer
    adapted = {path for path, module in model.named_modules() if isinstance(module, KINDS[kind])}
    assert adapted == {name.rsplit(".", 1)[0] for name in trainable}
    base_type = nn.QuantizedLinear if quantized else nn.Linear
    assert all(isinstance(m.base, base_type) for _, m in model.named_modules()
               if isinstance(m, LoRALinear))
    # a fresh adapter leaves the whole model's output unchanged
    assert max_diff(logits(model), before) <= 1e-5
    # gradients reach exactly the trainable names
    grads = nn.value_and_grad(model, lambda m, x: m(x, labels=x).loss)(model, tokens())[1]
    assert set(dict(tree_flatten(grads))) == set(trainable)


def test_apply_adapters_with_unknown_keys_is_an_error():
    with pytest.raises(ValueError, match="no linear layer matches"):
        apply_adapters(make_model(False), {"keys": ["nonexistent_proj"]})


@pytest.mark.parametrize("training", [False, True])
def test_new_adapters_follow_the_models_mode(training):
    model = make_model(False)
    model.train(training)
    apply_adapters(model, {"rank": 4, "dropout": 0.5})
    modes = {m.training for _, m in model.named_modules()}
    assert modes == {training}
    if not training:  # eval: no dropout, so two calls agree exactly
        randomize_all(model)
        assert np.array_equal(logits(model), logits(model))


# --- fusing -----------------------------------------------------------------------------------

def base_names(quantized: bool) -> set:
    return set(dict(tree_flatten(make_model(quantized).parameters())))


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_fuse_float_base_gives_the_adapted_logits(kind):
    model = make_model(False)
    apply_adapters(model, {"fine_tune_type": kind, "rank": 4, "scale": 2.0})
    randomize_all(model)
    adapted = logits(model)
    assert max_diff(adapted, logits(make_model(False))) > 1e-2  # the adapters matter
    fuse(model)
    assert not any(isinstance(m, LoRALinear) for _, m in model.named_modules())
    assert set(dict(tree_flatten(model.parameters()))) == base_names(False)
    assert max_diff(logits(model), adapted) <= 1e-4


@pytest.mark.parametrize("bits, tolerance", [(4, 0.3), (8, 0.05)])
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_fuse_quantized_base_requantizes_or_dequantizes(kind, bits, tolerance):
    config = {"fine_tune_type": kind, "rank": 4, "scale": 2.0}
    model = make_model(True, bits=bits)
    apply_adapters(model, config)
    randomize_all(model)
    adapted = logits(model)
    # dequantize=True: the merged layers in float, exactly the adapted model
    dequantized = make_model(True, bits=bits)
    apply_adapters(dequantized, config)
    dequantized.load_weights(list(tree_flatten(model.trainable_parameters())), strict=False)
    assert np.array_equal(logits(dequantized), adapted)
    fuse(dequantized, dequantize=True)
    linears = [m for _, m in dequantized.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))]
    assert len(linears) == 3 * 7 and all(type(m) is nn.Linear for m in linears)
    assert max_diff(logits(dequantized), adapted) <= 1e-4

    # default: re-quantized with the base's own bits and group size, i.e. exactly those
    # float merged layers quantized again
    fuse(model)
    quantized = [m for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert len(quantized) == 3 * 7
    assert all((m.bits, m.group_size) == (bits, GROUP) for m in quantized)
    assert set(dict(tree_flatten(model.parameters()))) == base_names(True)
    requantized = logits(model)
    quantize_linears(dequantized, bits)
    assert np.array_equal(requantized, logits(dequantized))
    # close to the adapted model (this random model is very sensitive to rounding: its own
    # 4-bit quantization moves the logits by ~0.25 std), and closer than the unadapted base
    error = np.abs(requantized - adapted).mean() / adapted.std()
    assert error <= tolerance
    if bits == 8:
        assert error < 0.5 * np.abs(logits(make_model(True, bits=bits)) - adapted).mean() / adapted.std()


# --- save / load ------------------------------------------------------------------------------

@pytest.mark.parametrize("quantized", [False, True], ids=["float", "quantized"])
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_save_load_round_trip_reproduces_logits(tmp_path, kind, quantized):
    config = {"fine_tune_type": kind, "rank": 4, "scale": 2.0, "dropout": 0.3,
              "num_layers": 2, "keys": ["q_proj", "v_proj", "down_proj"]}
    model = make_model(quantized)
    apply_adapters(model, config)
    randomize_all(model)
    save_adapters(tmp_path, model, config)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS])
    assert json.loads((tmp_path / ADAPTER_CONFIG).read_text()) == config

    fresh = make_model(quantized)
    assert load_adapters(fresh, tmp_path) == config
    ids = tokens(batch=3, length=10, seed=9)
    assert np.array_equal(logits(fresh, ids), logits(model, ids))
    assert set(dict(tree_flatten(fresh.trainable_parameters()))) == \
        set(dict(tree_flatten(model.trainable_parameters())))


def saved_folder(tmp_path, config=None):
    config = config or {"rank": 4, "scale": 2.0}
    model = make_model(False)
    apply_adapters(model, config)
    save_adapters(tmp_path, model, config)
    return tmp_path


@pytest.mark.parametrize("damage, match", [
    (lambda folder: (folder / ADAPTER_CONFIG).unlink(), "adapter_config.json: not found"),
    (lambda folder: (folder / ADAPTER_CONFIG).write_text("{rank: 4"), "adapter_config.json: not valid JSON"),
    (lambda folder: (folder / ADAPTER_WEIGHTS).unlink(), "adapters.safetensors: cannot load"),
    (lambda folder: (folder / ADAPTER_CONFIG).write_text(json.dumps({"rank": 8, "scale": 2.0})),
     "adapters.safetensors: does not match adapter_config.json"),
    (lambda folder: (folder / ADAPTER_CONFIG).write_text(json.dumps({"rank": 4, "keys": ["q_proj"]})),
     "adapters.safetensors: does not match adapter_config.json"),
], ids=["no-config", "bad-json", "no-weights", "wrong-rank", "wrong-keys"])
def test_load_adapters_errors_name_the_file(tmp_path, damage, match):
    folder = saved_folder(tmp_path)
    damage(folder)
    with pytest.raises(CheckpointError, match=match) as error:
        load_adapters(make_model(False), folder)
    assert str(folder) in str(error.value)

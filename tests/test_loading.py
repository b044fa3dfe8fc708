"""mlx_mobilellm.load on Hugging Face checkpoint folders: single files, shards, dtype casts,
and the errors bad folders get (each a CheckpointError naming the file / tensor / field).

The folders are written here with safetensors.numpy and json, tensor by tensor, so that every
defect can be made on purpose; one test also reads what transformers' save_pretrained shards.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from safetensors.numpy import save_file

import mlx_mobilellm
from mlx_mobilellm import CheckpointError

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB, LAYERS = 64, 4, 2, 16, 160, 256, 2


def hf_config(model_type: str = "llama4_text", **overrides) -> dict:
    """A tiny config.json of a dense MobileLLM-R1 (llama4_text) or Llama model."""
    config = dict(
        model_type=model_type, vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
        max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=True,
        hidden_act="silu", bos_token_id=1, eos_token_id=2,
    )
    if model_type == "llama4_text":
        config.update(architectures=["Llama4ForCausalLM"], intermediate_size=96,
                      intermediate_size_mlp=FFN, moe_layers=[], no_rope_layers=[1] * LAYERS,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                      use_qk_norm=True, attention_chunk_size=8192, attn_temperature_tuning=False)
    else:
        config.update(architectures=["LlamaForCausalLM"], intermediate_size=FFN,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    config.update(overrides)
    return config


def hf_tensors(config: dict, seed: int = 0, dtype=np.float32) -> dict:
    """Random weights under Hugging Face names, with the shapes the config implies."""
    rng = np.random.default_rng(seed)
    hidden, head_dim = config["hidden_size"], config["head_dim"]
    q_dim = config["num_attention_heads"] * head_dim
    kv_dim = config["num_key_value_heads"] * head_dim
    if config["model_type"] == "llama4_text":
        ffn_name, ffn = "feed_forward", config["intermediate_size_mlp"]
    else:
        ffn_name, ffn = "mlp", config["intermediate_size"]
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], hidden), "model.norm.weight": (hidden,)}
    for n in range(config["num_hidden_layers"]):
        layer = f"model.layers.{n}"
        shapes.update({
            f"{layer}.self_attn.q_proj.weight": (q_dim, hidden),
            f"{layer}.self_attn.k_proj.weight": (kv_dim, hidden),
            f"{layer}.self_attn.v_proj.weight": (kv_dim, hidden),
            f"{layer}.self_attn.o_proj.weight": (hidden, q_dim),
            f"{layer}.{ffn_name}.gate_proj.weight": (ffn, hidden),
            f"{layer}.{ffn_name}.up_proj.weight": (ffn, hidden),
            f"{layer}.{ffn_name}.down_proj.weight": (hidden, ffn),
            f"{layer}.input_layernorm.weight": (hidden,),
            f"{layer}.post_attention_layernorm.weight": (hidden,),
        })
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (config["vocab_size"], hidden)
    return {name: (0.1 * rng.standard_normal(shape)).astype(dtype) for name, shape in shapes.items()}


def write_folder(folder: Path, config: dict, tensors: dict, shards: int = 1,
                 index: bool = True) -> Path:
    """config.json plus model.safetensors, or `shards` files model-0000i-of-0000n.safetensors
    with (index=True) a model.safetensors.index.json, as save_pretrained writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
        return folder
    names = list(tensors)
    weight_map = {}
    for i, part in enumerate(np.array_split(np.arange(len(names)), shards)):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({names[j]: tensors[names[j]] for j in part}, str(folder / file))
        weight_map.update({names[j]: file for j in part})
    if index:
        total = sum(t.nbytes for t in tensors.values())
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return folder


def shard_of(folder: Path, tensor: str) -> str:
    return json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][tensor]


IDS = mx.array([[5, 17, 42, 99, 3, 250, 128, 7]])


def logits(model) -> np.ndarray:
    return np.array(model(IDS).logits.astype(mx.float32))


def load_error(folder, **kwargs) -> str:
    with pytest.raises(CheckpointError) as caught:
        mlx_mobilellm.load(folder, **kwargs)
    message = str(caught.value)
    assert "\n" not in message.strip(), "errors are one line"
    return message


# --- what loads -------------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", ["llama4_text", "llama"])
@pytest.mark.parametrize("tied", [True, False])
def test_single_file_loads_every_tensor(tmp_path, model_type, tied):
    config = hf_config(model_type, tie_word_embeddings=tied)
    tensors = hf_tensors(config)
    model, tokenizer = mlx_mobilellm.load(write_folder(tmp_path, config, tensors))
    assert tokenizer is None
    params = dict(tree_flatten(model.parameters()))
    ffn = "feed_forward" if model_type == "llama4_text" else "mlp"
    pairs = {"embed_tokens.weight": "model.embed_tokens.weight",
             "decoder.norm.weight": "model.norm.weight",
             "decoder.layers.1.attention.k_proj.weight": "model.layers.1.self_attn.k_proj.weight",
             "decoder.layers.1.attention_norm.weight": "model.layers.1.input_layernorm.weight",
             "decoder.layers.1.ffn_norm.weight": "model.layers.1.post_attention_layernorm.weight",
             "decoder.layers.0.ffn.down_proj.weight": f"model.layers.0.{ffn}.down_proj.weight"}
    if not tied:
        pairs["lm_head.weight"] = "lm_head.weight"
    for ours, theirs in pairs.items():
        np.testing.assert_array_equal(np.array(params[ours]), tensors[theirs], err_msg=ours)
    assert ("lm_head.weight" in params) == (not tied)
    assert len(params) == len(tensors)
    assert all(p.dtype == mx.float32 for p in params.values())


@pytest.mark.parametrize("with_index", [True, False], ids=["index", "no-index"])
def test_sharded_checkpoint_equals_single_file(tmp_path, with_index):
    config = hf_config(tie_word_embeddings=False)
    tensors = hf_tensors(config)
    single, _ = mlx_mobilellm.load(write_folder(tmp_path / "single", config, tensors))
    sharded_folder = write_folder(tmp_path / "sharded", config, tensors, shards=3, index=with_index)
    assert len(list(sharded_folder.glob("*.safetensors"))) == 3
    sharded, _ = mlx_mobilellm.load(sharded_folder)
    np.testing.assert_array_equal(logits(sharded), logits(single))


def test_index_decides_which_files_are_read(tmp_path):
    """With an index, only the shards it names are weights: a stray *.safetensors is ignored."""
    config = hf_config()
    folder = write_folder(tmp_path, config, hf_tensors(config), shards=2)
    save_file({"stray.weight": np.zeros(3, np.float32)}, str(folder / "optimizer.safetensors"))
    mlx_mobilellm.load(folder)


def test_transformers_save_pretrained_shards(tmp_path):
    import torch
    import transformers
    torch.manual_seed(0)
    hf = transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(**{
        k: v for k, v in hf_config(tie_word_embeddings=False).items()
        if k not in ("model_type", "architectures")}))
    hf.save_pretrained(tmp_path / "one")
    hf.save_pretrained(tmp_path / "many", max_shard_size="100KB")
    shards = sorted(p.name for p in (tmp_path / "many").glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "many" / "model.safetensors.index.json").exists()
    one, _ = mlx_mobilellm.load(tmp_path / "one")
    many, _ = mlx_mobilellm.load(tmp_path / "many")
    np.testing.assert_array_equal(logits(many), logits(one))


def test_tied_checkpoint_with_redundant_head_and_rope_buffers(tmp_path):
    """Some exporters write the tied head and RoPE inv_freq buffers too: both are not weights."""
    config = hf_config(tie_word_embeddings=True)
    tensors = hf_tensors(config)
    reference, _ = mlx_mobilellm.load(write_folder(tmp_path / "plain", config, tensors))
    extra = dict(tensors)
    extra["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    extra["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(HEAD_DIM // 2, np.float32)
    model, _ = mlx_mobilellm.load(write_folder(tmp_path / "extra", config, extra))
    assert "lm_head.weight" not in dict(tree_flatten(model.parameters()))
    np.testing.assert_array_equal(logits(model), logits(reference))


@pytest.mark.parametrize("dtype, mx_dtype", [("bfloat16", mx.bfloat16), ("float16", mx.float16),
                                             ("float32", mx.float32)])
def test_dtype_cast(tmp_path, dtype, mx_dtype):
    config = hf_config(tie_word_embeddings=False)
    folder = write_folder(tmp_path, config, hf_tensors(config))
    reference = logits(mlx_mobilellm.load(folder)[0])
    model, _ = mlx_mobilellm.load(folder, dtype=dtype)
    assert {p.dtype for _, p in tree_flatten(model.parameters())} == {mx_dtype}
    out = model(IDS).logits
    assert out.dtype == mx_dtype
    got = np.array(out.astype(mx.float32))
    assert np.isfinite(got).all()
    # Same model, lower precision: close, but (except float32) not bit-identical.
    scale = np.abs(reference).max()
    np.testing.assert_allclose(got, reference, atol=0.05 * scale, rtol=0)
    assert (np.abs(got - reference).max() > 0) == (dtype != "float32")


def test_checkpoint_dtype_kept_without_dtype(tmp_path):
    config = hf_config()
    model, _ = mlx_mobilellm.load(write_folder(tmp_path, config, hf_tensors(config, dtype=np.float16)))
    assert {p.dtype for _, p in tree_flatten(model.parameters())} == {mx.float16}


def test_float16_checkpoint_cast_up(tmp_path):
    config = hf_config()
    model, _ = mlx_mobilellm.load(
        write_folder(tmp_path, config, hf_tensors(config, dtype=np.float16)), dtype="float32")
    assert {p.dtype for _, p in tree_flatten(model.parameters())} == {mx.float32}


# --- what is refused, and how it is said ------------------------------------------------------

def test_unknown_dtype(tmp_path):
    config = hf_config()
    message = load_error(write_folder(tmp_path, config, hf_tensors(config)), dtype="int8")
    assert "int8" in message
    assert all(name in message for name in ("float32", "float16", "bfloat16"))


def test_missing_folder(tmp_path):
    missing = tmp_path / "no-such-model"
    message = load_error(missing)
    assert str(missing) in message


def test_single_safetensors_file_reads_config_beside_it(tmp_path):
    config = hf_config()
    folder = write_folder(tmp_path, config, hf_tensors(config))
    ids = [[1, 2, 3, 4]]
    from_file = np.array(mlx_mobilellm.load(folder / "model.safetensors")[0](ids).logits)
    from_folder = np.array(mlx_mobilellm.load(folder)[0](ids).logits)
    np.testing.assert_array_equal(from_file, from_folder)


def test_file_without_config_beside_it(tmp_path):
    config = hf_config()
    folder = write_folder(tmp_path, config, hf_tensors(config))
    (folder / "config.json").unlink()
    message = load_error(folder / "model.safetensors")
    assert str(folder / "config.json") in message


def test_missing_config_json(tmp_path):
    config = hf_config()
    folder = write_folder(tmp_path, config, hf_tensors(config))
    (folder / "config.json").unlink()
    assert str(folder / "config.json") in load_error(folder)


def test_config_json_not_json(tmp_path):
    config = hf_config()
    folder = write_folder(tmp_path, config, hf_tensors(config))
    (folder / "config.json").write_text('{"model_type": "llama",')
    message = load_error(folder)
    assert str(folder / "config.json") in message and "JSON" in message


def test_unknown_model_type(tmp_path):
    config = hf_config(model_type="gpt2")
    folder = write_folder(tmp_path, config, hf_tensors(hf_config()))
    message = load_error(folder)
    assert str(folder / "config.json") in message
    assert "gpt2" in message
    assert "llama4_text" in message and "llama" in message.replace("llama4_text", "")


@pytest.mark.parametrize("model_type, field", [
    ("llama4_text", "hidden_size"), ("llama4_text", "num_hidden_layers"),
    ("llama4_text", "num_attention_heads"), ("llama4_text", "vocab_size"),
    ("llama4_text", "intermediate_size_mlp"), ("llama", "intermediate_size"),
    ("llama", "hidden_size"),
])
def test_config_missing_required_field(tmp_path, model_type, field):
    config = hf_config(model_type)
    tensors = hf_tensors(config)
    del config[field]
    message = load_error(write_folder(tmp_path, config, tensors))
    assert str(tmp_path / "config.json") in message
    assert f"'{field}'" in message


def test_llama4_mixture_of_experts_config_refused(tmp_path):
    config = hf_config(moe_layers=[1], num_local_experts=4, num_experts_per_tok=1)
    message = load_error(write_folder(tmp_path, config, hf_tensors(hf_config())))
    assert str(tmp_path / "config.json") in message
    assert "mixture-of-experts" in message and "[1]" in message


def test_pytorch_bin_only_refused_with_safetensors_hint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(hf_config()))
    # Never unpickled: the bytes need not even be a valid pickle.
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 not read")
    message = load_error(tmp_path)
    assert "pytorch_model.bin" in message
    assert "safetensors" in message


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(hf_config()))
    message = load_error(tmp_path)
    assert str(tmp_path) in message and "safetensors" in message


@pytest.mark.parametrize("keep", ["3 bytes", "header part", "data part", "all but 1 byte"])
def test_truncated_safetensors(tmp_path, keep):
    config = hf_config()
    folder = write_folder(tmp_path, config, hf_tensors(config))
    file = folder / "model.safetensors"
    data = file.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    cut = {"3 bytes": 3, "header part": header_end // 2, "data part": (header_end + len(data)) // 2,
           "all but 1 byte": len(data) - 1}[keep]
    file.write_bytes(data[:cut])
    message = load_error(folder)
    assert str(file) in message
    assert "truncated" in message


def test_truncated_shard_named(tmp_path):
    config = hf_config()
    folder = write_folder(tmp_path, config, hf_tensors(config), shards=3)
    shard = folder / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    message = load_error(folder)
    assert str(shard) in message


def test_index_names_missing_shard(tmp_path):
    config = hf_config()
    folder = write_folder(tmp_path, config, hf_tensors(config), shards=3)
    (folder / "model-00003-of-00003.safetensors").unlink()
    message = load_error(folder)
    assert "model.safetensors.index.json" in message
    assert "model-00003-of-00003.safetensors" in message


def test_index_not_json(tmp_path):
    config = hf_config()
    folder = write_folder(tmp_path, config, hf_tensors(config), shards=2)
    (folder / "model.safetensors.index.json").write_text("{")
    assert str(folder / "model.safetensors.index.json") in load_error(folder)


@pytest.mark.parametrize("name, hint", [
    ("model.layers.1.self_attn.q_proj.bias", ""),
    ("model.layers.0.feed_forward.router.weight", "mixture-of-experts"),
    ("model.layers.0.feed_forward.experts.gate_up_proj", "mixture-of-experts"),
])
def test_unexpected_tensor_names_file_and_tensor(tmp_path, name, hint):
    config = hf_config()
    tensors = hf_tensors(config)
    tensors[name] = np.zeros((4, 4), np.float32)
    folder = write_folder(tmp_path, config, tensors, shards=3)
    message = load_error(folder)
    assert f"'{name}'" in message
    assert str(folder / shard_of(folder, name)) in message  # the shard that holds it
    assert hint in message


def test_unexpected_tensor_in_single_file(tmp_path):
    config = hf_config(model_type="llama")
    tensors = hf_tensors(config)
    # A llama4_text name in a llama checkpoint: feed_forward is not Llama's FFN module.
    tensors["model.layers.0.feed_forward.up_proj.weight"] = tensors.pop("model.layers.0.mlp.up_proj.weight")
    message = load_error(write_folder(tmp_path, config, tensors))
    assert "model.layers.0.feed_forward.up_proj.weight" in message
    assert str(tmp_path / "model.safetensors") in message


MISSING = "model.layers.1.feed_forward.up_proj.weight"


def test_missing_tensor(tmp_path):
    config = hf_config()
    tensors = hf_tensors(config)
    del tensors[MISSING]
    message = load_error(write_folder(tmp_path, config, tensors))
    assert str(tmp_path) in message and "missing" in message
    # Named as the checkpoint names it, not by our internal name (decoder.layers.1.ffn...).
    assert f"'{MISSING}'" in message or f" {MISSING}" in message
    assert "decoder." not in message


def test_missing_head_of_untied_checkpoint(tmp_path):
    config = hf_config(tie_word_embeddings=False)
    tensors = hf_tensors(config)
    del tensors["lm_head.weight"]
    message = load_error(write_folder(tmp_path, config, tensors))
    assert "lm_head.weight" in message


def test_wrong_shape(tmp_path):
    config = hf_config()
    tensors = hf_tensors(config)
    tensors[MISSING] = tensors[MISSING][:, : HIDDEN // 2].copy()
    message = load_error(write_folder(tmp_path, config, tensors))
    assert str(tmp_path) in message
    assert f"'{MISSING}'" in message and "decoder." not in message
    assert f"({FFN}, {HIDDEN // 2})" in message and f"({FFN}, {HIDDEN})" in message

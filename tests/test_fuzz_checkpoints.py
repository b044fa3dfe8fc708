"""Fuzzing the checkpoint readers: config.json, safetensors headers and the shard index, GGUF
headers and metadata. Each example is a valid tiny checkpoint with generated defects, loaded by
mlx_mobilellm.load in the worker process (see fuzz_support): it must load and run, or be refused
with one CheckpointError line — never crash, hang or print a traceback."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import gguf
import pytest
from hypothesis import given
from hypothesis import strategies as st

from convert.convert import convert
from fuzz_support import (EDGE_INTS, assert_clean, damaged_safetensors, edge_ints,
                          hostile_json_bytes, json_values, scratch_copy)
from test_convert import (GGUF_VOCAB, Q, cheapertraining_source, save_hf, transformers_model,
                          write_gguf)

DELETE = object()


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict:
    """Valid tiny checkpoints of every source format, to be damaged by the examples."""
    root = tmp_path_factory.mktemp("fuzz-checkpoints")
    llama = save_hf(transformers_model("llama"), root / "llama")
    llama4 = save_hf(transformers_model("llama4"), root / "llama4")
    return {
        "llama": llama,
        "llama4_text": llama4,
        "sharded": save_hf(transformers_model("llama", tie_word_embeddings=False), root / "sharded",
                           max_shard_size="100KB"),
        "mlx": convert(llama4, root / "mlx", quiet=True),
        "mlx-4bit": convert(llama, root / "mlx-4bit", quantize=True, q_group_size=32, quiet=True),
        "cheapertraining": cheapertraining_source(seed_fields_only=False)(root / "ct").path,
    }


@pytest.fixture(scope="module")
def gguf_model():
    """The transformers Llama that every GGUF example writes (with its own metadata)."""
    return transformers_model("llama", vocab_size=GGUF_VOCAB)


def load_reply(worker, path: Path) -> dict:
    return worker.run(op="load", path=str(path))


# --- config.json -----------------------------------------------------------------------------

# Fields any of the formats reads, beside those a base config already has.
CONFIG_FIELDS = [
    "model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "intermediate_size_mlp",
    "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
    "rms_norm_eps", "rope_theta", "rope_parameters", "rope_scaling", "no_rope_layers",
    "no_rope_layer_interval", "attention_chunk_size", "use_qk_norm", "tie_word_embeddings",
    "bos_token_id", "eos_token_id", "pad_token_id", "moe_layers", "hidden_act",
    "attn_temperature_tuning", "floor_scale", "attn_scale", "share_embedding", "layer_sharing",
    "num_layers", "num_heads", "num_kv_heads", "embed_dim", "hidden_dim", "max_seq_len",
    "rope_base", "norm_eps", "dropout", "nope_layers", "rope_traditional", "qk_norm_weight",
    "quantization", "source_format",
]
CONFIG_FORMATS = ["llama", "llama4_text", "mlx", "mlx-4bit", "cheapertraining"]


@st.composite
def field_values(draw, original):
    """A value for a config field: anything JSON, an edge integer, or the original value
    changed a little (the edits most likely to get past a check)."""
    near = []
    if isinstance(original, int) and not isinstance(original, bool):
        near = [original + 1, original - 1, original * 2, -original, original * 10**6]
    elif isinstance(original, list):
        near = [original[:-1], original + original, [str(v) for v in original]]
    elif isinstance(original, dict):
        near = [{k: v for k, v in original.items() if k != key} for key in original]
        near += [{**original, key: "x"} for key in original]
    options = [json_values, edge_ints, st.just(DELETE)]
    if near:
        options.append(st.sampled_from(near))
    return draw(st.one_of(*options))


@given(data=st.data())
def test_config_json(bases, worker, data):
    fmt = data.draw(st.sampled_from(CONFIG_FORMATS), label="format")
    with scratch_copy(bases[fmt]) as root:
        folder = root / bases[fmt].name
        path = folder / "config.json"
        if data.draw(st.integers(0, 9), label="wholesale") == 0:
            path.write_bytes(data.draw(hostile_json_bytes, label="config.json"))
        else:
            config = json.loads(path.read_text())
            for _ in range(data.draw(st.integers(1, 3), label="edits")):
                field = data.draw(st.sampled_from(sorted(set(config) | set(CONFIG_FIELDS))))
                value = data.draw(field_values(config.get(field)), label=field)
                if value is DELETE:
                    config.pop(field, None)
                else:
                    config[field] = value
            path.write_text(json.dumps(config))
        assert_clean(load_reply(worker, folder), "config.json")


# --- safetensors headers and the shard index --------------------------------------------------

@given(data=st.data())
def test_safetensors_header(bases, worker, data):
    fmt = data.draw(st.sampled_from(["llama", "mlx-4bit", "sharded"]), label="format")
    with scratch_copy(bases[fmt]) as root:
        folder = root / bases[fmt].name
        shard = data.draw(st.sampled_from(sorted(folder.glob("*.safetensors"))), label="shard")
        shard.write_bytes(data.draw(damaged_safetensors(shard.read_bytes()), label="damage"))
        assert_clean(load_reply(worker, folder), "safetensors header")


SHARD_NAMES = ["model-00001-of-00003.safetensors", "model.safetensors", "../model.safetensors",
               "/etc/hostname", "model.gguf", "sub/model.safetensors", "", ".", "missing.safetensors",
               "config.json", "model-00001-of-00003.safetensors/"]


@given(data=st.data())
def test_safetensors_index(bases, gguf_model, worker, data):
    with scratch_copy(bases["sharded"]) as root:
        folder = root / "sharded"
        # A real GGUF under a shard's name: MLX's reader must never see it unchecked.
        write_gguf(folder / "model.gguf", gguf_model, lambda name: Q.F32)
        index_path = folder / "model.safetensors.index.json"
        if data.draw(st.integers(0, 4), label="wholesale") == 0:
            index_path.write_bytes(data.draw(hostile_json_bytes, label="index"))
        else:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
            for _ in range(data.draw(st.integers(1, 3), label="edits")):
                key = data.draw(st.sampled_from(sorted(weight_map) + ["extra.weight"]))
                value = data.draw(st.sampled_from(SHARD_NAMES) | json_values, label=key)
                weight_map[key] = value
            if data.draw(st.booleans(), label="damage metadata"):
                index["metadata"] = data.draw(json_values)
            index_path.write_text(json.dumps(index))
        assert_clean(load_reply(worker, folder), "safetensors index")


# --- GGUF headers and metadata ----------------------------------------------------------------

V = gguf.GGUFValueType
GGUF_KEYS = ["general.architecture", "general.alignment", "llama.block_count",
             "llama.context_length", "llama.embedding_length", "llama.feed_forward_length",
             "llama.attention.head_count", "llama.attention.head_count_kv",
             "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon",
             "llama.rope.dimension_count", "llama.vocab_size", "llama.rope.scaling.type",
             "llama.rope.scaling.factor", "tokenizer.ggml.model", "tokenizer.ggml.pre",
             "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
             "tokenizer.ggml.scores", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
             "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
             "tokenizer.chat_template"]
INTEGER_TYPES = {V.UINT8: (0, 2**8 - 1), V.INT8: (-2**7, 2**7 - 1), V.UINT16: (0, 2**16 - 1),
                 V.INT16: (-2**15, 2**15 - 1), V.UINT32: (0, 2**32 - 1),
                 V.INT32: (-2**31, 2**31 - 1), V.UINT64: (0, 2**64 - 1), V.INT64: (-2**63, 2**63 - 1)}


@st.composite
def gguf_values(draw):
    """(value, type, array element type) that the gguf writer can encode."""
    kind = draw(st.sampled_from(list(V)))
    if kind in INTEGER_TYPES:
        low, high = INTEGER_TYPES[kind]
        return draw(st.sampled_from([low, high, 0, 1, 3]) | st.integers(low, high)), kind, None
    if kind in (V.FLOAT32, V.FLOAT64):
        return draw(st.floats(width=32 if kind == V.FLOAT32 else 64)), kind, None
    if kind == V.BOOL:
        return draw(st.booleans()), kind, None
    if kind == V.STRING:
        return draw(st.text(max_size=20)), kind, None
    element = draw(st.sampled_from([V.UINT32, V.INT32, V.FLOAT32, V.STRING, V.UINT8]))
    if element == V.STRING:
        values = st.text(max_size=6)
    elif element == V.FLOAT32:
        values = st.floats(width=32)
    else:
        values = st.integers(*INTEGER_TYPES[element])
    # The gguf package cannot write an empty array.
    items = st.lists(values, min_size=1, max_size=300)
    return draw(items), V.ARRAY, element


def metadata_editor(edits: list):
    def edit(writer) -> None:
        for key, value in edits:
            if value is DELETE:
                writer.kv_data[0].pop(key, None)
            else:
                writer.add_key_value(key, *value)
    return edit


# Offsets of the fixed header fields: magic, version, tensor count, metadata entry count.
GGUF_FIELDS = [(4, "<I"), (8, "<Q"), (16, "<Q")]


@given(data=st.data())
def test_gguf_header_and_metadata(gguf_model, worker, data):
    with scratch_copy() as root:
        edits = [(data.draw(st.sampled_from(GGUF_KEYS), label="key"),
                  data.draw(st.just(DELETE) | gguf_values(), label="value"))
                 for _ in range(data.draw(st.integers(0, 3), label="metadata edits"))]
        matrices = data.draw(st.sampled_from([Q.F32, Q.Q8_0, Q.Q4_0]), label="tensor type")
        path = write_gguf(root / "model.gguf", gguf_model, lambda name: matrices,
                          metadata_editor(edits))
        raw = path.read_bytes()
        damage = data.draw(st.sampled_from(["none", "field", "bytes", "truncate"]), label="damage")
        if damage == "field":
            at, fmt = data.draw(st.sampled_from(GGUF_FIELDS))
            bits = struct.calcsize(fmt) * 8
            value = data.draw(st.sampled_from([n for n in EDGE_INTS if 0 <= n < 2**bits])
                              | st.integers(0, 2**bits - 1))
            raw = raw[:at] + struct.pack(fmt, value) + raw[at + struct.calcsize(fmt):]
        elif damage == "bytes":
            for _ in range(data.draw(st.integers(1, 4))):
                at = data.draw(st.integers(0, min(len(raw), 8192) - 1))
                chunk = data.draw(st.binary(min_size=1, max_size=8))
                raw = raw[:at] + chunk + raw[at + len(chunk):]
        elif damage == "truncate":
            raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
        path.write_bytes(raw)
        assert_clean(load_reply(worker, path), "gguf")

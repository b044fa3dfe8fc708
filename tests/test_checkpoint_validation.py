"""Malformed and hostile checkpoints, through `mlx-mobilellm convert` and `mlx_mobilellm.load`:
every one is refused with one clear line naming the file and the field or tensor — never a
crash of the process, a hang, a traceback, or corruption read as if it were fine.

Each source is a valid tiny checkpoint with one defect made on purpose. Defects that once
crashed the process or made it hang are run in a child process (with a generous timeout),
so that the test run itself survives them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import mlx_mobilellm
from convert.convert import convert
from mlx_mobilellm import CheckpointError
from mlx_mobilellm.cli import main as cli_main
from mlx_mobilellm.models.config import MobileLLMConfig
from test_convert import Q, cheapertraining_source, transformers_model, write_gguf
from test_loading import hf_config, hf_tensors, write_folder

INDEX = "model.safetensors.index.json"
SECOND_SHARD = "model-00002-of-00002.safetensors"


# --- valid tiny checkpoints, and one defect each -------------------------------------------------

def hf_folder(folder: Path, model_type: str = "llama4_text", shards: int = 1, **overrides) -> Path:
    config = hf_config(model_type, **overrides)
    return write_folder(folder, config, hf_tensors(config), shards=shards)


def with_config(edit: Callable[[dict], None], model_type: str = "llama4_text") -> Callable:
    def build(folder: Path) -> Path:
        hf_folder(folder, model_type)
        config = json.loads((folder / "config.json").read_text())
        edit(config)
        (folder / "config.json").write_text(json.dumps(config))
        return folder
    return build


def with_text(file: str, text: str, shards: int = 1) -> Callable:
    """A folder whose `file` (config.json or the shard index) holds `text` instead."""
    def build(folder: Path) -> Path:
        hf_folder(folder, shards=shards)
        (folder / file).write_text(text)
        return folder
    return build


def with_second_shard_as(name: Callable[[Path], str]) -> Callable:
    """A two-shard folder whose index names the second shard `name(folder)` instead, where
    that shard's bytes now lie."""
    def build(folder: Path) -> Path:
        hf_folder(folder, shards=2)
        target = name(folder)
        (folder / SECOND_SHARD).rename(folder / target)
        index = json.loads((folder / INDEX).read_text())
        index["weight_map"] = {tensor: target if shard == SECOND_SHARD else shard
                               for tensor, shard in index["weight_map"].items()}
        (folder / INDEX).write_text(json.dumps(index))
        return folder
    return build


def outside(folder: Path) -> str:
    return str(folder.parent / "outside.safetensors")


def with_header(edit: Callable[[dict], str]) -> Callable:
    """A folder whose model.safetensors header is replaced by edit(header as a dict)."""
    def build(folder: Path) -> Path:
        hf_folder(folder)
        path = folder / "model.safetensors"
        data = path.read_bytes()
        end = 8 + int.from_bytes(data[:8], "little")
        header = edit(json.loads(data[8:end])).encode()
        path.write_bytes(struct.pack("<Q", len(header)) + header + data[end:])
        return folder
    return build


def tensors_of(header: dict) -> list:
    """Tensor names in the order of their data."""
    return sorted((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"])


def listed_twice(header: dict) -> str:
    """The header's JSON with its first tensor listed a second time (json.dumps cannot)."""
    first = tensors_of(header)[0]
    text = json.dumps(header)
    return f'{text[:-1]}, "{first}": {json.dumps(header[first])}}}'


def overlapping(header: dict) -> str:
    """The second of two equal-shaped tensors pointed at the first one's bytes."""
    norms = [n for n in tensors_of(header) if n.endswith("input_layernorm.weight")]
    header[norms[1]]["data_offsets"] = header[norms[0]]["data_offsets"]
    return json.dumps(header)


def with_trailing_bytes(folder: Path) -> Path:
    hf_folder(folder)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes() + bytes(64))
    return folder


def same_tensor_in_both_shards(folder: Path) -> Path:
    hf_folder(folder, shards=2)
    tensors = load_file(str(folder / SECOND_SHARD))
    tensors["model.norm.weight"] = np.full(64, 5, np.float32)
    save_file(tensors, str(folder / SECOND_SHARD))
    return folder


def weights_as_a_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(hf_config()))
    (folder / "model.safetensors").mkdir()
    return folder


def npz_weights(folder: Path) -> Path:
    """Weights saved with numpy beside a valid config.json: mx.load would read them."""
    config = hf_config()
    write_folder(folder, config, {})
    np.savez(folder / "model.npz", **hf_tensors(config))
    return folder / "model.npz"


# GGUF files: written like llama.cpp writes a Llama (test_convert.write_gguf), then edited.

def gguf(edit: Callable[[bytes], bytes]) -> Callable:
    def build(folder: Path) -> Path:
        folder.mkdir(parents=True)
        path = write_gguf(folder / "model.gguf", transformers_model("llama"), lambda name: Q.F32)
        path.write_bytes(edit(path.read_bytes()))
        return path
    return build


def gguf_string(text: str) -> bytes:
    return struct.pack("<Q", len(text)) + text.encode()


def after_name(data: bytes, name: str) -> int:
    """Where what follows a metadata key or tensor name starts."""
    return data.index(gguf_string(name)) + 8 + len(name)


def metadata_u32(key: str, value: int) -> Callable[[bytes], bytes]:
    def edit(data: bytes) -> bytes:
        at = after_name(data, key) + 4  # past the value type
        return data[:at] + struct.pack("<I", value) + data[at + 4:]
    return edit


def extra_metadata(entry: bytes) -> Callable[[bytes], bytes]:
    """One more metadata entry, first in the list."""
    def edit(data: bytes) -> bytes:
        tensors, entries = struct.unpack("<QQ", data[8:24])
        return data[:8] + struct.pack("<QQ", tensors, entries + 1) + entry + data[24:]
    return edit


def nested_arrays(depth: int) -> bytes:
    array_of_one_array = struct.pack("<IQ", 9, 1)
    empty_bytes = struct.pack("<IQ", 0, 0)
    return gguf_string("x.nested") + struct.pack("<I", 9) + array_of_one_array * depth + empty_bytes


def offset_field(data: bytes, tensor: str) -> int:
    """Where a tensor record's data offset is."""
    at = after_name(data, tensor)
    rank = struct.unpack("<I", data[at:at + 4])[0]
    return at + 4 + 8 * rank + 4


def tensor_offset(tensor: str, offset: Callable[[bytes, int], int]) -> Callable[[bytes], bytes]:
    def edit(data: bytes) -> bytes:
        at = offset_field(data, tensor)
        old = struct.unpack("<Q", data[at:at + 8])[0]
        return data[:at] + struct.pack("<Q", offset(data, old)) + data[at + 8:]
    return edit


def offset_of(tensor: str) -> Callable[[bytes, int], int]:
    return lambda data, _: struct.unpack_from("<Q", data, offset_field(data, tensor))[0]


def renamed(old: str, new: str) -> Callable[[bytes], bytes]:
    return lambda data: data.replace(gguf_string(old), gguf_string(new), 1)


# Folders of our own formats.

def mlx_folder(edit: Callable[[dict], None], quantize: bool = False) -> Callable:
    """An MLX model folder converted from a tiny Llama-4 checkpoint, its config.json edited."""
    def build(folder: Path) -> Path:
        source = hf_folder(folder.parent / "hf")
        convert(source, folder, quantize=quantize, q_group_size=32, quiet=True)
        config = json.loads((folder / "config.json").read_text())
        edit(config)
        (folder / "config.json").write_text(json.dumps(config))
        return folder
    return build


def cheapertraining(edit: Callable[[dict], None]) -> Callable:
    def build(folder: Path) -> Path:
        cheapertraining_source(seed_fields_only=True)(folder)
        config = json.loads((folder / "config.json").read_text())
        edit(config)
        (folder / "config.json").write_text(json.dumps(config))
        return folder
    return build


def setting(**values) -> Callable[[dict], None]:
    return lambda config: config.update(values)


# --- the defects: name -> (builder, what the error line must mention) ------------------------

DEEP = "[" * 100_000 + "]" * 100_000

BAD_SOURCES = {
    # The shard index
    "index-shard-outside-the-folder": (with_second_shard_as(lambda f: "../outside.safetensors"),
                                       [INDEX, "../outside.safetensors"]),
    "index-shard-absolute-path": (with_second_shard_as(outside), [INDEX, "outside.safetensors"]),
    "index-is-a-list": (with_text(INDEX, "[1, 2]", shards=2), [INDEX, "array", "object"]),
    "index-nested-deeply": (with_text(INDEX, DEEP, shards=2), [INDEX, "nested too deeply"]),
    "index-weight-map-not-an-object": (with_text(INDEX, '{"weight_map": [1]}', shards=2),
                                       [INDEX, "weight_map"]),
    "single-file-not-safetensors": (npz_weights, ["model.npz", ".safetensors"]),
    # safetensors headers and data
    "safetensors-tensor-listed-twice": (with_header(listed_twice),
                                        ["model.safetensors", "model.embed_tokens.weight", "twice"]),
    "safetensors-tensors-overlap": (with_header(overlapping),
                                    ["model.safetensors", "input_layernorm.weight", "overlaps"]),
    "safetensors-bytes-of-no-tensor": (with_trailing_bytes, ["model.safetensors", "no tensor"]),
    "same-tensor-in-two-shards": (same_tensor_in_both_shards,
                                  ["model.norm.weight", "model-00001-of-00002.safetensors", SECOND_SHARD]),
    "weights-file-is-a-folder": (weights_as_a_folder, ["model.safetensors", "Is a directory"]),
    # config.json of a Hugging Face checkpoint
    "config-is-a-list": (with_text("config.json", "[1, 2, 3]"), ["config.json", "array"]),
    "config-is-null": (with_text("config.json", "null"), ["config.json", "null"]),
    "config-nested-deeply": (with_text("config.json", DEEP), ["config.json", "nested too deeply"]),
    "rope-scaling-not-an-object": (with_config(setting(rope_parameters=None, rope_scaling=[1])),
                                   ["config.json", "'rope_scaling'", "object"]),
    "rope-theta-not-a-number": (with_config(setting(rope_parameters=None, rope_theta="abc")),
                                ["config.json", "'rope_theta'", "'abc'"]),
    "rope-type-unknown": (with_config(setting(rope_parameters={"rope_type": "yarn", "factor": 2.0})),
                          ["config.json", "'rope_scaling'", "'yarn'", "llama3"]),
    "rope-factor-missing": (with_config(setting(rope_parameters={"rope_type": "linear"})),
                            ["config.json", "'rope_scaling'", "'factor'"]),
    "no-rope-layers-too-short": (with_config(setting(no_rope_layers=[1])),
                                 ["config.json", "'no_rope_layers'", "2 layers"]),
    "no-rope-layers-a-string": (with_config(setting(no_rope_layers="11")),
                                ["config.json", "'no_rope_layers'", "'11'"]),
    "layer-types-unknown": (with_config(setting(layer_types=["full_attention", "sliding"])),
                            ["config.json", "'layer_types'", "2 layers"]),
    "layer-types-chunk-a-nope-layer": (
        with_config(setting(no_rope_layers=[1, 0], layer_types=["full_attention", "chunked_attention"])),
        ["config.json", "'layer_types'", "other than the RoPE ones"]),
    "layer-count-a-string": (with_config(setting(num_hidden_layers="2")),
                             ["config.json", "'num_hidden_layers'", "positive integer"]),
    "flag-a-string": (with_config(setting(tie_word_embeddings="no")),
                      ["config.json", "'tie_word_embeddings'", "true or false"]),
    "norm-eps-a-string": (with_config(setting(rms_norm_eps="x")),
                          ["config.json", "'rms_norm_eps'", "number"]),
    "ffn-width-beyond-mlx": (with_config(setting(intermediate_size_mlp=10**12)),
                             ["intermediate_size_mlp", "feed_forward.up_proj.weight", "(160, 64)"]),
    "eos-not-a-token-id": (with_config(setting(eos_token_id="abc")),
                           ["config.json", "'eos_token_id'", "'abc'"]),
    "eos-outside-the-vocabulary": (with_config(setting(eos_token_id=[2, 10**6])),
                                   ["config.json", "'eos_token_id'", "1000000", "vocab_size 256"]),
    # GGUF headers
    "gguf-alignment-zero": (gguf(extra_metadata(gguf_string("general.alignment") + struct.pack("<II", 4, 0))),
                            ["model.gguf", "general.alignment", "power of two"]),
    "gguf-arrays-nested-deeply": (gguf(extra_metadata(nested_arrays(100_000))),
                                  ["model.gguf", "array of arrays"]),
    "gguf-unaligned-tensor": (gguf(tensor_offset("blk.0.attn_norm.weight", lambda _, old: old + 4)),
                              ["model.gguf", "blk.0.attn_norm.weight", "alignment"]),
    "gguf-tensors-overlap": (gguf(tensor_offset("blk.1.attn_norm.weight",
                                                offset_of("blk.0.attn_norm.weight"))),
                             ["model.gguf", "blk.1.attn_norm.weight", "overlaps"]),
    "gguf-tensor-listed-twice": (gguf(renamed("blk.0.attn_k.weight", "blk.0.attn_q.weight")),
                                 ["model.gguf", "blk.0.attn_q.weight", "twice"]),
    # Our own folders
    "mlx-folder-rope-scaling-a-list": (mlx_folder(setting(rope_scaling=[1])),
                                       ["config.json", "rope_scaling", "object"]),
    "mlx-folder-nope-layers-a-string": (mlx_folder(setting(nope_layers="1")),
                                        ["config.json", "nope_layers", "'1'"]),
    "mlx-folder-vocab-beyond-mlx": (mlx_folder(setting(vocab_size=10**12)),
                                    ["vocab_size", "embed_tokens.weight", "(256, 64)"]),
    "mlx-folder-bits-a-string": (mlx_folder(lambda c: c["quantization"].update(bits="4"), quantize=True),
                                 ["config.json", "quantization", "bits '4'"]),
}


def error_line(capsys, argv: list) -> str:
    """Run `mlx-mobilellm ARGV` in this process; its one stderr line, which starts with error:."""
    capsys.readouterr()  # drop what building the source printed
    assert cli_main(argv) == 1
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def refused_by_convert(capsys, source: Path, tmp_path: Path) -> str:
    out_parent = tmp_path / "out"
    out_parent.mkdir()
    line = error_line(capsys, ["convert", "--hf-path", str(source),
                               "--mlx-path", str(out_parent / "mlx"), "--quiet"])
    assert not any(out_parent.iterdir()), "nothing is left behind"
    return line


def refused_by_load(source: Path) -> str:
    with pytest.raises(CheckpointError) as caught:
        mlx_mobilellm.load(source)
    message = str(caught.value)
    assert "\n" not in message, "errors are one line"
    return message


@pytest.mark.parametrize("via", ["convert", "load"])
@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_source_is_one_clear_error(case, via, tmp_path, capsys):
    build, mentions = BAD_SOURCES[case]
    source = build(tmp_path / "src")
    line = refused_by_convert(capsys, source, tmp_path) if via == "convert" else refused_by_load(source)
    for fragment in mentions:
        assert fragment in line, fragment


# --- every config field of the wrong type, named as config.json names it ---------------------

# The sizes were already refused with their names; every other field took any value.
UNCHECKED_BEFORE = [f.name for f in dataclasses.fields(MobileLLMConfig) if f.name not in (
    "num_layers", "num_heads", "num_kv_heads", "embed_dim", "hidden_dim", "vocab_size", "max_seq_len")]


@pytest.mark.parametrize("field", UNCHECKED_BEFORE)
def test_config_field_of_the_wrong_type(field, tmp_path):
    source = cheapertraining(setting(**{field: "x"}))(tmp_path / "src")
    message = refused_by_load(source)
    assert str(source / "config.json") in message
    assert f"MobileLLMConfig.{field} must be " in message and "'x'" in message


@pytest.mark.parametrize("field", ["hidden_size", "num_attention_heads", "max_position_embeddings",
                                   "head_dim", "bos_token_id", "attention_chunk_size"])
def test_hugging_face_field_named_as_the_file_does(field, tmp_path):
    message = refused_by_load(with_config(setting(**{field: "x"}))(tmp_path / "src"))
    assert f"config.json: '{field}' must be " in message


# --- what must keep loading --------------------------------------------------------------------

def test_real_config_spellings_still_load(tmp_path):
    """Spellings of real configs that look odd: LLaMA-1 conversions write pad_token_id -1 for
    "no padding token"; Llama 4 Scout writes a number for attn_temperature_tuning."""
    rope = {"rope_type": "llama3", "rope_theta": 10000, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    model, _ = mlx_mobilellm.load(hf_folder(tmp_path, pad_token_id=-1, eos_token_id=[2, 3],
                                            attn_temperature_tuning=4, rope_parameters=rope))
    assert model.config.pad_token_id is None
    assert model.config.attn_temperature_tuning is True and model.config.rope_scaling["factor"] == 8.0


# --- defects that crashed the process or hung: run in a child process ---------------------

def gguf_shard_with_absurd_header(folder: Path) -> Path:
    """The index names a GGUF file as a shard, one whose header crashes MLX's GGUF reader."""
    with_second_shard_as(lambda _: "model-00002.gguf")(folder)
    crashing = gguf(lambda data: data[:8] + struct.pack("<Q", 2**62) + data[16:])(folder.parent / "gguf")
    shutil.move(crashing, folder / "model-00002.gguf")
    return folder


SUBPROCESS_CASES = {
    # Crashed: SIGSEGV in MLX's GGUF reader (twice), SIGFPE quantizing with group size 0.
    "index-names-a-gguf-shard": (gguf_shard_with_absurd_header, [INDEX, "model-00002.gguf"]),
    # A 32-byte entry, so that the tensor data after it stays aligned and reaches the reader.
    "gguf-float64-metadata": (gguf(extra_metadata(gguf_string("general.abcd") + struct.pack("<Id", 12, 0.5))),
                              ["model.gguf", "general.abcd", "float64"]),
    "mlx-folder-group-size-zero": (mlx_folder(lambda c: c["quantization"].update(group_size=0),
                                              quantize=True),
                                   ["config.json", "group_size 0"]),
    # Hung, building a model of that many layers before comparing it with the weights.
    "hf-a-million-layers": (with_config(setting(num_hidden_layers=10**6), model_type="llama"),
                            ["config.json", "num_hidden_layers is 1000000", "2 layer(s)"]),
    "llama4-a-billion-layers-default-rope-layers": (
        with_config(lambda c: c.update(num_hidden_layers=10**9) or c.pop("no_rope_layers")),
        ["config.json", "num_hidden_layers is 1000000000"]),
    "gguf-a-billion-blocks": (gguf(metadata_u32("llama.block_count", 10**9)),
                              ["model.gguf", "llama.block_count is 1000000000"]),
    "quantized-mlx-folder-a-million-layers": (mlx_folder(setting(num_layers=10**6), quantize=True),
                                              ["num_layers is 1000000"]),
    "cheapertraining-a-million-layers": (cheapertraining(setting(num_layers=10**6)),
                                         ["num_layers is 1000000"]),
}

LOAD_IN_A_CHILD = """
import sys, mlx_mobilellm
try:
    mlx_mobilellm.load(sys.argv[1])
except mlx_mobilellm.CheckpointError as error:
    sys.exit(f"error: {error}")
"""


@pytest.mark.parametrize("via", ["convert", "load"])
@pytest.mark.parametrize("case", list(SUBPROCESS_CASES))
def test_bad_source_neither_crashes_nor_hangs(case, via, tmp_path):
    build, mentions = SUBPROCESS_CASES[case]
    source = build(tmp_path / "src")
    out = tmp_path / "out" / "mlx"
    command = ([shutil.which("mlx-mobilellm"), "convert", "--hf-path", str(source), "--mlx-path", str(out)]
               if via == "convert" else [sys.executable, "-c", LOAD_IN_A_CHILD, str(source)])
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in mentions:
        assert fragment in lines[0], fragment
    assert not out.parent.exists() or not any(out.parent.iterdir())


# --- what the operating system says is said as it says it -------------------------------------

def test_unreadable_weights_say_permission_denied(tmp_path, capsys, monkeypatch):
    """What the OS says, not "truncated or corrupt". Simulated: as root (CI) chmod stops no read."""
    source = hf_folder(tmp_path / "src")
    weights = source / "model.safetensors"
    opened = Path.open

    def denied(path, *args, **kwargs):
        if path == weights:
            raise PermissionError(13, os.strerror(13), str(path))
        return opened(path, *args, **kwargs)

    monkeypatch.setattr(Path, "open", denied)
    line = refused_by_convert(capsys, source, tmp_path)
    assert "model.safetensors" in line and "Permission denied" in line
    assert "corrupt" not in line


@pytest.mark.parametrize("out", ["--hf-path", "--gguf-path"])
def test_export_refuses_a_folder_missing_a_tensor(tmp_path, capsys, out):
    """export reads the folder without building the model: it must still check that every
    tensor is there, rather than write a checkpoint short of one."""
    source = hf_folder(tmp_path / "hf", "llama")
    mlx = convert(source, tmp_path / "mlx", quiet=True)
    tensors = load_file(str(mlx / "model.safetensors"))
    del tensors["decoder.layers.1.ffn_norm.weight"]
    save_file(tensors, str(mlx / "model.safetensors"))
    capsys.readouterr()
    target = tmp_path / ("out.gguf" if out == "--gguf-path" else "out")
    assert cli_main(["export", "--model", str(mlx), out, str(target), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "missing tensor(s) decoder.layers.1.ffn_norm.weight" in err
    assert not target.exists()


def test_a_packed_weight_stored_as_float_is_refused(tmp_path):
    """Found by the fuzz tests: a quantized folder whose packed (uint32) weight was stored as
    float32 of the same shape loaded, then failed inside the quantized matmul."""
    source = hf_folder(tmp_path / "hf", "llama")
    folder = convert(source, tmp_path / "mlx", quantize=True, q_group_size=32, quiet=True)
    tensors = load_file(str(folder / "model.safetensors"))
    name = "decoder.layers.1.ffn.down_proj.weight"
    tensors[name] = tensors[name].view(np.float32)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "mlx"})
    with pytest.raises(CheckpointError, match=f"tensor '{name}' has dtype float32 but must have "
                                              "uint32"):
        mlx_mobilellm.load(folder)

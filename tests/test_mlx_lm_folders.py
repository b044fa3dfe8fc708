"""Folders of mlx-lm (what `mlx_lm.convert` writes, and so all of mlx-community), in and out,
checked against the installed mlx-lm itself.

In: tiny Hugging Face Llama / Llama 4 models, written by mlx_lm.convert (float, quantized, with
per-layer overrides), must give through mlx_mobilellm.load (and `mlx-mobilellm convert`) the
logits mlx_lm.load gives for the same folder. Quantized folders hold the same packed weights
for both, so they are held to the float tolerance too (measured: 0.0 difference, float32).
Out: our folders, float and quantized, written with `export --mlx-lm-path`, must give in
mlx_lm.load the logits ours give. Bad input ends in one clear line.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import mlx_mobilellm
from mlx_mobilellm.cli import main as cli_main
from mlx_mobilellm.errors import CheckpointError

from test_convert import IDS, TOL, max_diff, our_logits, save_hf, transformers_model



def hf_folder(folder: Path, arch: str, tied: bool) -> Path:
    # Written as transformers 4.x writes configs: mlx-lm's llama4_text needs a top-level
    # rope_theta, which transformers 5 no longer writes.
    return save_hf(transformers_model(arch, tie_word_embeddings=tied), folder, transformers4=True)


def mlx_lm_convert(source: Path, out: Path, **options) -> Path:
    mlx_lm.convert(str(source), str(out), **options)
    return out


def mlx_lm_logits(folder: Path) -> np.ndarray:
    model, _ = mlx_lm.load(str(folder))
    inputs = mx.array(IDS)
    if model.model_type == "llama4_text" and model.tie_word_embeddings:
        # mlx-lm's llama4_text multiplies by the embedding's raw weight, which a quantized
        # embedding does not have; as_linear is what that product means for either kind.
        logits = model.model.embed_tokens.as_linear(model.model(inputs))
    else:
        logits = model(inputs)
    return np.array(logits.astype(mx.float32))


def ours(path) -> np.ndarray:
    return our_logits(mlx_mobilellm.load(path)[0])


def cli(*argv) -> None:
    assert cli_main([*argv, "--quiet"]) == 0


QUANTIZED = dict(quantize=True, q_bits=4, q_group_size=32)


# --- in ------------------------------------------------------------------------------------

# mlx-lm's llama4_text cannot convert an untied head (it names it `output`): export's round
# trip below covers that name.
@pytest.mark.parametrize("arch, tied", [("llama4", True), ("llama", True), ("llama", False)])
@pytest.mark.parametrize("quantize", [False, True])
def test_mlx_lm_folder_loads_with_mlx_lm_logits(arch, tied, quantize, tmp_path):
    source = hf_folder(tmp_path / "hf", arch, tied)
    folder = mlx_lm_convert(source, tmp_path / "mlx-lm", **(QUANTIZED if quantize else {}))
    assert max_diff(ours(folder), mlx_lm_logits(folder)) <= TOL
    model, tokenizer = mlx_mobilellm.load(folder)
    assert tokenizer is not None
    assert bool(model.config.tie_word_embeddings) == tied


def test_per_layer_overrides(tmp_path):
    """A mixed folder: some layers at 8 bits / group 64, one left in float."""
    def predicate(path, module):
        if path.endswith("layers.0.mlp.down_proj"):
            return False
        if "v_proj" in path or path.endswith("lm_head"):
            return {"group_size": 64, "bits": 8, "mode": "affine"}
        return True

    source = hf_folder(tmp_path / "hf", "llama", tied=False)
    folder = mlx_lm_convert(source, tmp_path / "mlx-lm", quant_predicate=predicate, **QUANTIZED)
    block = json.loads((folder / "config.json").read_text())["quantization"]
    assert block["model.layers.1.self_attn.v_proj"]["bits"] == 8
    assert max_diff(ours(folder), mlx_lm_logits(folder)) <= TOL
    model, _ = mlx_mobilellm.load(folder)
    assert not hasattr(model.decoder.layers[0].ffn.down_proj, "scales")
    assert model.decoder.layers[1].attention.v_proj.bits == 8


@pytest.mark.parametrize("arch", ["llama4", "llama"])
def test_convert_reads_an_mlx_lm_folder(arch, tmp_path):
    """`mlx-mobilellm convert` keeps the packed weights, records the Hugging Face format and
    the quantization block under our names."""
    source = hf_folder(tmp_path / "hf", arch, tied=True)
    folder = mlx_lm_convert(source, tmp_path / "mlx-lm", **QUANTIZED)
    cli("convert", "--hf-path", str(folder), "--mlx-path", str(tmp_path / "ours"))
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["source_format"] == ("llama4_text" if arch == "llama4" else "llama")
    assert config["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    assert max_diff(ours(tmp_path / "ours"), mlx_lm_logits(folder)) <= TOL


# --- out -----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,tied", [("llama4", True), ("llama4", False), ("llama", True),
                                       ("llama", False)])
@pytest.mark.parametrize("quantize", [False, True])
def test_export_mlx_lm_path_loads_in_mlx_lm(arch, tied, quantize, tmp_path):
    source = hf_folder(tmp_path / "hf", arch, tied)
    argv = ["convert", "--hf-path", str(source), "--mlx-path", str(tmp_path / "ours")]
    cli(*argv, *(["-q", "--q-bits", "4", "--q-group-size", "32"] if quantize else []))
    out = tmp_path / "for-mlx-lm"
    cli("export", "--model", str(tmp_path / "ours"), "--mlx-lm-path", str(out))
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == ("llama4_text" if arch == "llama4" else "llama")
    assert ("quantization" in config) == quantize
    assert (out / "tokenizer.json").exists()
    expected = ours(tmp_path / "ours")
    assert max_diff(mlx_lm_logits(out), expected) <= TOL
    assert max_diff(ours(out), expected) <= TOL  # and it reads back as an mlx-lm folder


def test_export_from_gguf_layout_restores_rotate_half_rows(tmp_path):
    """A llama model held in interleaved layout (as a GGUF gives it) goes out in Llama's."""
    source = hf_folder(tmp_path / "hf", "llama", tied=True)
    cli("convert", "--hf-path", str(source), "--mlx-path", str(tmp_path / "ours"))
    original = ours(tmp_path / "ours")
    config_path = tmp_path / "ours" / "config.json"
    config = json.loads(config_path.read_text())
    weights = load_file(tmp_path / "ours" / "model.safetensors")
    head = config["head_dim"]
    for name, array in weights.items():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            rows = array.reshape(-1, 2, head // 2, array.shape[-1])
            weights[name] = np.ascontiguousarray(rows.swapaxes(1, 2)).reshape(array.shape)
    save_file(weights, tmp_path / "ours" / "model.safetensors", metadata={"format": "mlx"})
    config_path.write_text(json.dumps({**config, "rope_traditional": True}))
    expected = ours(tmp_path / "ours")
    assert max_diff(expected, original) <= TOL  # the same model, in the other layout
    cli("export", "--model", str(tmp_path / "ours"), "--mlx-lm-path", str(tmp_path / "out"))
    assert max_diff(mlx_lm_logits(tmp_path / "out"), expected) <= TOL


# --- bad input -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quantized_folder(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("quantized")
    return mlx_lm_convert(hf_folder(tmp / "hf", "llama", tied=True), tmp / "mlx-lm", **QUANTIZED)


def broken_copy(folder: Path, tmp_path: Path, config=None, drop=None) -> Path:
    out = tmp_path / "broken"
    out.mkdir()
    for file in folder.iterdir():
        (out / file.name).write_bytes(file.read_bytes())
    if config is not None:
        path = out / "config.json"
        path.write_text(json.dumps(config(json.loads(path.read_text()))))
    if drop is not None:
        weights = load_file(out / "model.safetensors")
        del weights[drop]
        save_file(weights, out / "model.safetensors", metadata={"format": "mlx"})
        (out / "model.safetensors.index.json").unlink()
    return out


def with_block(block: dict):
    def edit(config):
        config["quantization"] = config["quantization_config"] = {**config["quantization"], **block}
        return config
    return edit


def gptq(config):
    del config["quantization"]
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    return config


BAD = {
    "unsupported-mode": (dict(config=with_block({"mode": "mxfp4"})),
                         ["config.json", "mode 'mxfp4' is not supported"]),
    "missing-scales": (dict(drop="model.layers.1.self_attn.k_proj.scales"),
                       ["model.layers.1.self_attn.k_proj.scales' is missing"]),
    "foreign-quantizer": (dict(config=gptq), ["quant_method 'gptq' is not supported"]),
    "override-of-no-layer": (dict(config=with_block({"model.layers.9.mlp.nope": {"bits": 8}})),
                             ["quantization.model.layers.9.mlp.nope names no layer"]),
    "false-but-quantized": (dict(config=with_block({"model.layers.0.mlp.up_proj": False})),
                            ["quantization.model.layers.0.mlp.up_proj is false"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_mlx_lm_folder_is_one_clear_line(case, quantized_folder, tmp_path, capsys):
    edit, expected = BAD[case]
    folder = broken_copy(quantized_folder, tmp_path, **edit)
    with pytest.raises(CheckpointError) as error:
        mlx_mobilellm.load(folder)
    for part in expected:
        assert part in str(error.value)
    capsys.readouterr()
    assert cli_main(["convert", "--hf-path", str(folder), "--mlx-path", str(tmp_path / "out")]) != 0
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected[0] in lines[0]
    assert not (tmp_path / "out").exists()


def test_export_refuses_what_mlx_lm_computes_otherwise(tmp_path):
    source = hf_folder(tmp_path / "hf", "llama4", tied=True)
    config_path = source / "config.json"
    config = json.loads(config_path.read_text())
    config["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="RoPE scaling 'llama3', which it ignores"):
        from convert.mlx_lm_export import export_mlx_lm

        export_mlx_lm(source, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()

"""Bad input to `mlx-mobilellm convert`: one line on stderr, starting "error:" and naming the
file / tensor / field; a non-zero exit status; no traceback; and nothing left behind (no
temporary folder beside the destination, an existing destination untouched).

Each bad source is a valid tiny checkpoint (see test_convert) with one defect made on purpose.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Callable

import mlx.core as mx
import pytest
import torch
from safetensors.numpy import load_file, save_file

from convert.convert import convert
from mlx_mobilellm import CheckpointError
from mlx_mobilellm.cli import main as cli_main
from test_convert import Q, cheapertraining_source, save_hf, transformers_model, write_gguf


# --- bad sources: each builder writes one under `folder` and returns (path, extra CLI flags) -----

def hf_folder(folder: Path, arch: str = "llama", **overrides) -> Path:
    return save_hf(transformers_model(arch, **overrides), folder)


def with_tensors(edit: Callable[[dict], None], arch: str = "llama") -> Callable:
    def build(folder: Path):
        hf_folder(folder, arch)
        tensors = load_file(str(folder / "model.safetensors"))
        edit(tensors)
        save_file(tensors, str(folder / "model.safetensors"))
        return folder, []
    return build


def with_config(edit: Callable[[dict], None], arch: str = "llama") -> Callable:
    def build(folder: Path):
        hf_folder(folder, arch)
        config = json.loads((folder / "config.json").read_text())
        edit(config)
        (folder / "config.json").write_text(json.dumps(config))
        return folder, []
    return build


def with_bytes(edit: Callable[[bytes], bytes], file: str = "model.safetensors",
               gguf: bool = False) -> Callable:
    def build(folder: Path):
        if gguf:
            folder.mkdir(parents=True)
            write_gguf(folder / file, transformers_model("llama"), lambda name: Q.F32)
        else:
            hf_folder(folder)
        path = folder / file
        path.write_bytes(edit(path.read_bytes()))
        return (path if gguf else folder), []
    return build


def truncated(data: bytes) -> bytes:
    return data[: len(data) - 5000]


def corrupt_header(data: bytes) -> bytes:
    return data[:8] + b"\x00garbage" * 4 + data[40:]


def header_count(field: int, value: int) -> Callable[[bytes], bytes]:
    """A GGUF whose header claims `value` tensors (field 0) or metadata entries (field 1)."""
    offset = 8 + 8 * field
    return lambda data: data[:offset] + struct.pack("<Q", value) + data[offset + 8:]


def pickled(name: str, folder_only: bool = False) -> Callable:
    """A PyTorch pickle (state dict saved with torch.save) instead of safetensors."""
    def build(folder: Path):
        hf = transformers_model("llama")
        save_hf(hf, folder)
        (folder / "model.safetensors").unlink()
        torch.save(hf.state_dict(), folder / name)
        return (folder if folder_only else folder / name), []
    return build


def copy_tensor(source: str, name: str) -> Callable[[dict], None]:
    """An edit adding tensor `name`, a copy of `source`."""
    return lambda tensors: tensors.update({name: tensors[source]})


def cheapertraining_without(field: str) -> Callable:
    def build(folder: Path):
        cheapertraining_source(seed_fields_only=True)(folder)
        config = json.loads((folder / "config.json").read_text())
        del config[field]
        (folder / "config.json").write_text(json.dumps(config))
        return folder, []
    return build


def quantized_gguf(folder: Path):
    folder.mkdir(parents=True)
    return write_gguf(folder / "model.gguf", transformers_model("llama"), lambda name: Q.Q8_0), ["-q"]


# name: (builder, what the error line must mention)
BAD_SOURCES = {
    "truncated-safetensors": (with_bytes(truncated), ["model.safetensors", "truncated"]),
    "corrupt-safetensors": (with_bytes(corrupt_header), ["model.safetensors", "corrupt"]),
    "truncated-gguf": (with_bytes(truncated, "model.gguf", gguf=True), ["model.gguf", "truncated"]),
    "gguf-header-only": (with_bytes(lambda data: data[:100], "model.gguf", gguf=True),
                         ["model.gguf", "truncated"]),
    # Counts a file of this size could hold: the header check lets them through to the parser.
    "gguf-too-many-tensors": (with_bytes(header_count(0, 1000), "model.gguf", gguf=True),
                              ["model.gguf", "corrupt"]),
    "gguf-too-many-metadata-entries": (with_bytes(header_count(1, 1000), "model.gguf", gguf=True),
                                       ["model.gguf", "corrupt"]),
    "missing-tensor": (with_tensors(lambda t: t.pop("model.layers.1.mlp.down_proj.weight")),
                       ["missing", "model.layers.1.mlp.down_proj.weight"]),
    "unexpected-tensor": (
        with_tensors(copy_tensor("model.norm.weight", "model.layers.0.mlp.extra.weight")),
        ["unexpected", "model.layers.0.mlp.extra.weight", "model.safetensors"]),
    # A name the Llama table maps, of a layer the 2-layer config does not have.
    "tensor-of-a-layer-the-config-lacks": (
        with_tensors(copy_tensor("model.layers.0.mlp.up_proj.weight",
                                 "model.layers.2.mlp.up_proj.weight")),
        ["unexpected", "model.layers.2.mlp.up_proj.weight"]),
    "shape-does-not-match-config": (with_config(lambda c: c.update(intermediate_size=192)),
                                    ["intermediate_size = 192", "mlp.up_proj", "(160, 64)",
                                     "config"]),
    "unknown-model-type": (with_config(lambda c: c.update(model_type="gpt2")),
                           ["config.json", "'gpt2'", "llama4_text", "llama", "mobilellm"]),
    "config-missing-required-field": (with_config(lambda c: c.pop("hidden_size")),
                                      ["config.json", "hidden_size"]),
    "cheapertraining-config-missing-field": (cheapertraining_without("hidden_dim"),
                                             ["config.json", "hidden_dim"]),
    "llama4-mixture-of-experts": (with_config(lambda c: c.update(moe_layers=[1]), arch="llama4"),
                                  ["config.json", "mixture-of-experts"]),
    "pytorch-bin-file": (pickled("pytorch_model.bin"), ["pytorch_model.bin", "safetensors"]),
    "pytorch-pt-file": (pickled("model.pt"), ["model.pt", "safetensors"]),
    "folder-with-only-pytorch-bin": (pickled("pytorch_model.bin", folder_only=True),
                                     ["pytorch_model.bin", "safetensors"]),
    "quantize-an-already-quantized-gguf": (quantized_gguf, ["model.gguf", "already quantized"]),
}


def files_under(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


def error_line(capsys, argv: list) -> str:
    """Run `mlx-mobilellm convert ARGV`; its single stderr line, which must start with error:."""
    capsys.readouterr()  # drop what building the source printed
    assert cli_main(["convert", *argv]) != 0
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert captured.out == ""
    return lines[0]


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_source(case, tmp_path, capsys):
    build, mentions = BAD_SOURCES[case]
    source, flags = build(tmp_path / "src")
    out_parent = tmp_path / "out"
    out_parent.mkdir()
    line = error_line(capsys, ["--hf-path", str(source), "--mlx-path", str(out_parent / "mlx"), *flags])
    for fragment in mentions:
        assert fragment in line
    assert not any(out_parent.iterdir()), "nothing is left behind"


def test_existing_destination_needs_force(tmp_path, capsys):
    source = hf_folder(tmp_path / "src")
    out = tmp_path / "out" / "mlx"
    out.mkdir(parents=True)
    (out / "mine.txt").write_text("keep me")
    before = files_under(out.parent)
    line = error_line(capsys, ["--hf-path", str(source), "--mlx-path", str(out)])
    assert str(out) in line and "--force" in line
    assert files_under(out.parent) == before


@pytest.mark.parametrize("flag, value", [("--q-bits", "5"), ("--q-group-size", "48"),
                                         ("--dtype", "float64")])
def test_bad_flag_value_is_one_error_line(tmp_path, capsys, flag, value):
    source = tmp_path / "src"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        cli_main(["convert", "--hf-path", str(source), "--mlx-path", str(tmp_path / "out"), "-q",
                  flag, value])
    assert exited.value.code == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert f"argument {flag}: invalid choice: " in lines[0] and value in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("counts", ["tensors", "metadata-entries"])
def test_absurd_gguf_header_counts_do_not_crash_the_process(tmp_path, counts):
    """mx.load crashes the process (SIGSEGV) on these: the header is checked before it. Run
    as a separate process, which must exit with status 1, not die of a signal."""
    build = with_bytes(header_count(["tensors", "metadata-entries"].index(counts), 2**62),
                       "model.gguf", gguf=True)
    source, _ = build(tmp_path / "src")
    out = tmp_path / "out" / "mlx"
    result = subprocess.run([shutil.which("mlx-mobilellm"), "convert", "--hf-path", str(source),
                             "--mlx-path", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "model.gguf" in lines[0]
    assert str(2**62) in lines[0]
    assert not out.parent.exists() or not any(out.parent.iterdir())


@pytest.mark.parametrize("replacing", [False, True], ids=["new", "force-over-existing"])
def test_write_failing_midway_leaves_nothing_behind(tmp_path, monkeypatch, replacing):
    """The disk fills while the second shard is written: the temporary folder goes, and the
    destination is as before (absent, or the old folder when --force was replacing it)."""
    source = hf_folder(tmp_path / "src")
    out = tmp_path / "out" / "mlx"
    out.parent.mkdir()
    if replacing:
        convert(source, out, quiet=True)  # the previous conversion
    before = files_under(out.parent)
    save = mx.save_safetensors
    calls = []

    def failing_save(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return save(path, *args, **kwargs)

    monkeypatch.setattr(mx, "save_safetensors", failing_save)
    with pytest.raises(CheckpointError) as caught:
        convert(source, out, force=replacing, quiet=True, max_shard_bytes=50_000)
    assert len(calls) == 2
    assert "No space left on device" in str(caught.value) and "\n" not in str(caught.value)
    assert files_under(out.parent) == before


def test_names_from_a_file_cannot_break_the_error_line(tmp_path, capsys):
    """A tensor name is the file's to choose: a newline or a terminal escape in it is shown
    escaped, so the error stays one line and cannot drive the terminal."""
    source = with_tensors(copy_tensor("model.norm.weight", "model.layers.0.mlp.x\n\x1b[31m.weight"))
    folder, _ = source(tmp_path / "src")
    line = error_line(capsys, ["--hf-path", str(folder), "--mlx-path", str(tmp_path / "out")])
    assert "x\\n\\x1b[31m.weight" in line

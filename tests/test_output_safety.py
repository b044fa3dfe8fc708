"""Writing outputs safely (`convert --mlx-path`, `export --hf-path / --gguf-path`, `fuse
--save-path / --export-hf`): --force replaces only what this tool wrote, never the current
directory, an input or a folder holding one; refusals are one `error:` line and change nothing;
temporaries of killed runs are cleaned by the next run, live ones kept; written folders and
files follow the umask; a failing disk names the user's path and leaves the old output as it was.

All through the real command line (mlx_mobilellm.cli.main in this process), on copies of tiny
inputs made once per module.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from convert import writer
from convert.convert import convert
from mlx_mobilellm.cli import main as cli_main
from mlx_mobilellm.loading import load
from mlx_mobilellm.lora import apply_adapters, save_adapters
from test_convert import save_hf, transformers_model
from test_convert_errors import files_under

ADAPTERS = {"fine_tune_type": "lora", "rank": 2, "scale": 1.0, "dropout": 0.0,
            "keys": ["q_proj"], "num_layers": 1}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """hf/ (a transformers folder), mlx/ (converted from it), adapters/ (for mlx)."""
    root = tmp_path_factory.mktemp("pristine")
    save_hf(transformers_model("llama"), root / "hf")
    convert(root / "hf", root / "mlx", quiet=True)
    model, _ = load(root / "mlx")
    apply_adapters(model, ADAPTERS)
    save_adapters(root / "adapters", model, {**ADAPTERS, "model": str(root / "mlx")})
    return root


@pytest.fixture
def inputs(pristine, tmp_path) -> Path:
    """A fresh copy of the inputs under tmp_path/inputs (a test may lose them)."""
    shutil.copytree(pristine, tmp_path / "inputs")
    return tmp_path / "inputs"


def command(kind: str, inputs: Path, out, *extra) -> list:
    """The argv writing `out` with --force: convert, export-hf, export-gguf, fuse (--save-path)
    or fuse-hf (--export-hf, beside a fresh --save-path)."""
    argv = {
        "convert": ["convert", "--hf-path", inputs / "hf", "--mlx-path", out],
        "export-hf": ["export", "--model", inputs / "mlx", "--hf-path", out],
        "export-gguf": ["export", "--model", inputs / "mlx", "--gguf-path", out],
        "fuse": ["fuse", "--model", inputs / "mlx", "--adapter-path", inputs / "adapters",
                 "--save-path", out],
        "fuse-hf": ["fuse", "--model", inputs / "mlx", "--adapter-path", inputs / "adapters",
                    "--save-path", inputs.parent / "fused", "--export-hf", out],
    }[kind]
    return [str(a) for a in argv + ["--force", "--quiet", *extra]]


COMMANDS = ["convert", "export-hf", "export-gguf", "fuse", "fuse-hf"]
FOLDER_COMMANDS = ["convert", "export-hf", "fuse", "fuse-hf"]


def refused(capsys, argv: list) -> str:
    """The one error line of a command that must fail."""
    capsys.readouterr()
    assert cli_main(argv) == 1
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def succeeds(capsys, argv: list) -> None:
    status = cli_main(argv)
    assert status == 0, capsys.readouterr().err


def unrelated_files(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("my notes")
    (folder / "thesis").mkdir(exist_ok=True)
    (folder / "thesis" / "chapter1.tex").write_text("keep me")


def hidden_temporaries(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# --- the current directory and the folders above it -------------------------------------------

@pytest.mark.parametrize("out", [".", "./", ".."])
@pytest.mark.parametrize("kind", COMMANDS)
def test_force_never_replaces_the_current_directory_or_above(kind, out, inputs, tmp_path,
                                                             monkeypatch, capsys):
    """The reported data loss: `--mlx-path . --force` emptied the current directory."""
    cwd = tmp_path / "home" / "work"
    unrelated_files(cwd.parent)
    unrelated_files(cwd)
    monkeypatch.chdir(cwd)
    before = files_under(tmp_path / "home")
    line = refused(capsys, command(kind, inputs, out))
    relation = "holds" if out == ".." else "is"
    assert line == (f"error: {Path(out)}: {relation} the current directory, which --force never "
                    "replaces; choose another path")
    assert files_under(tmp_path / "home") == before
    assert not (tmp_path / "fused").exists()


def test_the_reported_command_in_a_real_process(pristine, tmp_path):
    """`cd dir_with_files && mlx-mobilellm convert --hf-path ../src --mlx-path . --force`."""
    shutil.copytree(pristine / "hf", tmp_path / "src")
    unrelated_files(tmp_path / "dir_with_files")
    before = files_under(tmp_path)
    argv = ["convert", "--hf-path", "../src", "--mlx-path", ".", "--force"]
    result = subprocess.run([sys.executable, "-m", "mlx_mobilellm.cli", *argv],
                            cwd=tmp_path / "dir_with_files", capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        "error: .: is the current directory, which --force never replaces; choose another path"]
    assert files_under(tmp_path) == before


def test_the_refusal_comes_before_reading_the_source(tmp_path, monkeypatch, capsys):
    unrelated_files(tmp_path / "work")
    monkeypatch.chdir(tmp_path / "work")
    line = refused(capsys, ["convert", "--hf-path", str(tmp_path / "missing"), "--mlx-path", ".",
                            "--force"])
    assert "is the current directory" in line


# --- inputs -----------------------------------------------------------------------------------

INPUT_CASES = {
    # command, the path given as its output (relative to the inputs folder)
    "convert-into-its-source": ("convert", "hf"),
    "convert-into-the-parent-of-its-source": ("convert", "."),
    "export-hf-into-its-model": ("export-hf", "mlx"),
    "export-hf-into-the-parent-of-its-model": ("export-hf", "."),
    "fuse-into-its-base-model": ("fuse", "mlx"),
    "fuse-into-its-adapters": ("fuse", "adapters"),
    "fuse-into-the-parent-of-its-adapters": ("fuse", "."),
    "fuse-export-hf-into-its-base-model": ("fuse-hf", "mlx"),
}


@pytest.mark.parametrize("case", list(INPUT_CASES))
def test_force_never_replaces_an_input_or_a_folder_holding_one(case, inputs, tmp_path, capsys):
    kind, out = INPUT_CASES[case]
    unrelated_files(inputs)
    before = files_under(tmp_path)
    line = refused(capsys, command(kind, inputs, inputs / out))
    assert line.startswith(f"error: {inputs / out}: ")
    assert re.search(r": (is|holds) the input .*, which --force never replaces; choose another "
                     r"path$", line), line
    assert files_under(tmp_path) == before


def test_export_gguf_never_replaces_its_gguf_source(inputs, tmp_path, capsys):
    gguf = inputs / "model.gguf"
    succeeds(capsys, command("export-gguf", inputs, gguf))
    before = files_under(tmp_path)
    line = refused(capsys, ["export", "--model", str(gguf), "--gguf-path", str(gguf), "--force"])
    assert line.startswith(f"error: {gguf}: is the input ")
    assert files_under(tmp_path) == before


def test_a_new_folder_inside_an_input_is_fine(inputs, capsys):
    """Only replacing loses an input: writing a new folder inside one is allowed."""
    succeeds(capsys, command("convert", inputs, inputs / "hf" / "mlx"))
    assert (inputs / "hf" / "mlx" / "config.json").is_file()


def test_fuse_refuses_overlapping_outputs_before_fusing(inputs, tmp_path, capsys):
    hf = str(tmp_path / "fused")
    line = refused(capsys, command("fuse", inputs, tmp_path / "fused", "--export-hf", hf))
    assert "--export-hf" in line and "--save-path" in line and "neither inside the other" in line
    line = refused(capsys, command("fuse", inputs, tmp_path / "fused" / "mlx", "--export-hf", hf))
    assert "neither inside the other" in line
    assert not (tmp_path / "fused").exists()


# --- existing destinations ----------------------------------------------------------------------

def with_notes(folder: Path) -> str:
    (folder / "notes.txt").write_text("mine")
    return "holds 'notes.txt'"


def with_subfolder(folder: Path) -> str:
    (folder / "images").mkdir()
    return "holds 'images/'"


def transformers_files(folder: Path) -> str:
    """A Hugging Face folder saved by transformers: our file names, but not written by us."""
    save_hf(transformers_model("llama"), folder)
    return "is not marked as written by mlx-mobilellm"


NOT_OURS = {"unrelated-file": with_notes, "a-subfolder": with_subfolder,
            "a-transformers-folder": transformers_files}


@pytest.mark.parametrize("kind", FOLDER_COMMANDS)
@pytest.mark.parametrize("content", list(NOT_OURS))
def test_force_refuses_a_folder_this_tool_did_not_write(kind, content, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    succeeds(capsys, command(kind, inputs, out))  # ours, until something else is put in it
    if content == "a-transformers-folder":
        shutil.rmtree(out)
        out.mkdir()
    what = NOT_OURS[content](out)
    before = files_under(tmp_path)
    line = refused(capsys, command(kind, inputs, out))
    assert line.startswith(f"error: {out}: {what}")
    assert line.endswith("remove it yourself or choose another path")
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("kind", FOLDER_COMMANDS)
def test_force_refuses_a_file_where_a_folder_goes(kind, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("a file")
    line = refused(capsys, command(kind, inputs, out))
    assert line == f"error: {out}: is a file, not a folder; choose another path"
    assert out.read_text() == "a file"


@pytest.mark.parametrize("existing", ["not-gguf", "folder"])
def test_export_gguf_force_replaces_only_a_gguf_file(existing, inputs, tmp_path, capsys):
    out = tmp_path / "out.gguf"
    if existing == "folder":
        unrelated_files(out)
    else:
        out.write_text("my notes, named .gguf by mistake")
    before = files_under(tmp_path)
    line = refused(capsys, command("export-gguf", inputs, out))
    expected = ("is a folder; give the path of the .gguf file to write" if existing == "folder"
                else "is not a GGUF file; --force replaces only GGUF files: remove it yourself "
                     "or choose another path")
    assert line == f"error: {out}: {expected}"
    assert files_under(tmp_path) == before


def producers(folder: Path) -> set:
    found = set()
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), framework="numpy") as file:
            found.add(file.metadata().get("producer"))
    return found


@pytest.mark.parametrize("kind", COMMANDS)
def test_force_replaces_what_this_tool_wrote(kind, inputs, tmp_path, capsys):
    """Written twice with --force (and over an empty folder): every shard we write carries the
    producer mark that lets --force recognise the folder, also Hugging Face exports."""
    out = tmp_path / ("out.gguf" if kind == "export-gguf" else "out")
    if kind != "export-gguf":
        out.mkdir()  # empty: replaceable
    for _ in range(2):
        succeeds(capsys, command(kind, inputs, out))
    if kind == "export-gguf":
        assert out.read_bytes()[:4] == b"GGUF"
    else:
        assert (out / "config.json").is_file()
        assert producers(out) == {"mlx-mobilellm"}
    assert hidden_temporaries(tmp_path) == []


def test_force_replaces_an_mlx_folder_of_an_earlier_version(inputs, tmp_path, capsys):
    """Earlier versions wrote no producer mark; config.json's model_type says it is ours."""
    out = tmp_path / "out"
    succeeds(capsys, command("convert", inputs, out))
    shard = out / "model.safetensors"
    save_file(load_file(str(shard)), str(shard), metadata={"format": "mlx"})
    assert producers(out) == {None}
    succeeds(capsys, command("convert", inputs, out))
    assert producers(out) == {"mlx-mobilellm"}


# --- temporaries of killed runs -----------------------------------------------------------------

def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def temporary_folder(path: Path) -> Path:
    path.mkdir()
    (path / "shard-0.safetensors").write_bytes(b"\0" * 1000)
    return path


@pytest.mark.parametrize("kind", ["convert", "export-gguf"])
def test_a_dead_runs_temporaries_are_removed_and_a_live_runs_kept(kind, inputs, tmp_path, capsys):
    name = "out.gguf" if kind == "export-gguf" else "out"
    dead, live = dead_pid(), os.getppid()  # pytest's parent: alive, and another process
    day_ago = time.time() - 2 * 24 * 3600
    stale = [temporary_folder(tmp_path / f".{name}.{dead}.0123abcd.tmp"),
             tmp_path / f".{name}.{dead}.4567cdef.tmp",  # a file: a GGUF being written
             temporary_folder(tmp_path / f".{name}.k3j_x9a1.tmp")]  # tempfile.mkdtemp's, old
    stale[1].write_bytes(b"GGUF")
    os.utime(stale[2], (day_ago, day_ago))
    kept = [temporary_folder(tmp_path / f".{name}.{live}.89abcdef.tmp"),
            temporary_folder(tmp_path / f".{name}.u5b2nq0z.tmp"),  # an earlier version's, fresh
            temporary_folder(tmp_path / f".other.{dead}.0123abcd.tmp"),  # beside another output
            tmp_path / f".{name}.my-notes.tmp"]  # not a name we give
    kept[-1].write_text("mine")
    succeeds(capsys, command(kind, inputs, tmp_path / name))
    assert hidden_temporaries(tmp_path) == sorted(p.name for p in kept)


def test_the_temporary_is_named_with_the_pid_of_its_run(inputs, tmp_path, monkeypatch, capsys):
    seen = []
    save = writer.mx.save_safetensors

    def recording_save(path, *args, **kwargs):
        seen.append(Path(path).parent.name)
        return save(path, *args, **kwargs)

    monkeypatch.setattr(writer.mx, "save_safetensors", recording_save)
    succeeds(capsys, command("convert", inputs, tmp_path / "out"))
    assert re.fullmatch(rf"\.out\.{os.getpid()}\.[0-9a-f]{{8}}\.tmp", seen[0]), seen


# --- modes ------------------------------------------------------------------------------------

@pytest.fixture(params=[0o022, 0o077], ids=["umask-022", "umask-077"])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


@pytest.mark.parametrize("kind", COMMANDS)
def test_written_folders_and_files_follow_the_umask(kind, umask, inputs, tmp_path, capsys):
    out = tmp_path / ("out.gguf" if kind == "export-gguf" else "out")
    succeeds(capsys, command(kind, inputs, out))
    written = [out, *out.rglob("*")]
    if kind == "fuse-hf":
        written += [tmp_path / "fused", *(tmp_path / "fused").rglob("*")]
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in written}
    expected = {name: oct((0o777 if (tmp_path / name).is_dir() else 0o666) & ~umask)
                for name in modes}
    assert modes == expected


# --- a failing disk -----------------------------------------------------------------------------

@pytest.mark.parametrize("replacing", [False, True], ids=["new", "force-over-existing"])
@pytest.mark.parametrize("kind", ["convert", "export-hf", "fuse"])
def test_a_read_only_parent_is_one_line_naming_the_destination(kind, replacing, inputs, tmp_path,
                                                               monkeypatch, capsys):
    """Simulated: the tests may run as root, for whom chmod 0o555 stops no write."""
    out = tmp_path / "out"
    if replacing:
        succeeds(capsys, command(kind, inputs, out))
    before = files_under(tmp_path)
    mkdir = os.mkdir

    def read_only_mkdir(path, *args, **kwargs):
        if Path(path).parent == tmp_path:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only_mkdir)
    line = refused(capsys, command(kind, inputs, out))
    assert line == f"error: {out}: {os.strerror(errno.EROFS)}"
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("replacing", [False, True], ids=["new", "force-over-existing"])
def test_a_full_disk_midway_names_the_destination_and_leaves_the_old_one(replacing, inputs,
                                                                         tmp_path, monkeypatch,
                                                                         capsys):
    """A failed write says only "No space left on device": the line names the destination."""
    out = tmp_path / "out"
    if replacing:
        succeeds(capsys, command("convert", inputs, out))
    before = files_under(tmp_path)

    def full_disk(path, value):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(writer, "write_json", full_disk)
    line = refused(capsys, command("convert", inputs, out))
    assert line == f"error: {out}: {os.strerror(errno.ENOSPC)}"
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("kind", ["convert", "export-gguf"])
def test_a_failed_write_removes_the_folders_it_made_on_the_way(kind, inputs, tmp_path,
                                                               monkeypatch, capsys):
    out = tmp_path / "new" / "deep" / ("out.gguf" if kind == "export-gguf" else "out")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "mine.txt").write_text("the user's")
    before = files_under(tmp_path)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if kind == "convert":
        monkeypatch.setattr(writer, "write_json", full_disk)
    else:
        monkeypatch.setattr("gguf.GGUFWriter.write_tensor_data", full_disk)
    line = refused(capsys, command(kind, inputs, out))
    assert line.endswith(os.strerror(errno.ENOSPC))
    assert files_under(tmp_path) == before  # new/ was there already: it stays, deep/ goes

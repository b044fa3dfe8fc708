"""Fuzzing the command line: every subcommand with generated values for its flags (numbers at
the edges, text, paths such as `.` and `..`), run in the worker process from a scratch working
folder (see fuzz_support). Each run exits 0, or 1 with one `error:` line; nothing outside the
outputs it names is created or removed, and no temporary is left."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from convert.convert import convert
from fuzz_support import (EDGE_INTS, assert_clean_exit, assert_nothing_left, edge_floats, listing,
                          scratch_copy, short_text)
from generation_helpers import write_bpe_folder
from mlx_mobilellm import load
from mlx_mobilellm.lora import apply_adapters, save_adapters
from test_convert import save_hf, transformers_model


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fuzz-cli")
    hf = save_hf(transformers_model("llama", vocab_size=320), root / "hf")
    write_bpe_folder(hf)
    model_folder = convert(hf, root / "model", quiet=True)
    model, _ = load(model_folder)
    adapter_config = {"fine_tune_type": "lora", "rank": 4, "scale": 10.0, "dropout": 0.0,
                      "keys": ["q_proj", "v_proj"], "num_layers": 2, "model": str(model_folder)}
    apply_adapters(model, adapter_config)
    save_adapters(root / "adapters", model, adapter_config)
    data = root / "data"
    data.mkdir()
    for split, count in (("train", 4), ("valid", 2), ("test", 2)):
        (data / f"{split}.jsonl").write_text("".join(
            json.dumps({"prompt": f"question {i}", "completion": "an answer"}) + "\n"
            for i in range(count)))
    text = root / "text"
    text.mkdir()
    (text / "a.txt").write_text("question and an answer, " * 40)
    (root / "tiny.json").write_text(json.dumps({"num_layers": 1, "num_heads": 2,
                                                "num_kv_heads": 1, "embed_dim": 16,
                                                "hidden_dim": 32, "max_seq_len": 64}))
    return {"hf": hf, "model": model_folder, "adapters": root / "adapters", "data": data,
            "text": text, "tiny": root / "tiny.json"}


# Paths that stay inside the scratch folder whatever they resolve to: the working folder is
# work/here, so `..` is work and `../..` the scratch root itself.
PATHS = [".", "./", "..", "../", "../..", "out", "out/", "../out", "new/deep/out", "", "-",
         "here", "../here", "in put", "out.gguf", "model"]
flag_values = st.one_of(
    st.sampled_from(EDGE_INTS).map(str), edge_floats.map(str), st.sampled_from(PATHS),
    short_text.filter(lambda s: "\x00" not in s),
)

# Each command's minimal working invocation ({name}: a folder of `bases`), and the flags to fuzz.
COMMANDS = {
    "generate": (["--model", "{model}", "--prompt", "hi", "--max-tokens", "2"],
                 ["--model", "--prompt", "--max-tokens", "--temp", "--top-p", "--top-k", "--min-p",
                  "--repetition-penalty", "--repetition-context-size", "--seed", "--stop",
                  "--max-kv-size", "--system", "--dtype", "--adapter-path", "--draft-model",
                  "--num-draft-tokens"]),
    "chat": (["--model", "{model}", "--max-tokens", "2"],
             ["--max-tokens", "--temp", "--top-p", "--seed", "--max-kv-size", "--system",
              "--num-draft-tokens", "--draft-model"]),
    "convert": (["--hf-path", "{hf}", "--mlx-path", "out", "--quiet"],
                ["--hf-path", "--mlx-path", "--source-format", "--dtype", "--q-bits",
                 "--q-group-size", "-q", "--force"]),
    "export": (["--model", "{model}", "--hf-path", "out", "--quiet"],
               ["--model", "--hf-path", "--gguf-path", "--gguf-type", "--mlx-lm-path", "--format",
                "--model-type", "--dtype", "--force"]),
    "lora": (["--model", "{model}", "--train", "--data", "{data}", "--iters", "1", "--batch-size",
              "1", "--adapter-path", "adapters", "--quiet"],
             ["--data", "--iters", "--batch-size", "--num-layers", "--lora-rank", "--lora-scale",
              "--lora-dropout", "--lora-keys", "--max-seq-length", "--learning-rate",
              "--optimizer", "--lr-schedule", "--warmup", "--grad-accumulation-steps",
              "--grad-clip", "--seed", "--steps-per-report", "--steps-per-eval", "--val-batches",
              "--save-every", "--adapter-path", "--resume", "--test", "--test-batches",
              "--fine-tune-type", "--mask-prompt", "--grad-checkpoint", "--dtype", "--config"]),
    "train": (["--config", "{tiny}", "--tokenizer", "{hf}", "--data", "{text}", "--output",
               "pretrained", "--seq-length", "8", "--batch-size", "2", "--iters", "1", "--quiet"],
              ["--config", "--tokenizer", "--data", "--output", "--seq-length", "--val-fraction",
               "--batch-size", "--iters", "--learning-rate", "--min-lr", "--optimizer",
               "--weight-decay", "--lr-schedule", "--warmup", "--grad-accumulation-steps",
               "--grad-clip", "--grad-checkpoint", "--seed", "--steps-per-report",
               "--steps-per-eval", "--val-batches", "--save-every", "--resume"]),
    "fuse": (["--model", "{model}", "--adapter-path", "{adapters}", "--save-path", "out", "--quiet"],
             ["--model", "--adapter-path", "--save-path", "--export-hf", "--dequantize",
              "--force"]),
}
# Values each flag takes in normal use, so that the runs that should work get exercised too.
PLAUSIBLE = {
    "--max-tokens": "3", "--temp": "0.7", "--top-p": "0.9", "--top-k": "5", "--min-p": "0.05",
    "--repetition-penalty": "1.1", "--repetition-context-size": "8", "--seed": "7",
    "--stop": "e", "--max-kv-size": "64", "--system": "Be brief.", "--dtype": "float16",
    "--num-draft-tokens": "2", "--draft-model": "{model}", "--adapter-path": "{adapters}",
    "--source-format": "llama", "--q-bits": "8", "--q-group-size": "32", "--format": "gguf",
    "--gguf-path": "out.gguf", "--gguf-type": "q8_0", "--mlx-lm-path": "out-mlx-lm",
    "--model-type": "llama", "--iters": "2", "--batch-size": "2",
    "--num-layers": "1", "--lora-rank": "2", "--lora-scale": "5", "--lora-dropout": "0.1",
    "--lora-keys": "q_proj", "--max-seq-length": "16", "--learning-rate": "1e-4",
    "--optimizer": "sgd", "--lr-schedule": "cosine", "--warmup": "1",
    "--grad-accumulation-steps": "2", "--grad-clip": "1.0", "--steps-per-report": "1",
    "--steps-per-eval": "1", "--val-batches": "1", "--save-every": "1", "--test-batches": "1",
    "--fine-tune-type": "dora", "--export-hf": "out-hf", "--mlx-path": "out2",
    "--hf-path": "out-hf", "--save-path": "out2", "--model": "{model}", "--data": "{data}",
    "--prompt": "tell me", "--config": "missing.yaml", "--tokenizer": "{hf}",
    "--output": "out", "--seq-length": "16", "--val-fraction": "0.1", "--min-lr": "1e-5",
}
# Flags whose large values are real work rather than bad input: their fuzzed values stay small.
_SMALL_COUNTS = st.sampled_from(["-1", "0", "1", "3", "x", "2.5", "1e3"])
SMALL = {"--iters": _SMALL_COUNTS, "--grad-accumulation-steps": _SMALL_COUNTS}
SWITCHES = {"-q", "--force", "--train", "--resume", "--test", "--mask-prompt",
            "--grad-checkpoint", "--dequantize"}


@st.composite
def invocations(draw, command: str, bases: dict) -> list:
    base, flags = COMMANDS[command]
    argv = [command, *base]
    for flag in draw(st.lists(st.sampled_from(flags), min_size=1, max_size=3, unique=True)):
        argv.append(flag)
        if flag not in SWITCHES:
            values = SMALL.get(flag, flag_values)
            if flag in PLAUSIBLE:
                values = st.just(PLAUSIBLE[flag]) | values
            argv.append(draw(values, label=flag))
    placeholders = {f"{{{name}}}": str(path) for name, path in bases.items()}
    return [placeholders.get(arg, arg) for arg in argv]


USER_FILES = {"work/here/notes.txt": "the user's own file", "work/keep.txt": "another",
              "untouched.txt": "and one more"}


def outputs_named(argv: list, cwd: Path, root: Path) -> set:
    """The scratch-relative paths an invocation may write: every argument that names one,
    except the working folder, its parents and the user's files, which nothing may replace.
    (lora's --adapter-path and train's --output are the exception: they write their files
    into the folder they name, which may be any, and replace none.)"""
    root, cwd = root.resolve(), cwd.resolve()
    into = {"lora": "--adapter-path", "train": "--output"}.get(argv[0])
    folders = {value for flag, value in zip(argv, argv[1:]) if flag == into}
    named = set()
    for value in argv:
        path = (cwd / value).resolve()
        writes_into = value in folders
        if value and path.is_relative_to(root) and (writes_into or not cwd.is_relative_to(path)):
            named.add("" if path == root else str(path.relative_to(root)))
    return named - set(USER_FILES)


@pytest.mark.parametrize("command", list(COMMANDS))
@given(data=st.data())
def test_command_line(bases, worker, command, data):
    with scratch_copy() as root:
        cwd = root / "work" / "here"
        cwd.mkdir(parents=True)
        for name, text in USER_FILES.items():
            (root / name).write_text(text)
        argv = data.draw(invocations(command, bases), label="argv")
        before = listing(root)
        reply = worker.run(op="cli", argv=argv, cwd=str(cwd), stdin="hello\n/exit\n")
        assert_clean_exit(reply, command)
        after = listing(root)
        allowed = outputs_named(argv, cwd, root)
        assert_nothing_left(before, after, allowed)
        removed = {p for p in before - after if not any(p == a or p.startswith(a + "/")
                                                        for a in allowed)}
        assert not removed, f"removed: {sorted(removed)}"
        assert {name: (root / name).read_text() for name in USER_FILES} == USER_FILES
        hidden = [p for p in after if os.path.basename(p).startswith(".") and p.endswith(".tmp")]
        assert not hidden, f"temporaries left: {hidden}"

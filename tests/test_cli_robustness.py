"""`generate`, `chat` and `lora` against careless and hostile input: flag values out of range,
prompts that are not UTF-8, closed standard input, draft models of another vocabulary, token
ids outside the model's, corrupt checkpoints, adapter configs, config files and training data.
Each is one `error:` line naming the flag / file / field, exit status 1, no traceback, no crash
and nothing written. Cases that crashed the process (SIGSEGV) run in a subprocess."""

from __future__ import annotations

import io
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from convert.save import save_model
from generation_helpers import CHAT_TEMPLATE, tiny_model
from mlx_mobilellm import CheckpointError, load, stream_generate
from mlx_mobilellm.cache import load_prompt_cache, save_prompt_cache
from mlx_mobilellm.generate import PromptCache
from test_cli_generate import STATS, cli, messages, one_error_line, tiny_folder  # noqa: F401 (fixture)
from test_cli_lora import FAST, data, write_jsonl  # noqa: F401 (fixture)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
CHAT_BANNER = "chat: /reset starts over, /exit (or Ctrl-D) quits, Ctrl-C stops an answer\n"


def refused(capsys, *argv) -> str:
    """The one error line of a CLI run that must fail with status 1 and print nothing else."""
    status, out, err = cli(capsys, *argv)
    assert status == 1, (out, err)
    return one_error_line(err)


def cli_process(*argv, stdin=None, shell_redirect: str = "", timeout: float = 120):
    """The CLI as a separate process (a crash kills only it). shell_redirect, e.g. "<&-",
    applies to the process's standard input."""
    command = shlex.join([sys.executable, "-m", "mlx_mobilellm.cli", *map(str, argv)])
    return subprocess.run(f"exec {command} {shell_redirect}", shell=True, input=stdin,
                          capture_output=True, timeout=timeout)


def process_error_line(result) -> str:
    assert result.returncode == 1, (result.returncode, result.stderr)
    return one_error_line(result.stderr.decode())


def files_under(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def copy_model(source: Path, folder: Path) -> Path:
    shutil.copytree(source, folder)
    return folder


# --- generate and chat: flag values -------------------------------------------------------

@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("flags, message", [
    (["--top-p", "0"], r"top_p must be in (0.0, 1.0], got 0.0"),
    (["--repetition-penalty", "nan"], "repetition_penalty must be a positive number, got nan"),
    (["--repetition-penalty", "-1"], "repetition_penalty must be a positive number, got -1.0"),
    (["--repetition-context-size", "0"], "repetition_context_size must be at least 1, got 0"),
    (["--seed", "-1"], "seed must be a whole number in [0, 2**64), got -1"),
    (["--seed", str(2**64)], f"seed must be a whole number in [0, 2**64), got {2**64}"),
    (["--num-draft-tokens", str(10**6)], "--num-draft-tokens must be in [1, 32], got 1000000"),
    # Found by the fuzz tests: chat started, then refused every turn.
    (["--draft-model", "some-model", "--max-kv-size", "64"],
     "--draft-model needs an unbounded KV cache"),
], ids=["top-p", "penalty-nan", "penalty-negative", "context-size", "seed-negative", "seed-2**64",
        "num-draft-tokens", "draft-with-bounded-cache"])
def test_flag_values_out_of_range(capsys, monkeypatch, tiny_folder, command, flags, message):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    prompt = ["--prompt", "hi"] if command == "generate" else []
    assert message in refused(capsys, command, "--model", tiny_folder, *prompt, *flags)


# --- draft models and token ids: once crashes of the process -------------------------------

@pytest.fixture(scope="module")
def drafts(tiny_folder, tmp_path_factory) -> dict:
    """Draft models that do not fit tiny_folder: a larger vocabulary (the model's tokenizer
    files), and the same model with another tokenizer (two token ids swapped)."""
    root = tmp_path_factory.mktemp("drafts")
    config = json.loads((tiny_folder / "config.json").read_text())
    larger = save_model(tiny_model(5000, max_seq_len=config["max_seq_len"]), root / "larger",
                        None, quiet=True)
    for name in TOKENIZER_FILES:
        shutil.copy(tiny_folder / name, larger / name)
    other = copy_model(tiny_folder, root / "other-tokenizer")
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    _, tok = load(tiny_folder)
    ids = tok.encode("Hello world! 1234", add_special_tokens=False)
    first, second = list(dict.fromkeys(ids))[:2]
    names = {i: t for t, i in vocab.items()}
    vocab[names[first]], vocab[names[second]] = second, first
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    return {"larger": larger, "other": other}


def test_draft_model_with_a_larger_vocabulary(tiny_folder, drafts):
    result = cli_process("generate", "--model", tiny_folder, "--prompt", "hi", "-m", 20,
                         "--draft-model", drafts["larger"], "--temp", 1, "--seed", 3)
    line = process_error_line(result)
    assert f"--draft-model {drafts['larger']}" in line
    assert "vocabulary of 5000 tokens and the model one of 320" in line
    assert result.stdout == b""


def test_draft_model_with_another_tokenizer(capsys, tiny_folder, drafts):
    line = refused(capsys, "generate", "--model", tiny_folder, "--prompt", "hi",
                   "--draft-model", drafts["other"])
    assert f"--draft-model {drafts['other']}: its tokenizer is not the one of --model" in line


TOKEN_ID_SCRIPT = """
import sys
from mlx_mobilellm import batch_generate, generate, load, stream_generate

model, tokenizer = load(sys.argv[1])
calls = {"stream_generate": lambda ids: list(stream_generate(model, tokenizer, ids, 2)),
         "generate": lambda ids: generate(model, tokenizer, ids, 2),
         "batch_generate": lambda ids: batch_generate(model, tokenizer, [[1, 2], ids], 2)}
for bad in (-1, model.config.vocab_size, 10**9):
    for name, call in calls.items():
        try:
            call([1, bad])
            print(name, bad, "accepted", flush=True)
        except ValueError as error:
            print(name, bad, error, flush=True)
"""


def test_token_ids_outside_the_vocabulary_are_refused(tiny_folder):
    """The embedding does not check its indices: 10**9 crashed the process (SIGSEGV)."""
    result = subprocess.run([sys.executable, "-c", TOKEN_ID_SCRIPT, str(tiny_folder)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 9
    for line, bad in zip(lines, [b for b in (-1, 320, 10**9) for _ in range(3)]):
        assert line.endswith(f" {bad} the prompt holds token id {bad}, outside the model's "
                             "vocabulary [0, 320)"), line


def test_library_refuses_bad_text_and_seeds(tiny_folder):
    model, tokenizer = load(tiny_folder)
    with pytest.raises(CheckpointError, match=r"the prompt is not UTF-8 text: a lone surrogate "
                       r"U\+D800 at character 2"):
        list(stream_generate(model, tokenizer, "hi\ud800", 2))
    with pytest.raises(ValueError, match=r"seed must be a whole number in \[0, 2\*\*64\), got -1"):
        list(stream_generate(model, tokenizer, "hi", 2, seed=-1))


# --- prompts that are not UTF-8, standard input closed or unreadable ---------------------

@pytest.mark.parametrize("flag", ["--prompt", "--system"])
def test_argument_that_is_not_utf8(capsys, tiny_folder, flag):
    # How Python hands over `--prompt $'\xff'`: the byte as a lone surrogate.
    values = {"--prompt": "hi", flag: "ab\udcff"}
    line = refused(capsys, "generate", "--model", tiny_folder,
                   *[part for flag_and_value in values.items() for part in flag_and_value])
    assert line == (f"error: {flag} is not UTF-8 text: the byte 0xff at character 2; "
                    "re-encode it as UTF-8")


@pytest.mark.parametrize("errors, message", [
    ("surrogateescape", "--prompt - (standard input) is not UTF-8 text: the byte 0xff at character 3"),
    ("strict", "--prompt -: standard input is not UTF-8 text (invalid start byte at byte 3)"),
], ids=["c-locale", "utf8-locale"])
def test_prompt_on_stdin_that_is_not_utf8(capsys, monkeypatch, tiny_folder, errors, message):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"hi \xff there"),
                                                       encoding="utf-8", errors=errors))
    assert message in refused(capsys, "generate", "--model", tiny_folder, "--prompt", "-")


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_closed_stdin(capsys, monkeypatch, tiny_folder, command):
    monkeypatch.setattr(sys, "stdin", None)  # what Python makes of a closed descriptor 0
    prompt = ["--prompt", "-"] if command == "generate" else []
    line = refused(capsys, command, "--model", tiny_folder, *prompt)
    assert "reads standard input, which is closed" in line


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("redirect, message", [
    ("<&-", "reads standard input, which is closed"),
    ("0>{tmp}/written", "cannot read standard input (Bad file descriptor)"),
], ids=["closed", "write-only"])
def test_stdin_closed_or_unreadable_in_a_process(tiny_folder, tmp_path, command, redirect, message):
    prompt = ["--prompt", "-"] if command == "generate" else []
    result = cli_process(command, "--model", tiny_folder, *prompt,
                         shell_redirect=redirect.format(tmp=shlex.quote(str(tmp_path))))
    assert result.returncode == 1, result.stderr
    # A chat reads its first line after saying how to use it.
    err = result.stderr.decode().replace(CHAT_BANNER, "")
    assert message in one_error_line(err)


def test_a_closed_stdin_does_not_break_loading(tiny_folder):
    """MLX's loaders fail on a file that gets descriptor 0, which the first file opened does
    when standard input is closed: the command must load and generate all the same."""
    result = cli_process("generate", "--model", tiny_folder, "--prompt", "hi", "--max-tokens", 2,
                         shell_redirect="<&-")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


# --- chat: a turn that fails ends the turn, not the session ---------------------------------

REFUSING_TEMPLATE = ("{% if messages[-1]['content'] == 'refuse' %}"
                     "{{ raise_exception('no refusals here') }}{% endif %}" + CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def refusing_folder(tiny_folder, tmp_path_factory) -> Path:
    """tiny_folder with a chat template that refuses a user message 'refuse'."""
    folder = copy_model(tiny_folder, tmp_path_factory.mktemp("refusing") / "model")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = REFUSING_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("bad_line, message", [
    ("refuse", "error: the chat template refused the conversation: no refusals here"),
    ("x\udcff", "error: the line is not UTF-8 text: the byte 0xff at character 1; re-encode it "
                "as UTF-8; it was skipped"),
], ids=["template-refuses", "not-utf8"])
def test_chat_keeps_the_session_after_a_failed_turn(capsys, monkeypatch, refusing_folder,
                                                   bad_line, message):
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{bad_line}\nhi\n/exit\n"))
    status, out, err = cli(capsys, "chat", "--model", refusing_folder, "--max-tokens", 3)
    assert status == 0 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [message]
    # The next turn is answered, and the failed one is not in its history.
    _, tokenizer = load(refusing_folder)
    assert [int(p) for p, _ in STATS.findall(err)] == \
        [len(tokenizer.apply_chat_template(messages("hi")))]


# --- adapter folders and adapter_config.json ------------------------------------------------

@pytest.fixture(scope="module")
def checkpointed(tiny_folder, data, tmp_path_factory) -> Path:
    """An adapter folder after a 2-step run with a checkpoint at each step."""
    adapters = tmp_path_factory.mktemp("checkpointed") / "adapters"
    status = _cli_status("lora", "--model", tiny_folder, "--train", "--data", data, "--iters", 2,
                         "--save-every", 1, "--adapter-path", adapters, *FAST)
    assert status == 0
    return adapters


def _cli_status(*argv) -> int:
    from mlx_mobilellm.cli import main

    return main([str(a) for a in argv])


@pytest.mark.parametrize("argv", [
    ["generate", "--prompt", "hi"],
    ["lora", "--test", "--data", "{data}"],
    ["lora", "--train", "--resume", "--data", "{data}"],
], ids=["generate", "lora-test", "lora-resume"])
def test_adapter_path_that_is_a_file(capsys, tiny_folder, data, tmp_path, argv):
    file = tmp_path / "adapters"
    file.write_text("not a folder")
    argv = [str(a).format(data=data) for a in argv]
    line = refused(capsys, *argv, "--model", tiny_folder, "--adapter-path", file)
    assert f"{file}: is a file" in line
    assert file.read_text() == "not a folder"


@pytest.mark.parametrize("field, value, message", [
    ("scale", "abc", "'scale' must be a finite number, got 'abc'"),
    ("scale", 1e308 * 10, "'scale' must be a finite number, got inf"),
    ("rank", "4", "'rank' must be a whole number >= 1, got '4'"),
    ("rank", 10**9, "'rank' 1000000000 is above 16, the width of the narrowest adapted layer"),
    ("dropout", 2, "'dropout' must be a number in [0, 1), got 2"),
    ("fine_tune_type", "qlora", "'fine_tune_type' must be one of lora, dora, full, got 'qlora'"),
    ("fine_tune_type", "full", "'fine_tune_type' is full: a fully fine-tuned model is a model "
                               "folder, not adapters"),
    ("keys", 5, "'keys' must be a list of layer names, got 5"),
    ("num_layers", 0, "'num_layers' must be a whole number >= 1, got 0"),
], ids=["scale-text", "scale-inf", "rank-text", "rank-huge", "dropout", "type", "type-full", "keys",
        "layers"])
def test_bad_adapter_config_field_names_file_and_field(capsys, tiny_folder, checkpointed,
                                                       tmp_path, field, value, message):
    adapters = copy_model(checkpointed, tmp_path / "adapters")
    config = json.loads((adapters / "adapter_config.json").read_text())
    config[field] = value
    (adapters / "adapter_config.json").write_text(json.dumps(config))
    line = refused(capsys, "generate", "--model", tiny_folder, "--adapter-path", adapters,
                   "--prompt", "hi")
    assert line.startswith(f"error: {adapters / 'adapter_config.json'}: {message}"), line



def test_an_adapter_scale_beyond_64_bits_still_runs(capsys, tiny_folder, checkpointed, tmp_path):
    """Found by the fuzz tests: JSON's 2**63 as the scale made MLX's multiply raise
    std::bad_cast mid-generation. A finite number is a scale; it is applied as a float."""
    adapters = copy_model(checkpointed, tmp_path / "adapters")
    config = json.loads((adapters / "adapter_config.json").read_text())
    config["scale"] = 2**63
    (adapters / "adapter_config.json").write_text(json.dumps(config))
    status = _cli_status("generate", "--model", tiny_folder, "--adapter-path", adapters,
                         "--prompt", "hi", "--max-tokens", 2)
    assert status == 0, capsys.readouterr().err

# --- lora --resume from a corrupt checkpoint ---------------------------------------------------

def _write(name: str, content) -> callable:
    def damage(checkpoint: Path):
        path = checkpoint / name
        if isinstance(content, dict):  # tensors
            mx.save_safetensors(str(path), content)
        else:
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return damage


def _remove(name: str):
    return lambda checkpoint: (checkpoint / name).unlink()


def _truncate(name: str):
    return lambda checkpoint: (checkpoint / name).write_bytes((checkpoint / name).read_bytes()[:20])


def _reshape(name: str):
    def damage(checkpoint: Path):
        tensors = mx.load(str(checkpoint / name))
        mx.save_safetensors(str(checkpoint / name), {k: mx.zeros((3, 3)) for k in tensors})
    return damage


CHECKPOINT_FILES = ("adapters.safetensors", "optimizer.safetensors", "trainer_state.json",
                    "adapter_config.json")
DAMAGES = {
    **{f"missing-{name}": (name, _remove(name), "not found" if name.endswith("json")
                           else "cannot load: no such file") for name in CHECKPOINT_FILES},
    **{f"truncated-{name}": (name, _truncate(name), "not valid JSON" if name.endswith("json")
                             else "the file is truncated or corrupt") for name in CHECKPOINT_FILES},
    "state-not-json": ("trainer_state.json", _write("trainer_state.json", "step 2"), "not valid JSON"),
    "state-deep": ("trainer_state.json", _write("trainer_state.json", "[" * 100_000),
                   "JSON nested too deeply to read"),
    "state-list": ("trainer_state.json", _write("trainer_state.json", "[2]"), "holds a JSON array"),
    "state-no-step": ("trainer_state.json", _write("trainer_state.json", "{}"),
                      "'step' must be a whole number >= 0, got None"),
    "state-step-text": ("trainer_state.json", _write("trainer_state.json", '{"step": "2"}'),
                        "'step' must be a whole number >= 0, got '2'"),
    "state-step-negative": ("trainer_state.json", _write("trainer_state.json", '{"step": -1}'),
                            "'step' must be a whole number >= 0, got -1"),
    "state-window": ("trainer_state.json", _write("trainer_state.json",
                                                  '{"step": 2, "window_loss": "x"}'),
                     "'window_loss' must be a finite number"),
    "state-beyond-iters": ("trainer_state.json", _write("trainer_state.json", '{"step": 10}'),
                           "the checkpoint is at step 10, beyond --iters (4); resume with --iters "
                           "of at least 10"),
    "config-list": ("adapter_config.json", _write("adapter_config.json", "[1]"), "holds a JSON array"),
    "adapters-names": ("adapters.safetensors", _write("adapters.safetensors", {"x": mx.zeros((2,))}),
                       "does not match the adapters of this run"),
    "adapters-shapes": ("adapters.safetensors", _reshape("adapters.safetensors"),
                        "does not match the adapters of this run"),
    "optimizer-names": ("optimizer.safetensors", _write("optimizer.safetensors", {"x": mx.zeros((2,))}),
                        "does not match this run's optimizer state"),
    "optimizer-shapes": ("optimizer.safetensors", _reshape("optimizer.safetensors"),
                         "does not match this run's optimizer state"),
}


@pytest.mark.parametrize("name, damage, message", DAMAGES.values(), ids=DAMAGES.keys())
def test_corrupt_checkpoint_is_one_line_naming_the_file(capsys, tiny_folder, data, checkpointed,
                                                        tmp_path, name, damage, message):
    adapters = copy_model(checkpointed, tmp_path / "adapters")
    damage(adapters / "checkpoint")
    before = files_under(adapters)
    line = refused(capsys, "lora", "--model", tiny_folder, "--train", "--resume", "--data", data,
                   "--iters", 4, "--save-every", 1, "--adapter-path", adapters, *FAST)
    assert line.startswith(f"error: {adapters / 'checkpoint' / name}: ") and message in line, line
    assert files_under(adapters) == before


def test_corrupt_metrics_file_on_resume(capsys, tiny_folder, data, checkpointed, tmp_path):
    adapters = copy_model(checkpointed, tmp_path / "adapters")
    with (adapters / "metrics.jsonl").open("a") as f:
        f.write('{"train_loss": 1.0\n')
    line = refused(capsys, "lora", "--model", tiny_folder, "--train", "--resume", "--data", data,
                   "--iters", 4, "--adapter-path", adapters, *FAST)
    assert f"{adapters / 'metrics.jsonl'}:" in line and "not a metrics record" in line


# --- lora: flag values, config files, training data -----------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--seed", "-1"], "seed must be a whole number in [0, 2**64), got -1"),
    (["--seed", str(2**64)], f"seed must be a whole number in [0, 2**64), got {2**64}"),
    (["--lora-scale", "nan"], "--lora-scale must be a finite number, got nan"),
    (["--learning-rate", "inf"], "--learning-rate must be positive and finite, got inf"),
    (["--weight-decay", "-1"], "--weight-decay must be >= 0, got -1.0"),
    # Found by the fuzz tests: MLX's schedule raised std::bad_cast on a step past 64 bits.
    (["--warmup", str(2**63)], f"--warmup must be at most 2**63 - 1, got {2**63}"),
    # Found by the fuzz tests: "" is the current directory, which got the adapter files.
    (["--adapter-path", ""], "--adapter-path is empty"),
], ids=["seed-negative", "seed-2**64", "scale", "learning-rate", "weight-decay", "warmup-2**63",
        "adapter-path-empty"])
def test_lora_flag_values_out_of_range(capsys, tiny_folder, data, tmp_path, flags, message):
    line = refused(capsys, "lora", "--model", tiny_folder, "--train", "--data", data,
                   "--adapter-path", tmp_path / "adapters", "--iters", 1, *FAST, *flags)
    assert message in line
    assert not (tmp_path / "adapters").exists()


def test_lora_seed_whose_step_seeds_pass_2_to_the_64(capsys, tiny_folder, data, tmp_path):
    """The trainer seeds each step with seed * 100_003 + step: wrapped into MLX's 64 bits."""
    status, _, err = cli(capsys, "lora", "--model", tiny_folder, "--train", "--data", data,
                         "--adapter-path", tmp_path / "adapters", "--iters", 1, *FAST,
                         "--seed", 2**64 - 1)
    assert status == 0, err


def test_lora_rank_beyond_the_layers_is_refused(tiny_folder, data, tmp_path):
    """rank 10**9 allocated adapters of 10**9 rows: the process died (SIGSEGV)."""
    result = cli_process("lora", "--model", tiny_folder, "--train", "--data", data, "--iters", 1,
                         "--adapter-path", tmp_path / "adapters", "--quiet", "--lora-rank", 10**9)
    assert "'rank' 1000000000 is above 16" in process_error_line(result)
    assert not (tmp_path / "adapters").exists()


@pytest.mark.parametrize("name, content, message", [
    ("deep.json", "[" * 100_000, "nested too deeply to be a config file"),
    ("deep.yaml", "iters: " + "[" * 100_000, "nested too deeply to be a config file"),
    ("latin1.yaml", b"data: caf\xe9\n", "not UTF-8 text (invalid continuation byte at byte 9)"),
    ("huge.json", '{"learning_rate": 1' + "0" * 400 + "}", "option 'learning_rate' cannot be 1000"),
], ids=["deep-json", "deep-yaml", "not-utf8", "float-overflow"])
def test_bad_config_files(capsys, tiny_folder, data, tmp_path, name, content, message):
    config = tmp_path / name
    config.write_bytes(content if isinstance(content, bytes) else content.encode())
    line = refused(capsys, "lora", "--config", config, "--model", tiny_folder, "--train",
                   "--data", data, "--adapter-path", tmp_path / "adapters")
    assert line.startswith(f"error: {config}: ") and message in line, line
    assert len(line) < 400


def data_folder(tmp_path: Path, train: bytes, valid: bytes = None) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.jsonl").write_bytes(train)
    if valid is not None:
        (folder / "valid.jsonl").write_bytes(valid)
    return folder


GOOD_LINES = b'{"text": "one"}\n{"text": "two"}\n'


@pytest.mark.parametrize("train, valid, where, message", [
    (b"", None, "train.jsonl", "has no examples"),
    (GOOD_LINES, b"\n", "valid.jsonl", "has no examples"),
    (GOOD_LINES + b'{"text": ' + b"[" * 100_000 + b"\n", None, "train.jsonl:3",
     "nested too deeply"),
    (GOOD_LINES + b'{"text": "bad \\ud800"}\n', None, "train.jsonl:3",
     "'text' is not UTF-8 text: a lone surrogate U+D800 at character 4"),
    (GOOD_LINES + b'{"prompt": "refuse", "completion": "no"}\n', None, "train.jsonl:3",
     "the chat template refused the conversation: no refusals here"),
], ids=["empty-train", "empty-valid", "deep", "surrogate", "template-refuses"])
def test_bad_training_data_names_the_file(capsys, refusing_folder, tmp_path, train, valid,
                                          where, message):
    folder = data_folder(tmp_path, train, valid)
    line = refused(capsys, "lora", "--model", refusing_folder, "--train", "--data", folder,
                   "--iters", 1, "--batch-size", 1, "--adapter-path", tmp_path / "adapters")
    assert f"{folder / where}: " in line and message in line, line
    assert not (tmp_path / "adapters").exists()


def test_fewer_examples_than_the_batch_size_names_the_file(capsys, tiny_folder, tmp_path):
    folder = data_folder(tmp_path, GOOD_LINES)
    line = refused(capsys, "lora", "--model", tiny_folder, "--train", "--data", folder,
                   "--batch-size", 4, "--adapter-path", tmp_path / "adapters")
    assert line == (f"error: {folder / 'train.jsonl'}: 2 examples, fewer than --batch-size 4; "
                    "add examples or lower --batch-size")


# --- prompt cache files ------------------------------------------------------------------------

def _cache_file(tiny_folder, path: Path) -> Path:
    """A real prompt cache of tiny_folder after a short generation."""
    model, tokenizer = load(tiny_folder)
    cache = PromptCache.for_model(model)
    list(stream_generate(model, tokenizer, "hi there", 3, prompt_cache=cache))
    save_prompt_cache(path, cache.cache, cache.tokens)
    return path


def _cache_file_metadata(path: Path, **metadata) -> None:
    arrays, saved = mx.load(str(path), return_metadata=True)
    saved.update(metadata)
    mx.save_safetensors(str(path), arrays, {k: v for k, v in saved.items() if v is not None})


def _edit_arrays(path: Path, edit) -> None:
    arrays, metadata = mx.load(str(path), return_metadata=True)
    edit(arrays)
    mx.save_safetensors(str(path), arrays, metadata)


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.unlink(), "cannot read it"),
    (lambda p: p.write_bytes(p.read_bytes()[:30]), "cannot read it"),
    (lambda p: _cache_file_metadata(p, layers=None), "its metadata has no JSON list 'layers'"),
    (lambda p: _cache_file_metadata(p, tokens="[1, 2"), "its metadata has no JSON list 'tokens'"),
    (lambda p: _cache_file_metadata(p, tokens='{"a": 1}'), "its metadata has no JSON list 'tokens'"),
    (lambda p: _cache_file_metadata(p, tokens='[1, "x"]'), "its 'tokens' are not all token ids"),
    (lambda p: _cache_file_metadata(p, layers="[{}]"), "its tensors are not the keys and values"),
    (lambda p: _cache_file_metadata(p, layers='[{"max_size": 2}, {}]'), "layer 0's kind"),
    (lambda p: _edit_arrays(p, lambda a: a.update({"0.keys": mx.zeros((2, 2))})), "layer 0's keys"),
    (lambda p: _cache_file_metadata(p, tokens="[1]"), "do not all hold the 1 positions"),
], ids=["missing", "truncated", "no-layers", "tokens-not-json", "tokens-object", "tokens-text",
        "tensor-names", "layer-kind", "tensor-shape", "token-count"])
def test_corrupt_prompt_cache_names_the_file(tiny_folder, tmp_path, damage, message):
    path = _cache_file(tiny_folder, tmp_path / "cache.safetensors")
    damage(path)
    with pytest.raises(CheckpointError) as error:
        load_prompt_cache(path)
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value), error.value


"""`mlx-mobilellm generate` and `mlx-mobilellm chat`: the real demo model answers, the tiny
model's output equals the library's for the same options, chats reuse their cache, and bad
input is one `error:` line with a non-zero exit."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from convert.convert import convert
from generation_helpers import BOS, IM_END, write_bpe_folder
from mlx_mobilellm import PromptCache, generate, load, stream_generate
from mlx_mobilellm.cli import main

CONTEXT = 96
STATS = re.compile(r"^prompt: (\d+) tokens, [\d.]+ tokens/s \| generation: (\d+) tokens, "
                   r"[\d.]+ tokens/s \| peak memory: [\d.]+ GB$", re.M)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """An MLX model folder converted from a tiny random LlamaForCausalLM with a trained BPE
    tokenizer, a ChatML template and a short context."""
    root = tmp_path_factory.mktemp("cli")
    hf = write_bpe_folder(root / "hf")
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(hf / "tokenizer.json"))
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
        tie_word_embeddings=True, bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # weights large enough that the logits are far from uniform
        for name, param in model.named_parameters():
            param.copy_(torch.randn_like(param) * (0.2 if param.ndim == 1 else 0.3) + (param.ndim == 1))
    model.save_pretrained(hf)
    write_bpe_folder(hf)  # our generation_config.json (a list of EOS ids) over transformers'
    return convert(hf, root / "mlx", quiet=True)


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    return load(tiny_folder)


def cli(capsys, *argv) -> tuple:
    """(exit status, stdout, stderr) of mlx_mobilellm.cli.main in this process."""
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def subprocess_cli(*argv, stdin: str = "", timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, "-m", "mlx_mobilellm.cli", *map(str, argv)],
                          input=stdin, capture_output=True, text=True, timeout=timeout, env=env)


def messages(user: str, system=None) -> list:
    return ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": user}]


def one_error_line(err: str) -> str:
    """The one error line of stderr. Notes may come before it (on a CPU with the reference BLAS
    every loading command prints one): they inform, they are not errors."""
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("note: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


# --- the real demo model -------------------------------------------------------------------------

def test_demo_model_answers_paris_with_stats():
    result = subprocess_cli("generate", "--prompt", "What is the capital of France?",
                            "--max-tokens", "16", "--verbose", timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    stats = STATS.findall(result.stderr)
    # The chat-templated prompt; a short answer that ends at EOS, before --max-tokens.
    assert len(stats) == 1 and int(stats[0][0]) > 10 and 1 <= int(stats[0][1]) < 16


# --- generate on the tiny model: the CLI prints what the library generates ------------------------

@pytest.mark.parametrize("flags, make_prompt", [
    ([], lambda tok: tok.apply_chat_template(messages("hi there"))),
    (["--ignore-chat-template"], lambda tok: "hi there"),
    (["--system", "Be terse."], lambda tok: tok.apply_chat_template(messages("hi there", "Be terse."))),
], ids=["chat-template", "ignore-chat-template", "system"])
def test_generate_prints_what_the_library_generates(capsys, tiny_folder, tiny, flags, make_prompt):
    model, tokenizer = tiny
    status, out, err = cli(capsys, "generate", "--model", tiny_folder, "--prompt", "hi there",
                           "--max-tokens", 8, *flags)
    assert status == 0, err
    expected = generate(model, tokenizer, make_prompt(tokenizer), 8)
    assert out == expected + "\n"
    assert not STATS.search(err)  # stats only with --verbose


def test_prompt_variants_reach_the_model_differently(tiny):
    """The parametrized cases above are not the same prompt in disguise."""
    _, tokenizer = tiny
    prompts = [tokenizer.apply_chat_template(messages("hi there")), tokenizer.encode("hi there"),
               tokenizer.apply_chat_template(messages("hi there", "Be terse."))]
    assert len({tuple(p) for p in prompts}) == 3
    assert "You are a tiny test model." in tokenizer.decode(prompts[0])
    assert "Be terse." in tokenizer.decode(prompts[2])
    assert "You are a tiny test model." not in tokenizer.decode(prompts[2])


def test_sampling_flags_and_seed(capsys, tiny_folder, tiny):
    model, tokenizer = tiny
    flags = ["--temp", "0.9", "--top-p", "0.95", "--top-k", "50", "--seed", "7"]
    runs = [cli(capsys, "generate", "--model", tiny_folder, "--prompt", "hi", "-m", 10, *flags)
            for _ in range(2)]
    assert runs[0] == runs[1] and runs[0][0] == 0
    expected = generate(model, tokenizer, tokenizer.apply_chat_template(messages("hi")), 10,
                        temperature=0.9, top_p=0.95, top_k=50, seed=7)
    assert runs[0][1] == expected + "\n"


def test_verbose_prints_the_stats_line(capsys, tiny_folder, tiny):
    _, tokenizer = tiny
    status, out, err = cli(capsys, "generate", "--model", tiny_folder, "--prompt", "hi",
                           "--max-tokens", 3, "--verbose", "--ignore-chat-template")
    assert status == 0
    assert STATS.findall(err) == [(str(len(tokenizer.encode("hi"))), STATS.findall(err)[0][1])]
    assert 1 <= int(STATS.findall(err)[0][1]) <= 3


def test_stop_flag(capsys, tiny_folder, tiny):
    model, tokenizer = tiny
    full = generate(model, tokenizer, "hi", 12)
    stop = full[len(full) // 2:][:2]
    assert stop
    status, out, _ = cli(capsys, "generate", "--model", tiny_folder, "--prompt", "hi", "-m", 12,
                         "--ignore-chat-template", "--stop", stop)
    assert status == 0 and out == full[: full.index(stop)] + "\n"


def test_prompt_from_stdin(capsys, tiny_folder):
    direct = cli(capsys, "generate", "--model", tiny_folder, "--prompt", "tell me\nmore", "-m", 6)
    piped = subprocess_cli("generate", "--model", tiny_folder, "--prompt", "-", "-m", 6,
                           stdin="tell me\nmore")
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == direct[1]


# --- errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--temp", "-1"], r"temperature must be in \[0.0, inf\], got -1.0"),
    (["--top-p", "2"], r"top_p must be in \(0.0, 1.0\], got 2.0"),
    (["--min-p", "1.5"], r"min_p must be in"),
    (["--top-k", "-3"], r"top_k must be >= 0"),
    (["--max-tokens", "0"], r"--max-tokens must be at least 1, got 0"),
    (["--max-kv-size", "2"], r"--max-kv-size must be at least 8"),
    (["--num-draft-tokens", "0"], r"--num-draft-tokens must be in \[1, 32\], got 0"),
], ids=["temp", "top-p", "min-p", "top-k", "max-tokens", "max-kv-size", "num-draft-tokens"])
def test_bad_flag_values_are_one_error_line(capsys, tiny_folder, flags, message):
    status, out, err = cli(capsys, "generate", "--model", tiny_folder, "--prompt", "hi", *flags)
    assert status != 0 and out == ""
    assert re.search(message, one_error_line(err))


def test_prompt_longer_than_the_context(capsys, tiny_folder, tiny):
    _, tokenizer = tiny
    prompt = "many words " * 60
    status, out, err = cli(capsys, "generate", "--model", tiny_folder, "--prompt", prompt,
                           "--ignore-chat-template")
    count = len(tokenizer.encode(prompt))
    assert count > CONTEXT and status != 0
    assert one_error_line(err) == f"error: the prompt has {count} tokens; the model's context is {CONTEXT}"


def test_speculative_with_bounded_cache_is_one_error_line(capsys, tiny_folder):
    status, out, err = cli(capsys, "generate", "--model", tiny_folder, "--prompt", "hi",
                           "--draft-model", tiny_folder, "--max-kv-size", 16)
    assert status != 0
    assert "unbounded KV cache" in one_error_line(err)


def test_draft_model_flag_gives_the_same_output(capsys, tiny_folder):
    plain = cli(capsys, "generate", "--model", tiny_folder, "--prompt", "hi", "-m", 10)
    drafted = cli(capsys, "generate", "--model", tiny_folder, "--prompt", "hi", "-m", 10,
                  "--draft-model", tiny_folder, "--num-draft-tokens", 2)
    assert plain[0] == drafted[0] == 0 and plain[1] == drafted[1]


def test_unknown_model_path(capsys, tmp_path):
    missing = tmp_path / "no-such-model"
    status, out, err = cli(capsys, "generate", "--model", missing, "--prompt", "hi")
    assert status != 0 and str(missing) in one_error_line(err)
    # The same as a real process: exit status 1, one line, no traceback.
    result = subprocess_cli("generate", "--model", missing, "--prompt", "hi")
    assert result.returncode == 1 and one_error_line(result.stderr) == one_error_line(err)


def test_model_without_tokenizer(capsys, tiny_folder, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((tiny_folder / name).read_bytes())
    status, _, err = cli(capsys, "generate", "--model", bare, "--prompt", "hi")
    assert status != 0 and "tokenizer" in one_error_line(err)


# --- chat --------------------------------------------------------------------------------------------

def library_chat(model, tokenizer, lines, max_tokens):
    """The chat REPL's turns replayed through the library: (answer, prompt tokens) per turn."""
    history, cache, turns = [], PromptCache.for_model(model), []
    for line in lines:
        if line == "/reset":
            history, cache = [], PromptCache.for_model(model)
            continue
        history.append({"role": "user", "content": line})
        prompt = tokenizer.apply_chat_template(history)
        responses = list(stream_generate(model, tokenizer, prompt, max_tokens, prompt_cache=cache))
        answer = "".join(r.text for r in responses)
        history.append({"role": "assistant", "content": answer})
        turns.append((answer, responses[-1].prompt_tokens, len(prompt)))
    return turns


def chat_turns(stdout: str) -> list:
    """The answers a chat printed: each turn's text after the '>> ' prompt, minus its newline."""
    parts = stdout.split(">> ")
    return [p[:-1] for p in parts if p.endswith("\n") and p != "\n"]


@pytest.mark.parametrize("lines, ending", [
    (["hi", "/reset", "again"], "/exit\n"),
    (["hi", "tell me more"], "/exit\n"),
    (["hi", "", "tell me more"], ""),  # an empty line is skipped; end of input quits
], ids=["reset", "two-turns", "eof"])
def test_chat_keeps_its_cache_across_turns(tiny_folder, tiny, lines, ending):
    model, tokenizer = tiny
    stdin = "".join(line + "\n" for line in lines) + ending
    result = subprocess_cli("chat", "--model", tiny_folder, "--max-tokens", 5, stdin=stdin)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    turns = library_chat(model, tokenizer, [line for line in lines if line], 5)
    assert chat_turns(result.stdout) == [answer for answer, _, _ in turns]
    stats = [int(prompt) for prompt, _ in STATS.findall(result.stderr)]
    assert stats == [prompt_tokens for _, prompt_tokens, _ in turns]
    # First turn (or first after /reset): the whole prompt. A continued chat: only what is new.
    assert stats[0] == turns[0][2]
    if "/reset" in lines:
        assert stats[1] == turns[1][2]
    else:  # at least the first turn's prompt came from the cache
        assert 0 < stats[1] <= turns[1][2] - turns[0][2] < turns[1][2]


def test_a_slow_blas_gets_one_note(tiny_folder):
    """With only the reference BLAS (MLX_MOBILELLM_BLAS=none keeps the system's out), generate
    says how to get a fast one; the answer is the same."""
    env = {**os.environ, "MLX_MOBILELLM_BLAS": "none"}
    argv = [sys.executable, "-m", "mlx_mobilellm.cli", "generate", "--model", str(tiny_folder),
            "--prompt", "hi", "--max-tokens", "3"]
    slow = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert slow.returncode == 0, slow.stderr
    notes = slow.stderr.splitlines()
    assert len(notes) == 1 and "apt-get install libopenblas0-pthread" in notes[0]


def test_load_auto_is_the_dtype_the_command_line_computes_in(tiny_folder, tmp_path):
    """load(dtype="auto") gives what generate runs: float32 on a CPU with a fast BLAS."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_mobilellm.compute_dtype import FAST_BLAS_GFLOPS, float32_gflops

    half = convert(tiny_folder, tmp_path / "bf16", dtype="bfloat16", quiet=True)
    dtypes = {p.dtype for _, p in tree_flatten(load(half, dtype="auto")[0].parameters())}
    fast = float32_gflops() >= FAST_BLAS_GFLOPS
    assert dtypes == ({mx.float32} if fast else {mx.bfloat16})

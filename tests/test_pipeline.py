"""Pipeline-parallel inference for real: mlx.launch starts 2 local ranks (ring backend on
127.0.0.1), each holds a slice of the blocks, and they generate what one process generates —
the same tokens, logprobs and logits — with greedy and seeded sampling, padded batches, a
bounded cache, Llama 4 chunked attention with a NoPE layer, and layer sharing."""

from __future__ import annotations

import json
import sys

import mlx.core as mx
import numpy as np
import pytest

from mlx_mobilellm.models.pipeline import block_ranges
from test_cli_generate import tiny_folder  # noqa: F401 (fixture)
from test_distributed import CLI, launch_two
from test_trainer import TESTS

CASES = {
    "llama, 5 blocks": dict(num_layers=5, rope_traditional=False, use_qk_norm=False),
    "r1, chunked, NoPE": dict(num_layers=4, attention_chunk_size=8, nope_layers=[3]),
    "layer sharing": dict(num_layers=3, layer_sharing=True, use_qk_norm=False),
}
PROMPT = [5, 17, 3, 88, 41, 9, 23]
VOCAB = 97

# Run on every rank and, for the reference, in the test's own process: the results of one
# case, as lists (JSON). Every rank must make the same calls: each model call is collective.
RESULTS = """
PROMPT = %r

def results(model):
    import mlx.core as mx
    from mlx_mobilellm.decode import generate_step
    from mlx_mobilellm.sampling import make_sampler

    prompt = mx.array(PROMPT)
    greedy = list(generate_step(model, prompt, model.make_cache(), max_tokens=12))
    # Past the bound of a ring cache of 6 positions.
    bounded = list(generate_step(model, prompt, model.make_cache(max_kv_size=6), max_tokens=10))
    rows = mx.array([[0, 0, 0] + PROMPT[:4], PROMPT])
    mask = mx.array([[0, 0, 0, 1, 1, 1, 1], [1] * 7])
    sampled = model.generate(rows, 10, temperature=0.9, top_p=0.95, attention_mask=mask,
                             seed=7)
    drawn = list(generate_step(model, prompt, model.make_cache(), max_tokens=8,
                               sampler=make_sampler(1.0, 1.0)))
    output = model(mx.array([PROMPT]), labels=mx.array([PROMPT]))
    return {"greedy": [s.tokens.tolist() for s in greedy],
             "greedy_logprobs": [s.logprobs.tolist() for s in greedy],
             "bounded": [s.tokens.tolist() for s in bounded],
             "sampled": sampled.tolist(), "drawn": [s.tokens.tolist() for s in drawn],
             "logits": output.logits.tolist(), "loss": output.loss.item()}
""" % PROMPT

SCRIPT = """{results}
import json, sys
sys.path.insert(0, {tests!r})
import mlx_mobilellm  # first, as in the tests' own process: the same BLAS, the same numbers
import mlx.core as mx
from generation_helpers import tiny_model
from mlx_mobilellm.models.pipeline import split_into_stages
from mlx_mobilellm.training.distributed import world

group = world()
out = {{}}
for name, overrides in {cases!r}.items():
    model = split_into_stages(tiny_model({vocab}, seed=3, **overrides), group)
    out[name] = {{"results": results(model), "blocks": [b.layer_idx for b in model.decoder.layers],
                 "caches": len(model.make_cache())}}
with open({folder!r} + f"/rank{{group.rank()}}.json", "w") as f:
    json.dump(out, f)
print(f"rank {{group.rank()}} of {{group.size()}} done", flush=True)
"""


def reference_results(model) -> dict:
    namespace = {}
    exec(RESULTS, namespace)
    return namespace["results"](model)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """What each of 2 launched ranks computed, per case."""
    folder = tmp_path_factory.mktemp("pipeline")
    script = folder / "launched.py"
    script.write_text(SCRIPT.format(results=RESULTS, tests=str(TESTS), cases=CASES, vocab=VOCAB,
                                    folder=str(folder)))
    result = launch_two(sys.executable, script)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "rank 0 of 2 done" in output \
        and "rank 1 of 2 done" in output, output
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.parametrize("case", CASES)
def test_two_stages_generate_what_one_process_generates(launched, case):
    from generation_helpers import tiny_model

    expected = reference_results(tiny_model(VOCAB, seed=3, **CASES[case]))
    for rank in launched:
        got = rank[case]["results"]
        for key in ("greedy", "bounded", "sampled"):
            assert got[key] == expected[key], (case, key)
        for key in ("greedy_logprobs", "logits", "loss"):
            np.testing.assert_allclose(got[key], expected[key], rtol=0, atol=1e-5)
    # Drawn from MLX's global generator, unseeded: the ranks draw alike (split_into_stages
    # seeds them alike), else they would decode different tokens.
    assert launched[0][case]["results"]["drawn"] == launched[1][case]["results"]["drawn"]
    # Greedy decoding of a random tiny model must not be one token over and over, else
    # equal tokens would say little.
    assert len(set(sum(expected["greedy"], []))) > 2


@pytest.mark.parametrize("case", CASES)
def test_each_rank_holds_only_its_blocks(launched, case):
    blocks = CASES[case]["num_layers"]
    calls = 2 if CASES[case].get("layer_sharing") else 1
    held = [rank[case]["blocks"] for rank in launched]
    assert held == [list(r) for r in block_ranges(blocks, 2)]
    assert [rank[case]["caches"] for rank in launched] == [len(h) * calls for h in held]


def test_block_ranges_cover_every_block_once():
    for blocks in range(1, 12):
        for ranks in range(1, blocks + 1):
            ranges = block_ranges(blocks, ranks)
            assert [i for r in ranges for i in r] == list(range(blocks))
            assert max(map(len, ranges)) - min(map(len, ranges)) <= 1
    with pytest.raises(ValueError, match="3 processes cannot share 2 blocks"):
        block_ranges(2, 3)


def test_one_process_is_left_as_it_was():
    from generation_helpers import tiny_model
    from mlx_mobilellm.models.pipeline import split_into_stages

    model = tiny_model(VOCAB, num_layers=3)
    before = model.decoder.layers
    assert split_into_stages(model, mx.distributed.init()) is model
    assert model.decoder.layers is before and model.decoder.stage is None


# --- the command line under mlx.launch -----------------------------------------------------------

def run_cli(*argv):
    import subprocess

    return subprocess.run([str(CLI), *map(str, argv)], capture_output=True, text=True, timeout=120)


def test_generate_under_mlx_launch_prints_what_one_process_prints(tiny_folder):
    command = ["generate", "--model", tiny_folder, "--prompt", "hello there", "--max-tokens", 24,
               "--temp", 0.8, "--seed", 5]
    single = run_cli(*command)
    assert single.returncode == 0, single.stderr
    two = launch_two(CLI, *command)
    assert two.returncode == 0, two.stderr
    assert two.stdout == single.stdout and single.stdout.strip()  # once: rank 0 alone prints


def test_unseeded_sampling_agrees_across_ranks(tiny_folder):
    """Without --seed each process would draw its own tokens, and the ranks would stop at
    different steps and wait for each other forever; they draw alike."""
    two = launch_two(CLI, "generate", "--model", tiny_folder, "--prompt", "hi", "--max-tokens",
                     40, "--temp", 1.5)
    assert two.returncode == 0 and two.stdout.strip() and "error" not in two.stderr, two.stderr


def test_evaluate_under_mlx_launch(tiny_folder, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("hello there, general kenobi. " * 20)
    command = ["evaluate", "--model", tiny_folder, "--data", text, "--max-seq-length", 32]
    single, two = run_cli(*command), launch_two(CLI, *command)
    assert single.returncode == 0 and two.returncode == 0, single.stderr + two.stderr
    drop_speed = lambda out: {k: v for k, v in json.loads(out).items()  # noqa: E731
                              if "second" not in k and "per_s" not in k}
    assert two.stdout.count("\n") == 1
    assert drop_speed(two.stdout) == drop_speed(single.stdout)


@pytest.mark.parametrize("command", [["chat"], ["server", "--port", 0],
                                     ["generate", "--prompt", "hi", "--draft-model", "DRAFT"]])
def test_what_does_not_split_says_so(tiny_folder, command):
    command = [c if c != "DRAFT" else tiny_folder for c in command]
    two = launch_two(CLI, *command[:1], "--model", tiny_folder, *command[1:])
    assert two.stderr.count("runs in one process") == 2, two.stderr  # each rank, one line

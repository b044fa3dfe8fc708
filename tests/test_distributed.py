"""Data-parallel training for real: mlx.launch starts 2 local ranks on the ring backend
(TCP on 127.0.0.1) and they train what one process trains with the same global batch, to the
same losses and adapters; rank 1 writes nothing and needs no checkpoint to resume."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_mobilellm.errors import ParameterError
from mlx_mobilellm.training import distributed
from mlx_mobilellm.training.trainer import read_metrics
from test_cli_generate import tiny_folder  # noqa: F401 (fixture)
from test_cli_lora import FAST, _main, data  # noqa: F401 (fixture)
from test_trainer import TESTS, adapters_of, assert_close_pairs, assert_close_trees, losses
from test_trainer import make_examples, run

LAUNCHER = Path(sys.executable).parent / "mlx.launch"
CLI = Path(sys.executable).parent / "mlx-mobilellm"
# Rows of unequal lengths and masked prompts, so that each rank's rows hold a different share
# of a batch's tokens; accumulation, clipping and warmup, so that every part of a step is
# summed across the ranks before it is used. The constant schedule after the warmup does not
# depend on iters: a run of 3 steps resumed to 6 follows one of 6.
# Adam divides by the gradients' RMS, which magnifies the rounding of the ranks' sums: at this
# learning rate the adapters agree to about 2e-6.
SETTINGS = dict(batch_size=4, grad_accumulation_steps=2, max_grad_norm=0.5, warmup=2,
                optimizer="adamw", learning_rate=1e-3, save_every=3, seed=4)
EXAMPLES = dict(count=12, seed=2, lengths=(5, 16))
# Each rank trains into its own folder, so that what rank 1 writes (nothing) can be seen.
SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import mlx_mobilellm  # first, as in the tests' own process: the same BLAS, the same numbers
import test_trainer  # not this file: its fixtures import torch, seconds per rank
from mlx_mobilellm.training import distributed

rank = distributed.world().rank()
test_trainer.run({folder!r} + f"/rank{{rank}}", test_trainer.make_examples(**{examples!r}),
                 iters={iters}, resume={resume}, **{settings!r})
print(f"rank {{rank}} of {{distributed.world().size()}} done", flush=True)
"""


def train_run(folder, iters, resume=False):
    return run(folder, make_examples(**EXAMPLES), iters=iters, resume=resume, **SETTINGS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two(*command) -> subprocess.CompletedProcess:
    # The ring backend listens on the starting port and the next: a free one, so that runs
    # side by side do not collide.
    return subprocess.run([str(LAUNCHER), "-n", "2", "--backend", "ring", "--starting-port",
                           str(free_port()), *map(str, command)],
                          capture_output=True, text=True, timeout=120)


def launch(tmp_path, folder, iters, resume=False):
    """Run train_run on 2 ranks; mlx.launch exits 0 even when a rank fails, so each rank
    says when it is done."""
    script = tmp_path / f"launched_{iters}_{resume}.py"
    script.write_text(SCRIPT.format(tests=str(TESTS), folder=str(folder), iters=iters,
                                    resume=resume, examples=EXAMPLES, settings=SETTINGS))
    result = launch_two(sys.executable, script)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "rank 0 of 2 done" in output \
        and "rank 1 of 2 done" in output, output


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, 6 steps."""
    folder = tmp_path_factory.mktemp("single")
    model, metrics = train_run(folder, iters=6)
    return adapters_of(model), metrics


def saved_adapters(folder) -> dict:
    return {k: np.array(v) for k, v in mx.load(str(folder / "adapters.safetensors")).items()}


def test_two_ranks_train_as_one_process(tmp_path, single):
    adapters, metrics = single
    launch(tmp_path, tmp_path / "run", iters=6)
    main = tmp_path / "run" / "rank0"
    distributed_metrics = read_metrics(main)
    assert [m["step"] for m in distributed_metrics] == list(range(1, 7))
    for key in ("train_loss", "learning_rate"):
        assert_close_pairs(losses(distributed_metrics, key), losses(metrics, key), 1e-5)
    assert_close_trees(saved_adapters(main), adapters, 1e-5)
    assert (main / "checkpoint").is_dir()
    assert not (tmp_path / "run" / "rank1").exists()


def test_two_ranks_resume_what_rank_0_saved(tmp_path, single):
    adapters, metrics = single
    folder = tmp_path / "run"
    launch(tmp_path, folder, iters=3)
    launch(tmp_path, folder, iters=6, resume=True)
    resumed = read_metrics(folder / "rank0")
    assert_close_pairs(losses(resumed), losses(metrics), 1e-5)
    assert_close_trees(saved_adapters(folder / "rank0"), adapters, 1e-5)
    assert not (folder / "rank1").exists()  # rank 1 had no checkpoint: rank 0 shared its own


def test_the_cli_under_mlx_launch(tiny_folder, data, tmp_path):
    """`mlx.launch -n 2 mlx-mobilellm lora`: the losses of one process, and rank 0 alone
    prints the test loss and draws the loss curve."""
    common = ["lora", "--model", tiny_folder, "--train", "--data", data, "--iters", 4,
              "--steps-per-report", 1, "--test", *FAST]
    assert _main(*common, "--adapter-path", tmp_path / "single") == 0
    result = launch_two(CLI, *common, "--adapter-path", tmp_path / "two")
    assert result.returncode == 0 and result.stdout.count("test loss") == 1, \
        result.stdout + result.stderr
    assert_close_pairs(losses(read_metrics(tmp_path / "two")),
                       losses(read_metrics(tmp_path / "single")), 1e-5)
    assert (tmp_path / "two" / "loss_curve.png").exists()


# --- the pieces, on one rank and on a stand-in group of two ------------------------------------

class Group:
    """What distributed.shard and check_batch_size ask of a group."""

    def __init__(self, rank, size):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


def test_shards_split_the_rows_and_weigh_their_tokens():
    inputs = mx.arange(12).reshape(4, 3)
    labels = mx.array([[-100, 1, 2], [-100, -100, 2], [5, 6, -100], [7, 8, 9]])
    shards = [distributed.shard(inputs, labels, Group(rank, 2)) for rank in (0, 1)]
    assert [s[0].tolist() for s in shards] == [inputs[:2].tolist(), inputs[2:].tolist()]
    assert [s[2].item() for s in shards] == pytest.approx([3 / 6, 3 / 6])
    labels = mx.array([[-100, 1, 2], [-100, -100, 2], [5, 6, -100], [7, -100, -100]])
    assert [distributed.shard(inputs, labels, Group(r, 2))[2].item() for r in (0, 1)] == \
        pytest.approx([3 / 4, 1 / 4])
    one = distributed.shard(inputs, labels, Group(0, 1))
    assert one[2].item() == 1.0 and one[0].tolist() == inputs.tolist()


def test_a_batch_that_does_not_split_evenly_is_refused():
    distributed.check_batch_size(4, Group(0, 2))
    with pytest.raises(ParameterError, match="batch_size 3 does not split evenly over 2"):
        distributed.check_batch_size(3, Group(0, 2))


def test_one_rank_keeps_a_plain_runs_seeds():
    assert distributed.world().size() == 1
    assert distributed.step_seed(5, 7, Group(0, 1)) == 5 * 100_003 + 7
    seeds = {distributed.step_seed(5, step, Group(rank, 2)) for step in (1, 2) for rank in (0, 1)}
    assert len(seeds) == 4

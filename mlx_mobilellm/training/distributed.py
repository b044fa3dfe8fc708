"""Data-parallel training over mx.distributed: every process (rank) builds the same global
batches, trains on its own rows of each, and the ranks sum their gradients once per step.

`mlx.launch -n 2 mlx-mobilellm lora ...` starts the ranks; run plainly, the group has one rank
and every function here leaves things as they were. Rank 0 alone writes files and reports.
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from ..errors import ParameterError
from ..sampling import SEED_LIMIT


@lru_cache(maxsize=1)
def world():
    """The group of every launched rank (one rank when not launched). Cached: a second
    init() would set the backend up again."""
    return mx.distributed.init()


def is_main(group) -> bool:
    return group.rank() == 0


def check_batch_size(batch_size: int, group) -> None:
    if batch_size % group.size():
        raise ParameterError(lambda name: f"{name('batch_size')} {batch_size} does not split "
                             f"evenly over {group.size()} processes; use a multiple of "
                             f"{group.size()}")


def shard(inputs, labels, group):
    """(inputs, labels, weight): this rank's rows of a global micro-batch, and the share of
    the micro-batch's counted tokens that they hold. The loss is a mean per token, so this
    rank's mean times its share, summed over the ranks, is the mean over the whole batch,
    whatever the rows' lengths and masks."""
    rows = inputs.shape[0] // group.size()
    start = group.rank() * rows
    mine = labels[start:start + rows]
    weight = counted_tokens(mine) / counted_tokens(labels)
    return inputs[start:start + rows], mine, mx.array(weight, mx.float32)


def counted_tokens(labels) -> int:
    """Target positions the loss counts: position t predicts labels[t + 1]; -100 is not counted."""
    return (labels[:, 1:] != -100).sum().item()


def sum_over_ranks(tree, group):
    """The elementwise sum of a tree of arrays over the ranks. One all_sum per dtype rather
    than one per array: the adapters are many small arrays, and every collective pays a
    round trip between the machines."""
    if group.size() == 1:
        return tree
    # In name order: every rank must concatenate the same arrays alike, and one rank's tree
    # may hold them in another order (rank 0's optimizer state read back from a checkpoint).
    leaves = sorted(tree_flatten(tree), key=lambda leaf: leaf[0])
    summed = {}
    for dtype in dict.fromkeys(array.dtype for _, array in leaves):
        named = [(name, array) for name, array in leaves if array.dtype == dtype]
        flat = mx.distributed.all_sum(mx.concatenate([a.reshape(-1) for _, a in named]),
                                      group=group)
        ends, end = [], 0
        for _, array in named:
            end += array.size
            ends.append(end)
        for (name, array), part in zip(named, mx.split(flat, ends[:-1])):
            summed[name] = part.reshape(array.shape)
    # Mapped over the tree rather than unflattened: that would drop the empty containers of
    # modules without adapters, which the optimizer state keeps.
    return tree_map_with_path(lambda name, _: summed[name], tree)


def from_main(tree, group):
    """Rank 0's values of a tree of arrays, on every rank (the others send zeros)."""
    if group.size() == 1:
        return tree
    return sum_over_ranks(tree if is_main(group) else tree_map(mx.zeros_like, tree), group)


def step_seed(seed: int, step: int, group) -> int:
    """The random seed of a step on this rank: each rank draws its own dropout masks (its
    rows are other examples), the same ones again when the run is resumed. One rank gets the
    seed a plain run uses; wrapped into the 64 bits MLX's seed takes."""
    return ((seed * 100_003 + step) * group.size() + group.rank()) % SEED_LIMIT


def share_main_state(model, optimizer, step: int, group) -> int:
    """Give every rank rank 0's adapters, optimizer state and step, and return the step:
    rank 0 alone reads a checkpoint, and the replicas must start equal to stay equal."""
    if group.size() == 1:
        return step
    shared = from_main({"adapters": model.trainable_parameters(), "optimizer": optimizer.state,
                        "step": mx.array(step, mx.int64)}, group)
    model.update(shared["adapters"])
    optimizer.state = shared["optimizer"]
    return shared["step"].item()

"""Random weights for tiny test models: norm weights near 1 but not all ones, so that a
swapped or skipped norm shows up in the outputs."""

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten


def randomize_weights(model, seed: int, scale: float = 0.15):
    rng = np.random.default_rng(seed)
    weights = []
    for name, p in tree_flatten(model.parameters()):
        w = rng.standard_normal(p.shape) * (0.2 if p.ndim == 1 else scale)
        weights.append((name, mx.array((w + (p.ndim == 1)).astype(np.float32))))
    model.load_weights(weights)
    model.eval()
    return model

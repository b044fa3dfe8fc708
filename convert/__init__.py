"""Checkpoint conversion: other projects' formats in, MLX model folders out, and back."""

# First, as every entry into the code does: mlx_mobilellm loads a fast system BLAS before
# anything imports mlx.core (mlx_mobilellm/blas.py).
import mlx_mobilellm  # noqa: F401

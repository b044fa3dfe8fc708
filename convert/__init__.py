"""Checkpoint conversion: other projects' formats in, MLX model folders out, and back."""

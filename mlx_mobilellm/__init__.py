"""mlx-mobilellm: the MobileLLM family on MLX."""

from .errors import CheckpointError
from .loading import load

__all__ = ["load", "CheckpointError"]

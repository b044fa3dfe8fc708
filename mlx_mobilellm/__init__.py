"""mlx-mobilellm: the MobileLLM family on MLX."""

from .errors import CheckpointError
from .generate import GenerationResponse, PromptCache, batch_generate, generate, stream_generate
from .loading import load
from .tokenizer import load_tokenizer

__all__ = ["load", "load_tokenizer", "stream_generate", "generate", "batch_generate",
           "GenerationResponse", "PromptCache", "CheckpointError"]

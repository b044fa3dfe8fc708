"""mlx-mobilellm: the MobileLLM family on MLX."""

from .blas import preload as _preload_fast_blas

_preload_fast_blas()  # before anything imports mlx.core: see blas.py

from .errors import CheckpointError  # noqa: E402
from .generate import (GenerationResponse, PromptCache, batch_generate, generate,  # noqa: E402
                       stream_generate)
from .loading import load  # noqa: E402
from .tokenizer import load_tokenizer  # noqa: E402

__all__ = ["load", "load_tokenizer", "stream_generate", "generate", "batch_generate",
           "GenerationResponse", "PromptCache", "CheckpointError"]

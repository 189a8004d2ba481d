"""Model ports (Flax NNX) of Hugging Face families, with weight I/O, LoRA and generation."""

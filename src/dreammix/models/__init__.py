"""Model loading (hub id, local path or the built tiny model) and LoRA adapters."""

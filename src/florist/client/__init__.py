"""Client side: model loading (hub id, local dir, the embedded SmolLM2 GGUF) and, later, local training."""

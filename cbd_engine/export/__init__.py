"""Exports for devices: a model folder as a GGUF file (llama.cpp, ollama, LM Studio), measured in its runtime."""

"""Exports for devices: a model folder as a GGUF file (llama.cpp, ollama, LM Studio) or an ONNX folder (ONNX Runtime
GenAI), each measured in its own runtime (formats.py: per format, its writer and runtime)."""

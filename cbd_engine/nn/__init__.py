"""Layer 4: torch building blocks. Devices, loading models and tokenizers, the losses, the validation loss,
distributed helpers, generation helpers."""

"""Layer 2: files. Atomic writes and folders (one mechanism), safetensors streaming, hashes, cbd.json lineage, the
cache folder, the zoo's fetchers, GGUF import, and the one source resolver."""

"""Layer 6: a student learns from a teacher. The `distill()` recipe (setup, step, validate, checkpoint, finish) and its
parts: the loss step, on-policy sampling, MiniLLM, the teacher cache, checkpoints, curves; `train()` on plain text."""

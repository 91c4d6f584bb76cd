"""Layer 1, torch-free: what can be asked for. Shapes and the size -> shape rule, model families (each tensor's axes
with roles), HF config reading, the distillation, chain and bridge specs with their option tuples, the zoo's
registry, progress events, and the one cost estimate table. The service imports only this layer."""

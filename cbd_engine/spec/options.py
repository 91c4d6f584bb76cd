"""The engine's options as data (torch-free): the engine checks them, the CLI offers them, and the API's schemas
build their `Literal`s from them, so the three never drift apart. Distillation's own (modes, losses, selection) live
beside its settings in spec/distill_config.py."""

# materialize (cbd_engine.materialization)
INITS = ("cbd", "random", "single", "learngene_auto", "learngene_van")  # baselines: materialization/baselines.py
ALIGNMENTS = ("auto", "lineage", "hungarian", "none")  # auto: lineage when recorded, else hungarian
ALPHA_MODES = ("auto", "proportional")  # or a number in [0, 1]: the weight of the smaller anchor
ALPHA_SEARCHES = ("knots", "exact")  # how "auto" finds it: the pair's cached knots, or the grid at the size
IMPORTANCES = ("activation", "magnitude")
MIXES = ("unit", "paper")  # cbd_engine.materialization.mixing
DTYPES = ("float32", "bfloat16", "float16")  # of a written model (io/checkpoint.py DTYPE_NAMES)
GROWS = ("zero", "replicate")  # new units: zero (function-preserving) or copies
GROUPS = ("attention", "mlp", "embeddings_norms")  # tensors that may get alphas of their own (alpha_search)
REFINE_STEPS = 0  # alpha "auto": per-module refinement steps after the grid, by default (docs/ENGINE.md, "alpha auto")

# the calibration set's sizes (cbd_engine.data.calibration), which the service's estimates read too
IMPORTANCE_ROWS = 256  # measured: 64 rows leave ... nats on the table (docs/ENGINE.md, "Calibration")
DEV_ROWS = 32  # rows that score each alpha candidate: enough to rank mixes whose losses differ by 0.02 nats

# devices by the API's names (cbd_engine.nn.device)
DEVICES = ("auto", "cpu", "gpu", "npu")

# evaluation (cbd_engine.evaluation)
TASK_TYPES = ("perplexity", "response_loss", "rougeL", "summarization", "multiple_choice")
SAMPLE_PROMPTS = ("What is the capital of France?", "Write a short poem about the sea.",
                  "Give three tips for staying healthy.")
SAMPLE_TOKENS = 48

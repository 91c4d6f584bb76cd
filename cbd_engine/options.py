"""The materializer's options as data (torch-free): the engine checks them, the CLI offers them, and the API's
schemas build their `Literal`s from them, so the three never drift apart."""

INITS = ("cbd", "random", "single", "learngene_auto", "learngene_van")
ALIGNMENTS = ("auto", "lineage", "hungarian", "none")  # auto: lineage when recorded, else hungarian
ALPHA_MODES = ("auto", "proportional")  # or a number in [0, 1]: the weight of the smaller anchor
IMPORTANCES = ("activation", "magnitude")
MIXES = ("unit", "paper")  # cbd_engine.mixing
GROUPS = ("attention", "mlp", "embeddings_norms")  # tensors that may get alphas of their own (alpha_search)
REFINE_STEPS = 0  # alpha "auto": per-module refinement steps after the grid, by default (docs/ENGINE.md, "alpha auto")

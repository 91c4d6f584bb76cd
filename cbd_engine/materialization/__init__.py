"""Layer 5: models of any size from one or two anchors. Index maps (transforms), importance, alignment, planning,
mixing, the alpha search, the streamed write, the fresh-init baselines, and the `materialize()` recipe."""

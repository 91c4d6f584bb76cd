"""Layer 7: whole jobs composed of the layers below. The chain build, the SeqKD bridge, healing, and the experiment
grid with its report."""

"""A run's loss curves: loss_curve.csv and loss_curve.png in the output folder."""

from __future__ import annotations

import csv
from pathlib import Path

CURVE_FIELDS = ("step", "tokens", "loss", "divergence", "cross_entropy", "learning_rate", "grad_norm",
                "tokens_per_second", "dev_loss", "rouge_l", "validation_loss", "seconds", "line_divergence",
                "line_params",  # line training's mixed model of the step (distillation/interpolation.py)
                "smallest_divergence", "random_divergence", "random_params",  # nested training's widths (nested.py)
                "dev_loss_largest", "dev_loss_smallest")


def write_curves(history: list[dict], folder: Path, title: str = "distillation") -> None:
    """loss_curve.csv (one row per step, dev loss where measured; validation loss before training and of the kept
    weights) and loss_curve.png."""
    with open(folder / "loss_curve.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CURVE_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    train = [(row["step"], row["loss"]) for row in history if row.get("loss") is not None]
    dev = [(row["step"], row["dev_loss"]) for row in history if row.get("dev_loss") is not None]
    valid = [(row["step"], row["validation_loss"]) for row in history if row.get("validation_loss") is not None]
    if train:
        axis.plot(*zip(*train, strict=True), label="training loss")
    if dev:
        axis.plot(*zip(*dev, strict=True), "o-", label="dev loss (response CE; selects the kept weights)")
    if valid:
        axis.plot(*zip(*valid, strict=True), "s", label="validation loss (before; kept weights)")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    figure.savefig(folder / "loss_curve.png", dpi=100)
    plt.close(figure)

"""Settings of one distillation stage; torch-free, so the service can validate a request without torch."""

from __future__ import annotations

from dataclasses import dataclass, fields

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl")

MODES = ("off_policy", "on_policy")
SELECT_BY = ("validation_loss", "rouge_l")


@dataclass
class DistillConfig:
    loss: str = "reverse_kl"  # one of losses.DIVERGENCES, or "ce" for plain fine-tuning (SFT)
    beta: float = 0.5  # jsd
    skew: float = 0.1  # skew_forward_kl / skew_reverse_kl
    temperature: float = 1.0  # on both models' logits
    mode: str = "off_policy"  # teacher-forced on the data set's responses, or on_policy (student samples)
    data_mix: float = 0.5  # on_policy: fraction of examples that keep the data set's response
    ce_weight: float = 0.0  # weight of cross-entropy on the reference (data set) responses
    steps: int = 100
    batch_size: int = 8  # examples per optimizer step over all ranks and micro-batches
    micro_batch_size: int | None = None  # per rank; None: the whole per-rank share at once
    learning_rate: float = 3e-4
    warmup_steps: int | None = None  # None: 5% of the steps
    min_lr_ratio: float = 0.1  # cosine decay to this fraction of the learning rate
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_length: int = 512
    max_new_tokens: int = 128  # on_policy sampling
    sample_temperature: float = 1.0
    prompt_format: str = "alpaca"
    seed: int = 0
    eval_every: int = 0  # 0: validation before and after only
    eval_rows: int = 200
    eval_batch_size: int = 8
    select_by: str = "validation_loss"  # or "rouge_l": the kept checkpoint (appendix B selects by Rouge-L)
    rouge_rows: int = 50  # validation rows generated greedily for Rouge-L
    rouge_max_new_tokens: int = 128
    checkpoint_every: int = 0  # 0: no intermediate checkpoints
    chunk_size: int | None = None  # scored positions per loss chunk; None: losses.default_chunk (by device)
    device: str = "auto"
    bf16: bool | None = None  # None: bf16 autocast on accelerators, float32 on CPU
    gradient_checkpointing: bool | None = None  # None: on accelerators
    fsdp: bool = False  # shard the student with FSDP2 (fully_shard) under torchrun; see docs/DISTILLATION.md

    def __post_init__(self) -> None:
        if self.loss not in DIVERGENCES + ("ce",):
            raise ValueError(f"loss must be one of {DIVERGENCES + ('ce',)}, got {self.loss!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.steps < 1 or self.batch_size < 1 or self.max_length < 2:
            raise ValueError("steps, batch_size must be >= 1 and max_length >= 2")
        if self.select_by not in SELECT_BY:
            raise ValueError(f"select_by must be one of {SELECT_BY}, got {self.select_by!r}")
        if not 0 <= self.data_mix <= 1:
            raise ValueError(f"data_mix must be in [0, 1], got {self.data_mix}")

    @classmethod
    def from_dict(cls, data: dict) -> DistillConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown distillation settings {unknown}; allowed: {sorted(known)}")
        return cls(**data)

    @property
    def loss_config(self):  # -> losses.LossConfig (imported here: this module stays torch-free)
        from cbd_engine.losses import LossConfig

        kind = "reverse_kl" if self.loss == "ce" else self.loss
        return LossConfig(kind, self.beta, self.skew, self.temperature, self.chunk_size)

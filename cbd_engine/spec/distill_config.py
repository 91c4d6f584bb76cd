"""Settings of one distillation stage, and their defaults: the chain recipe's, read by the engine, the CLI and the
API alike (app/schemas.py builds its request fields from them). Torch-free, so the service validates without torch.

The defaults were measured (docs/DISTILLATION.md, "The anchor recipe"): forward KL off-policy (teacher-forced on the
data set's responses, the consistent pairing; Minitron distills so), reverse KL where the student's own samples are
scored (on_policy, minillm: MiniLLM's objective).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl")

MODES = ("off_policy", "on_policy", "minillm")
LOSSES = DIVERGENCES + ("ce",)  # ce: plain fine-tuning on the responses (SFT)
LOSS_BY_MODE = {"off_policy": "forward_kl", "on_policy": "reverse_kl", "minillm": "reverse_kl"}
SELECT_BY = ("dev_loss", "rouge_l")  # on the dev rows
# How a teacher cache models the teacher outside its top k (losses.sparse_divergence; measured in docs/DISTILLATION.md)
TEACHER_CACHE_TAILS = ("bucket", "uniform")


@dataclass(frozen=True)
class LossConfig:
    """What the loss functions read of a DistillConfig (cbd_engine.nn.losses)."""

    kind: str = "reverse_kl"
    beta: float = 0.5  # jsd
    skew: float = 0.1  # skew_*_kl
    temperature: float = 1.0
    chunk_size: int | None = None  # scored positions whose logits exist at once; None: default_chunk()
    teacher_cache_tail: str = "bucket"  # sparse_divergence's tail model, when the teacher is a TeacherTopK


@dataclass
class DistillConfig:
    loss: str | None = None  # one of LOSSES; None: LOSS_BY_MODE[mode]
    beta: float = 0.5  # jsd
    skew: float = 0.1  # skew_forward_kl / skew_reverse_kl
    temperature: float = 1.0  # on both models' logits
    mode: str = "off_policy"  # teacher-forced on the data set's responses, on_policy (student samples) or minillm
    data_mix: float = 0.5  # on_policy: fraction of examples that keep the data set's response
    ce_weight: float = 0.0  # weight of cross-entropy on the reference (data set) responses
    steps: int = 1000
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
    # minillm (policy-gradient reverse KL; minillm.py): `batch_size` prompts per batch of rollouts, and each
    # step is one policy update (optimizer step) on all of them; the paper: 4 updates per batch, clipping 0.2
    ppo_epochs: int = 4  # minillm: policy updates on each batch of rollouts
    ppo_clip: float = 0.2  # minillm: the PPO ratio q_theta / q_old is clipped to [1 - ppo_clip, 1 + ppo_clip]
    teacher_mix: float = 0.2  # minillm: rollouts sample from teacher_mix p + (1 - teacher_mix) q (MiniLLM: 0.2)
    lm_data: str | None = None  # minillm: plain-text file for a language-modeling term (MiniLLM's pre-training loss)
    lm_weight: float = 1.0  # minillm: weight of that term
    prompt_format: str = "alpaca"
    seed: int = 0
    eval_every: int = 0  # 0: validation before and after only
    eval_rows: int = 200
    eval_batch_size: int = 8
    select_by: str = "dev_loss"  # or "rouge_l" (appendix B selects by Rouge-L); both on the dev rows
    rouge_rows: int = 50  # validation rows generated greedily for Rouge-L
    rouge_max_new_tokens: int = 128
    checkpoint_every: int = 0  # 0: no intermediate checkpoints
    chunk_size: int | None = None  # scored positions per loss chunk; None: losses.default_chunk (by device)
    device: str = "auto"
    bf16: bool | None = None  # None: bf16 autocast on accelerators, float32 on CPU
    gradient_checkpointing: bool | None = None  # None: on accelerators
    fsdp: bool = False  # shard the student with FSDP2 (fully_shard) under torchrun; see docs/DISTILLATION.md
    compile: bool = False  # torch.compile the decoder stacks of student and teacher (docs/DISTILLATION.md)
    # off_policy: keep the teacher's top-k (this k, e.g. 64) per scored position in a cache built once per (teacher,
    # data, k, temperature) and reused; the teacher is then not loaded at all (cbd_engine.distillation.teacher_cache)
    teacher_cache: int | None = None
    teacher_cache_dir: str | None = None  # None: $CBD_CACHE_DIR/teacher-outputs (~/.cache/cbd/teacher-outputs)
    # the tail outside the cached top-k: "bucket" (one token for both models) or "uniform" (spread evenly over the
    # other tokens, compared with the student's full distribution); read at loss time, not part of the cache key
    teacher_cache_tail: str = "bucket"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.loss is None:
            self.loss = LOSS_BY_MODE[self.mode]
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.steps < 1 or self.batch_size < 1 or self.max_length < 2:
            raise ValueError("steps, batch_size must be >= 1 and max_length >= 2")
        if self.select_by not in SELECT_BY:
            raise ValueError(f"select_by must be one of {SELECT_BY}, got {self.select_by!r}")
        if not 0 <= self.data_mix <= 1:
            raise ValueError(f"data_mix must be in [0, 1], got {self.data_mix}")
        if self.teacher_cache_tail not in TEACHER_CACHE_TAILS:
            raise ValueError(f"teacher_cache_tail must be one of {TEACHER_CACHE_TAILS}, "
                             f"got {self.teacher_cache_tail!r}")
        if self.teacher_cache is not None:
            if isinstance(self.teacher_cache, bool) or not isinstance(self.teacher_cache, int) \
                    or self.teacher_cache < 1:
                raise ValueError("teacher_cache is the number of teacher tokens kept per position (top-k, e.g. 64), "
                                 f"got {self.teacher_cache!r}")
            if self.mode != "off_policy":
                raise ValueError(f"teacher_cache needs mode off_policy: {self.mode} scores the student's own "
                                 "samples, which the teacher must see anew at every step")
        if self.mode == "minillm":
            self._check_minillm()

    def _check_minillm(self) -> None:
        if self.loss != "reverse_kl" or self.temperature != 1 or self.sample_temperature != 1 or self.ce_weight:
            raise ValueError("mode minillm is reverse KL sampled and scored at temperature 1: it needs loss "
                             "reverse_kl, temperature 1, sample_temperature 1 and ce_weight 0 (see lm_data)")
        if self.ppo_epochs < 1 or self.ppo_clip <= 0 or not 0 <= self.teacher_mix < 1 or self.lm_weight < 0:
            raise ValueError("minillm needs ppo_epochs >= 1, ppo_clip > 0, teacher_mix in [0, 1) and lm_weight >= 0")
        if self.max_new_tokens < 1:
            raise ValueError(f"minillm needs max_new_tokens >= 1, got {self.max_new_tokens}")
        if self.checkpoint_every % self.ppo_epochs:
            raise ValueError(f"minillm: checkpoint_every ({self.checkpoint_every}) must be a multiple of ppo_epochs "
                             f"({self.ppo_epochs}), so that checkpoints fall between batches of rollouts")

    @classmethod
    def from_dict(cls, data: dict) -> DistillConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown distillation settings {unknown}; allowed: {sorted(known)}")
        return cls(**data)

    @property
    def loss_config(self) -> LossConfig:
        kind = "reverse_kl" if self.loss == "ce" else self.loss
        return LossConfig(kind, self.beta, self.skew, self.temperature, self.chunk_size, self.teacher_cache_tail)

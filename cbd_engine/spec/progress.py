"""One progress callback for all long work: the CLI shows it as a tqdm bar, the service stores it in the job."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass


class Cancelled(Exception):
    """Raised from inside long work when its `should_stop` check says so; nothing half-written is kept."""


@dataclass(frozen=True)
class ProgressEvent:
    stage: str
    step: int
    total: int
    loss: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None

    @property
    def fraction(self) -> float:
        return self.step / self.total if self.total else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "fraction": self.fraction}


ProgressCallback = Callable[[ProgressEvent], None]


def no_progress(event: ProgressEvent) -> None:
    """The default callback: long work reports to nobody."""


class StageTimer:
    """Turns (step, total) into an ETA for one stage. The rate counts only the steps done since the first update,
    so a resumed stage (whose first update is its checkpoint's step) does not credit this run with earlier work."""

    def __init__(self, stage: str, total: int, callback: ProgressCallback):
        self.stage, self.total, self.callback = stage, total, callback
        self.first_step: int | None = None  # and `started`, both set by the first update
        self.started = 0.0

    def update(self, step: int, loss: float | None = None, tokens_per_second: float | None = None) -> None:
        if self.first_step is None:
            self.first_step, self.started = step, time.monotonic()
        done = step - self.first_step
        eta = (time.monotonic() - self.started) / done * (self.total - step) if done > 0 else None
        self.callback(ProgressEvent(self.stage, step, self.total, loss, tokens_per_second, eta))


class TqdmProgress:
    """A ProgressCallback that draws one tqdm bar per stage (for the command line)."""

    def __init__(self) -> None:
        self._bar = None
        self._stage: str | None = None

    def __call__(self, event: ProgressEvent) -> None:
        from tqdm import tqdm

        if event.stage != self._stage:
            self.close()
            self._bar = tqdm(total=event.total, desc=event.stage, dynamic_ncols=True)
            self._stage = event.stage
        self._bar.n = event.step
        if event.loss is not None:
            self._bar.set_postfix(loss=f"{event.loss:.4f}", refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

"""The ETA that progress bars and the service's jobs show."""

from __future__ import annotations

import pytest

from cbd_engine.spec import progress
from cbd_engine.spec.progress import StageTimer


@pytest.mark.parametrize(("first", "expected_eta"), [(0, 8 * 2.0), (10, 8 * 2.0)])
def test_eta_counts_only_the_steps_of_this_run(monkeypatch, first, expected_eta):
    """A fresh stage (first update at 0) and a resumed one (first update at its checkpoint's step 10) both take
    2 s per step here: 8 steps left is 16 s either way (crediting the resumed run with steps 1-10 would say 1.3 s)."""
    now = {"t": 100.0}
    monkeypatch.setattr(progress.time, "monotonic", lambda: now["t"])
    events = []
    timer = StageTimer("distill", 20, events.append)
    now["t"] += 50.0  # loading before the first update does not count
    timer.update(first)
    now["t"] += 2.0 * (12 - first)
    timer.update(12)
    assert events[0].eta_seconds is None and events[1].eta_seconds == pytest.approx(expected_eta)

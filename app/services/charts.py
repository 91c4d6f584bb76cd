"""Server-side SVG charts of the console: scales, ticks and marks in pixels, drawn by a template as plain SVG.

Written by hand, not with a plotting library: matplotlib (the engine's) draws images, not marks a browser can focus
and hover, and is far too slow to import into the API process; a JavaScript charting library would have to be
vendored. A scatter and a few lines on two linear axes take the few functions below."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

WIDTH, HEIGHT = 640, 320
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 16, 44  # margins: tick labels left and below


@dataclass(frozen=True)
class Mark:
    """One point: where it is drawn, its kind (a CSS class), the words of its tooltip and where it leads."""

    x: float
    y: float
    kind: str
    tip: str
    href: str | None = None


@dataclass(frozen=True)
class Line:
    kind: str
    label: str
    points: str  # the SVG polyline's "x,y x,y ..."


@dataclass(frozen=True)
class Chart:
    x_label: str
    y_label: str
    x_ticks: list[tuple[float, str]]
    y_ticks: list[tuple[float, str]]
    marks: list[Mark] = field(default_factory=list)
    lines: list[Line] = field(default_factory=list)
    reference: tuple[float, str] | None = None  # a horizontal line: its y and its label
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    right: int = WIDTH - RIGHT
    top: int = TOP
    bottom: int = HEIGHT - BOTTOM


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    return [first + i * step for i in range(int(math.ceil((high - first) / step - 1e-9)) + 1)]


def padded(values: Sequence[float], share: float = 0.04) -> tuple[float, float]:
    """The values' range widened a little, so that no point sits on the frame."""
    low, high = min(values), max(values)
    return low - share * (high - low), high + share * (high - low)


def _scale(ticks: list[float], a: float, b: float) -> Callable[[float], float]:
    """Data to pixels, to a tenth of a pixel (a page of 1,000 points stays small)."""
    low, high = ticks[0], ticks[-1]
    return lambda value: round(a + (value - low) / (high - low) * (b - a), 1)


def plot(x_label: str, y_label: str, x_values: Sequence[float], y_values: Sequence[float],
         x_text: Callable[[float], str], y_text: Callable[[float], str]) -> tuple[Chart, Callable, Callable]:
    """Axes covering the values, and the functions from data to pixels."""
    x_ticks, y_ticks = nice_ticks(*padded(x_values)), nice_ticks(*padded(y_values))
    chart = Chart(x_label, y_label, [], [])
    sx, sy = _scale(x_ticks, chart.left, chart.right), _scale(y_ticks, chart.bottom, chart.top)
    chart.x_ticks.extend((sx(t), x_text(t)) for t in x_ticks)
    chart.y_ticks.extend((sy(t), y_text(t)) for t in y_ticks)
    return chart, sx, sy


@dataclass(frozen=True)
class Point:
    params: int
    loss: float
    kind: str  # anchor, model, source
    tip: str
    href: str | None = None


def size_quality(points: Sequence[Point], params_text: Callable[[float], str]) -> Chart | None:
    """Parameters on x, validation loss on y; the source (anchor zero) also as a horizontal reference line."""
    if not points:
        return None
    chart, sx, sy = plot("parameters", "validation loss", [p.params for p in points], [p.loss for p in points],
                         params_text, lambda v: f"{v:.3g}")
    chart.marks.extend(Mark(sx(p.params), sy(p.loss), p.kind, p.tip, p.href) for p in points)
    source = next((p for p in points if p.kind == "source"), None)
    if source is None:
        return chart
    return replace(chart, reference=(sy(source.loss), f"source {source.loss:.3f}"))


def curves(series: dict[str, list[tuple[float, float]]]) -> Chart | None:
    """Loss against step, one polyline per series (train loss, dev loss)."""
    series = {name: values for name, values in series.items() if values}
    if not series:
        return None
    xs = [x for values in series.values() for x, _ in values]
    ys = [y for values in series.values() for _, y in values]
    chart, sx, sy = plot("step", "loss", xs, ys, lambda v: f"{v:g}", lambda v: f"{v:.3g}")
    for name, values in series.items():
        chart.lines.append(Line(name.replace("_", "-"), name.replace("_", " "),
                                " ".join(f"{sx(x)},{sy(y)}" for x, y in values)))
        if len(values) == 1:  # a lone measurement shows as a point
            x, y = values[0]
            chart.marks.append(Mark(sx(x), sy(y), name.replace("_", "-"), f"{name.replace('_', ' ')} {y:.4f} at {x:g}"))
    return chart

"""Percentiles, figures with their floors and targets, the table, and the comparison of two runs."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence


def percentile(samples: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (as numpy's default), ``q`` in 0..100."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: Sequence[float]) -> float:
    clean = [v for v in values if not math.isnan(v)]
    return statistics.median(clean) if clean else math.nan


@dataclass
class Figure:
    """One row of the table.

    ``kind`` says how ``value`` is judged: ``max_ratio``/``min_ratio`` against
    ``limit`` times the floor, ``max_over`` at most ``limit`` above the floor
    (same unit), ``max_abs`` at most ``limit``, ``info`` not judged. ``ok=False``
    fails the row whatever the numbers (lost or reordered bytes).
    """

    name: str
    value: float
    unit: str
    floor: Optional[float] = None
    kind: str = "info"
    limit: Optional[float] = None
    ok: bool = True
    note: str = ""
    reps: list[float] = field(default_factory=list)
    #: the floor of each rep, taken in that same rep: ratio and excess are then the medians
    #: of the per-rep ratios and differences (steadier than a ratio of medians when the
    #: machine's load drifts between reps)
    rep_floors: list[float] = field(default_factory=list)

    def _paired(self) -> list[tuple[float, float]]:
        if self.rep_floors and len(self.rep_floors) == len(self.reps):
            return list(zip(self.reps, self.rep_floors))
        return []

    @property
    def excess(self) -> Optional[float]:
        """How far above its floor, in the figure's unit."""
        pairs = self._paired()
        if pairs:
            return median([v - f for v, f in pairs])
        if self.floor is None or math.isnan(self.floor):
            return None
        return self.value - self.floor

    @property
    def ratio(self) -> Optional[float]:
        pairs = self._paired()
        if pairs:
            return median([v / f for v, f in pairs if f])
        if self.floor is None or self.floor == 0 or math.isnan(self.floor) or math.isnan(self.value):
            return None
        return self.value / self.floor

    @property
    def target(self) -> str:
        if self.kind == "max_ratio":
            return f"<= {self.limit:g}x"
        if self.kind == "min_ratio":
            return f">= {self.limit:g}x"
        if self.kind == "max_over":
            return f"<= floor + {self.limit:g} {self.unit}"
        if self.kind == "max_abs":
            return f"<= {self.limit:g} {self.unit}"
        return "-"

    @property
    def passed(self) -> Optional[bool]:
        if self.kind == "info":
            return None if self.ok else False
        if not self.ok or math.isnan(self.value) or self.limit is None:
            return False
        if self.kind == "max_abs":
            return self.value <= self.limit
        if self.kind == "max_over":
            excess = self.excess
            return excess is not None and excess <= self.limit
        if self.floor is None or math.isnan(self.floor):
            return False
        ratio = self.ratio
        if ratio is None:
            return False
        return ratio <= self.limit if self.kind == "max_ratio" else ratio >= self.limit

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(ratio=self.ratio, excess=self.excess, target=self.target, passed=self.passed)
        return data


def _num(value: Optional[float]) -> str:
    if value is None or math.isnan(value):
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"


def _verdict(passed: Optional[bool]) -> str:
    return "-" if passed is None else ("pass" if passed else "FAIL")


def _notes(fig: Figure) -> str:
    notes = []
    if fig.kind == "max_over" and fig.excess is not None:
        notes.append(f"{fig.excess:+.3g} {fig.unit}")
    if fig.note:
        notes.append(fig.note)
    return f" ({'; '.join(notes)})" if notes else ""


def table(figures: Sequence[Figure]) -> str:
    header = ("figure", "value", "floor", "ratio", "target", "result")
    rows = [header]
    for fig in figures:
        ratio = fig.ratio
        rows.append((
            f"{fig.name} ({fig.unit})",
            _num(fig.value),
            _num(fig.floor),
            "-" if ratio is None else f"{ratio:.2f}x",
            fig.target,
            _verdict(fig.passed) + _notes(fig),
        ))
    return _markdown(rows)


def _markdown(rows: Sequence[Sequence[str]]) -> str:
    """Rows (the first one the header) as an aligned Markdown table."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        lines.append("| " + " | ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) + " |")
        if index == 0:
            lines.append("| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def compare(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Per figure: old and new value, the change in percent, old and new ratio to its floor."""
    before = {f["name"]: f for f in old.get("figures", [])}
    header = ("figure", "before", "after", "change", "ratio before", "ratio after", "result")
    rows = [header]
    for fig in new.get("figures", []):
        prev = before.get(fig["name"])
        if prev is None:
            continue
        a, b = prev.get("value"), fig.get("value")
        change = "-"
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a and \
                not math.isnan(a) and not math.isnan(b):
            change = f"{(b - a) / abs(a) * 100:+.1f}%"
        rows.append((
            f"{fig['name']} ({fig['unit']})", _num(a), _num(b), change,
            "-" if prev.get("ratio") is None else f"{prev['ratio']:.2f}x",
            "-" if fig.get("ratio") is None else f"{fig['ratio']:.2f}x",
            f"{_verdict(prev.get('passed'))} -> {_verdict(fig.get('passed'))}",
        ))
    return _markdown(rows)

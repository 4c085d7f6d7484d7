"""`ParetoFront`: the non-dominated plans of a search and their objectives.

Objectives are named, each with a sense (``"max"`` or ``"min"``); dominance and hypervolume
come from botorch's multi-objective utilities (everything is turned into maximisation first).

    >>> front = ParetoFront.from_points(
    ...     [({"metric": 0.80, "params": 1000}, None), ({"metric": 0.85, "params": 4000}, None),
    ...      ({"metric": 0.79, "params": 2000}, None)],
    ...     senses={"metric": "max", "params": "min"})
    >>> [p.values for p in front]
    [{'metric': 0.8, 'params': 1000}, {'metric': 0.85, 'params': 4000}]
    >>> round(front.hypervolume({"metric": 0.5, "params": 10_000}), 6)
    3000.0
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...plan import Plan, write_atomic
from .plot import lr_of, plot_html, plot_png, run_length

SENSES = ("max", "min")
AXIS_LABELS = {
    "params": "trainable parameters",
    "memory": "training memory (bytes)",
    "latency": "forward-time overhead after merging",
    "adapter_bytes": "adapter file size (bytes)",
}


@dataclass
class FrontPoint:
    values: dict[str, float]
    plan: Plan | None = None
    info: dict[str, Any] = field(default_factory=dict)  # trial number, fidelity, …


@dataclass
class ParetoFront:
    """Non-dominated points, sorted by the first objective's cost (the first "min" objective,
    else the first objective). ``limits`` are the budget as exact costs (``{"params":
    111_400}``): plots draw them and mark the best plan within them, the one a search returns;
    ``metric_name`` names the metric on axes ("accuracy": "validation accuracy")."""

    points: list[FrontPoint]
    senses: dict[str, str]
    evaluated: list[FrontPoint] = field(default_factory=list, repr=False, compare=False)  # every trial, for plots
    limits: dict[str, float] = field(default_factory=dict, compare=False)
    metric_name: str | None = field(default=None, compare=False)
    picked: int | None = field(default=None, compare=False)  # the trial a search returned when not `best` (plots)

    def __post_init__(self) -> None:
        bad = {k: v for k, v in self.senses.items() if v not in SENSES}
        if bad or not self.senses:
            raise ValueError(f"senses must map each objective to 'max' or 'min', got {self.senses}")
        for p in self.points:
            if set(p.values) != set(self.senses):
                raise ValueError(f"point objectives {sorted(p.values)} differ from the front's {sorted(self.senses)}")

    @classmethod
    def from_points(
        cls, points: Iterable[tuple[dict[str, float], Plan | None] | FrontPoint], senses: dict[str, str]
    ) -> ParetoFront:
        """The non-dominated subset of ``points`` (non-finite values are dropped; duplicates
        are kept once)."""
        pts = [p if isinstance(p, FrontPoint) else FrontPoint(dict(p[0]), p[1]) for p in points]
        pts = [p for p in pts if all(math.isfinite(float(p.values[k])) for k in senses)]
        if not pts:
            return cls([], dict(senses))
        from botorch.utils.multi_objective.pareto import is_non_dominated

        keep = is_non_dominated(_maximised(pts, senses), deduplicate=True)
        order = _sort_key(senses)
        front = sorted(
            (p for p, k in zip(pts, keep.tolist()) if k),
            key=lambda p: p.values[order] * (1 if senses[order] == "min" else -1),
        )
        return cls(front, dict(senses))

    def __iter__(self) -> Iterator[FrontPoint]:
        return iter(self.points)

    def __len__(self) -> int:
        return len(self.points)

    def hypervolume(self, reference: dict[str, float]) -> float:
        """Volume dominated by the front and bounded by ``reference`` (a point every useful
        plan beats: e.g. chance accuracy and the parameter budget). Points that do not beat the
        reference in every objective contribute nothing."""
        missing = set(self.senses) - set(reference)
        if missing:
            raise ValueError(f"reference point lacks objective(s) {sorted(missing)}")
        if not self.points:
            return 0.0
        from botorch.utils.multi_objective.hypervolume import Hypervolume

        ref = _maximised([FrontPoint(dict(reference))], self.senses)[0]
        y = _maximised(self.points, self.senses)
        y = y[(y > ref).all(dim=1)]
        return float(Hypervolume(ref).compute(y)) if len(y) else 0.0

    def knee(self) -> FrontPoint:
        """The balanced point: closest to the ideal point once each objective is scaled to
        [0, 1] over the front."""
        if not self.points:
            raise ValueError("the front is empty: no trial completed")
        y = _maximised(self.points, self.senses)
        lo, hi = y.min(dim=0).values, y.max(dim=0).values
        scaled = (y - lo) / torch.where(hi > lo, hi - lo, torch.ones_like(hi))
        return self.points[int(((1 - scaled) ** 2).sum(dim=1).argmin())]

    def best(self, within: dict[str, float] | None = None, objective: str | None = None) -> FrontPoint:
        """The point best in ``objective`` (default: the first "max" objective) among those
        within the limits ``within`` (e.g. ``{"params": 75_000}``: each is an upper bound on a
        "min" objective and a lower bound on a "max" one)."""
        objective = objective or next((k for k, s in self.senses.items() if s == "max"), next(iter(self.senses)))
        within = within or {}
        unknown = set(within) - set(self.senses)
        if unknown:
            raise ValueError(f"limits on unknown objective(s) {sorted(unknown)}; objectives: {sorted(self.senses)}")

        def ok(p: FrontPoint) -> bool:
            return all(p.values[k] <= v if self.senses[k] == "min" else p.values[k] >= v for k, v in within.items())

        fits = [p for p in self.points if ok(p)]
        if not fits:
            raise ValueError(f"no plan on the front is within {within}; the front spans {self.span()}")
        sign = 1 if self.senses[objective] == "max" else -1
        return max(fits, key=lambda p: sign * p.values[objective])

    def span(self) -> dict[str, tuple[float, float]]:
        return {k: (min(p.values[k] for p in self.points), max(p.values[k] for p in self.points)) for k in self.senses}

    # -- export -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "peftplan.front",
            "version": 1,
            "senses": self.senses,
            "points": [
                {"values": p.values, "info": p.info, "plan": p.plan.to_dict() if p.plan else None} for p in self.points
            ],
            **({"limits": self.limits} if self.limits else {}),
            **({"metric_name": self.metric_name} if self.metric_name else {}),
            **({"picked": self.picked} if self.picked is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ParetoFront:
        if d.get("format") != "peftplan.front" or d.get("version") != 1:
            raise ValueError(f"not a peftplan front (format={d.get('format')!r}, version={d.get('version')!r})")
        pts = [
            FrontPoint(
                dict(p["values"]), Plan.from_dict(p["plan"]) if p.get("plan") else None, dict(p.get("info") or {})
            )
            for p in d["points"]
        ]
        picked = d.get("picked")
        return cls(
            pts,
            dict(d["senses"]),
            limits=dict(d.get("limits") or {}),
            metric_name=d.get("metric_name"),
            picked=int(picked) if isinstance(picked, int) and not isinstance(picked, bool) else None,
        )

    def to_json(self, path: str | os.PathLike) -> Path:
        return write_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> ParetoFront:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_csv(self, path: str | os.PathLike, *, every_trial: bool = False) -> Path:
        """One row per point of the front (``every_trial``: per evaluated trial, short screening
        runs included, with an ``on_front`` column): the objectives, the learning rate, how long
        it trained, the info fields and the plan summary."""
        plans = {p.info.get("trial"): p.plan for p in self.points if "trial" in p.info}
        rows = self.evaluated if every_trial else self.points
        info_keys = sorted({k for p in rows for k in p.info} - {"fidelity", "lr"})  # said as "run" and "lr"
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow([*self.senses, "lr", "run", *(["on_front"] if every_trial else []), *info_keys, "plan"])
        for p in rows:
            plan = p.plan or plans.get(p.info.get("trial"))
            lr = lr_of(FrontPoint(p.values, plan, p.info))
            on_front = ["yes" if "trial" in p.info and p.info["trial"] in plans else "no"] if every_trial else []
            w.writerow(
                [
                    *(p.values[k] for k in self.senses),
                    "" if lr is None else f"{lr:.6g}",
                    run_length(p.info.get("fidelity", ""), self),
                    *on_front,
                    *(p.info.get(k, "") for k in info_keys),
                    plan.summary() if plan else "",
                ]
            )
        return write_atomic(path, buf.getvalue())

    def axis_label(self, objective: str) -> str:
        """What an axis of ``objective`` shows, in words.

        >>> ParetoFront([], {"metric": "max", "params": "min"}, metric_name="accuracy").axis_label("metric")
        'validation accuracy (higher is better)'
        """
        if objective == "metric":
            return f"validation {self.metric_name or 'metric'} (higher is better)"
        return AXIS_LABELS.get(
            objective, f"{objective} ({'higher' if self.senses[objective] == 'max' else 'lower'} is better)"
        )

    def plot(
        self,
        path: str | os.PathLike,
        *,
        x: str | None = None,
        y: str | None = None,
        title: str = "Pareto front",
        labels: dict[str, str] | None = None,
        markers: dict[str, dict[str, float]] | None = None,
    ) -> Path:
        """The front's staircase over every evaluated trial (`evaluated`: full runs off the front
        faint, short screening runs fainter, search seeds named in the legend), the returned plan
        (the best within `limits`) as a star, the budget as a dashed line, plus ``markers``
        (``{label: values}``, e.g. a hand-tuned baseline) as labelled points: ``.png``
        (matplotlib) or ``.html`` (plotly, interactive: hover shows each trial's values, learning
        rate and plan). Defaults: x = the first "min" objective (log scale when it spans more than
        10x), y = the first "max" one; axes are named by `axis_label`, or by ``labels``."""
        path = Path(path)
        x = x or _sort_key(self.senses)
        y = y or next((k for k in self.senses if k != x), x)
        axes = {k: (labels or {}).get(k) or self.axis_label(k) for k in self.senses}
        if path.suffix == ".png":
            return plot_png(self, path, x, y, title, axes, markers or {})
        if path.suffix == ".html":
            return plot_html(self, path, x, y, title, axes, markers or {})
        raise ValueError(f"plot() writes .png or .html, got {path.name!r}")


def _maximised(points: list[FrontPoint], senses: dict[str, str]) -> torch.Tensor:
    sign = torch.tensor([1.0 if s == "max" else -1.0 for s in senses.values()], dtype=torch.float64)
    return torch.tensor([[float(p.values[k]) for k in senses] for p in points], dtype=torch.float64) * sign


def _sort_key(senses: dict[str, str]) -> str:
    return next((k for k, s in senses.items() if s == "min"), next(iter(senses)))

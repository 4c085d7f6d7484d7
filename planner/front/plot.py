"""Plots of a `ParetoFront`: a static PNG (matplotlib) and an interactive HTML page (plotly).

    >>> front.plot("front.png"); front.plot("front.html")  # doctest: +SKIP
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

from ...plan import write_atomic

if TYPE_CHECKING:
    from .pareto import ParetoFront


def _staircase(front: ParetoFront, x: str, y: str) -> tuple[list[float], list[float]]:
    """The front as a step line in the (x, y) plane (points sorted by x)."""
    pts = sorted(((p.values[x], p.values[y]) for p in front), key=lambda t: t[0])
    xs, ys = [], []
    for i, (a, b) in enumerate(pts):
        if i:
            xs.append(a)
            ys.append(pts[i - 1][1])
        xs.append(a)
        ys.append(b)
    return xs, ys


def plot_png(front: ParetoFront, path: Path, x: str, y: str, title: str) -> Path:
    # a Figure of its own (no pyplot): the user's process keeps its matplotlib backend
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), dpi=120)
    ax = fig.subplots()
    if len(front):
        xs, ys = _staircase(front, x, y)
        ax.plot(xs, ys, color="tab:blue", alpha=0.5, lw=1.5, drawstyle="default")
        ax.scatter([p.values[x] for p in front], [p.values[y] for p in front], color="tab:blue", zorder=3, label="Pareto front")
        knee = front.knee()
        ax.scatter([knee.values[x]], [knee.values[y]], s=140, facecolors="none", edgecolors="tab:red", lw=2, zorder=4, label="knee")
        ax.legend(loc="best")
    ax.set_xlabel(f"{x} ({front.senses[x]})")
    ax.set_ylabel(f"{y} ({front.senses[y]})")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    return write_atomic(path, png.getvalue())


def plot_html(front: ParetoFront, path: Path, x: str, y: str, title: str) -> Path:
    import plotly.graph_objects as go

    hover = [
        "<br>".join([*(f"{k}: {v:,.4g}" for k, v in p.values.items()), *(f"{k}: {v}" for k, v in p.info.items()),
                     p.plan.summary() if p.plan else ""])  # fmt: skip
        for p in front
    ]
    xs, ys = _staircase(front, x, y) if len(front) else ([], [])
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line={"color": "rgba(31,119,180,0.5)"}, hoverinfo="skip", name="front"))
    fig.add_trace(go.Scatter(x=[p.values[x] for p in front], y=[p.values[y] for p in front], mode="markers",
                             marker={"size": 10}, text=hover, hoverinfo="text", name="plans"))  # fmt: skip
    fig.update_layout(title=title, xaxis_title=f"{x} ({front.senses[x]})", yaxis_title=f"{y} ({front.senses[y]})", template="plotly_white")
    return write_atomic(path, fig.to_html(include_plotlyjs=True, full_html=True))

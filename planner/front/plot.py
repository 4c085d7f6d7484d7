"""Plots of a `ParetoFront`: a static PNG (matplotlib) and an interactive HTML page (plotly).

Both draw the same layers, so a reader understands them without a table: every evaluated
trial (those the front dominates faint, those screened at a shorter fidelity fainter still),
the front as a staircase, the search's baselines named, and any ``markers`` given (results
trained elsewhere, e.g. a hand-tuned baseline) as labelled points.

    >>> front.plot("front.png", labels={"metric": "validation accuracy"},
    ...            markers={"peft LoRA r8 q,v": {"metric": 0.83, "params": 74498}})  # doctest: +SKIP
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

from ...plan import write_atomic

if TYPE_CHECKING:
    from .pareto import FrontPoint, ParetoFront

MARKERS = "s^vDPXhp<>"


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


def layers(front: ParetoFront, x: str, y: str) -> dict[str, list[FrontPoint]]:
    """The evaluated trials split into what is drawn differently: ``screened`` (below the
    front's rung), ``dominated`` (at its rung, off the front), ``baselines`` (named seeds at
    its rung), and the ``front``."""
    rung = max((p.info.get("rung", 0) for p in front), default=0)
    on_front = {p.info.get("trial") for p in front if "trial" in p.info}
    seen = front.evaluated
    return {
        "screened": [p for p in seen if p.info.get("rung", 0) < rung],
        "dominated": [p for p in seen if p.info.get("rung", 0) == rung and p.info.get("trial") not in on_front],
        "baselines": [p for p in seen if p.info.get("rung", 0) == rung and p.info.get("baseline")],
        "front": list(front),
    }


def _log_x(front: ParetoFront, x: str, markers: dict[str, dict[str, float]]) -> bool:
    xs = [p.values[x] for p in [*front, *front.evaluated]] + [m[x] for m in markers.values() if x in m]
    return bool(xs) and min(xs) > 0 and max(xs) / min(xs) > 20


def plot_png(front: ParetoFront, path: Path, x: str, y: str, title: str, axes: dict[str, str],
             markers: dict[str, dict[str, float]]) -> Path:  # fmt: skip
    # a Figure of its own (no pyplot): the user's process keeps its matplotlib backend
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.2, 4.8), dpi=120)
    ax = fig.subplots()
    parts = layers(front, x, y)
    for key, style in (("screened", {"color": "grey", "alpha": 0.3, "s": 16, "label": "screened at a shorter fidelity"}),
                       ("dominated", {"color": "tab:blue", "alpha": 0.3, "s": 22, "label": "evaluated, dominated"})):  # fmt: skip
        if parts[key]:
            ax.scatter([p.values[x] for p in parts[key]], [p.values[y] for p in parts[key]], **style)
    if len(front):
        xs, ys = _staircase(front, x, y)
        ax.plot(xs, ys, color="tab:blue", alpha=0.6, lw=1.5)
        ax.scatter([p.values[x] for p in front], [p.values[y] for p in front], color="tab:blue", s=36, zorder=3, label="Pareto front")
        knee = front.knee()
        ax.scatter([knee.values[x]], [knee.values[y]], s=140, facecolors="none", edgecolors="tab:red", lw=2, zorder=4, label="knee")
    for p in parts["baselines"]:
        ax.annotate(p.info["baseline"], (p.values[x], p.values[y]), textcoords="offset points", xytext=(4, -10), fontsize=7, color="tab:blue")
    for (label, values), marker in zip(markers.items(), MARKERS * 3):
        ax.scatter([values[x]], [values[y]], marker=marker, s=70, zorder=5, label=label)
    if _log_x(front, x, markers):
        ax.set_xscale("log")
    ax.set_xlabel(axes[x] + (" (log scale)" if ax.get_xscale() == "log" else ""))
    ax.set_ylabel(axes[y])
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    return write_atomic(path, png.getvalue())


def plot_html(front: ParetoFront, path: Path, x: str, y: str, title: str, axes: dict[str, str],
              markers: dict[str, dict[str, float]]) -> Path:  # fmt: skip
    fig = html_figure(front, x, y, title, axes, markers)
    return write_atomic(path, fig.to_html(include_plotlyjs=True, full_html=True))


def html_figure(front: ParetoFront, x: str, y: str, title: str, axes: dict[str, str], markers: dict[str, dict[str, float]]):
    """The plotly figure `plot_html` writes."""
    import plotly.graph_objects as go

    def hover(p: FrontPoint) -> str:
        return "<br>".join([*(f"{k}: {v:,.4g}" for k, v in p.values.items()), *(f"{k}: {v}" for k, v in p.info.items()),
                            p.plan.summary() if p.plan else ""])  # fmt: skip

    parts = layers(front, x, y)
    fig = go.Figure()
    for key, name, color in (("screened", "screened at a shorter fidelity", "rgba(128,128,128,0.35)"),
                             ("dominated", "evaluated, dominated", "rgba(31,119,180,0.3)")):  # fmt: skip
        pts = parts[key]
        fig.add_trace(go.Scatter(x=[p.values[x] for p in pts], y=[p.values[y] for p in pts], mode="markers+text", name=name,
                                 marker={"color": color, "size": 7}, text=[p.info.get("baseline", "") for p in pts],
                                 textposition="bottom right", hovertext=[hover(p) for p in pts], hoverinfo="text"))  # fmt: skip
    xs, ys = _staircase(front, x, y) if len(front) else ([], [])
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line={"color": "rgba(31,119,180,0.6)"}, hoverinfo="skip", name="front"))
    fig.add_trace(go.Scatter(x=[p.values[x] for p in front], y=[p.values[y] for p in front], mode="markers+text",
                             marker={"size": 10, "color": "rgb(31,119,180)"}, text=[p.info.get("baseline", "") for p in front],
                             textposition="bottom right", hovertext=[hover(p) for p in front], hoverinfo="text",
                             name="Pareto front"))  # fmt: skip
    for label, values in markers.items():
        fig.add_trace(go.Scatter(x=[values[x]], y=[values[y]], mode="markers", marker={"size": 12, "symbol": "diamond"},
                                 name=label, hovertext=[f"{label}: {values}"], hoverinfo="text"))  # fmt: skip
    fig.update_layout(title=title, xaxis_title=axes[x], yaxis_title=axes[y], template="plotly_white",
                      xaxis_type="log" if _log_x(front, x, markers) else "linear")  # fmt: skip
    return fig

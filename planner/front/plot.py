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
    front's rung), ``dominated`` (at its rung, off the front), ``baselines`` (each named seed's
    best trial at its rung, by ``y``: a seed tried at three learning rates is named once), and
    the ``front``."""
    rung = max((p.info.get("rung", 0) for p in front), default=0)
    on_front = {p.info.get("trial") for p in front if "trial" in p.info}
    seen = front.evaluated
    best: dict[str, FrontPoint] = {}
    sign = 1 if front.senses.get(y) == "max" else -1
    for p in seen:
        name = p.info.get("baseline")
        if (
            name
            and p.info.get("rung", 0) == rung
            and (name not in best or sign * p.values[y] > sign * best[name].values[y])
        ):
            best[name] = p
    return {
        "screened": [p for p in seen if p.info.get("rung", 0) < rung],
        "dominated": [p for p in seen if p.info.get("rung", 0) == rung and p.info.get("trial") not in on_front],
        "baselines": list(best.values()),
        "front": list(front),
    }


def _log_x(front: ParetoFront, x: str, markers: dict[str, dict[str, float]]) -> bool:
    xs = [p.values[x] for p in [*front, *front.evaluated]] + [m[x] for m in markers.values() if x in m]
    return bool(xs) and min(xs) > 0 and max(xs) / min(xs) > 10


def short_count(v: float) -> str:
    """A count in three significant figures: 5k, 74.5k, 22.7M (tick labels, plot legends)."""
    return (
        f"{v / 1e9:.3g}G"
        if v >= 1e9
        else f"{v / 1e6:.3g}M"
        if v >= 1e6
        else f"{v / 1e3:.3g}k"
        if v >= 1e3
        else f"{v:.3g}"
    )


def plot_png(
    front: ParetoFront,
    path: Path,
    x: str,
    y: str,
    title: str,
    axes: dict[str, str],
    markers: dict[str, dict[str, float]],
) -> Path:
    # a Figure of its own (no pyplot): the user's process keeps its matplotlib backend
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.6, 4.8), dpi=120)
    ax = fig.subplots()
    parts = layers(front, x, y)
    for key, style in (
        ("screened", {"color": "grey", "alpha": 0.3, "s": 16, "label": "screened at a shorter fidelity"}),
        ("dominated", {"color": "tab:blue", "alpha": 0.3, "s": 22, "label": "evaluated, dominated"}),
    ):
        if parts[key]:
            ax.scatter([p.values[x] for p in parts[key]], [p.values[y] for p in parts[key]], **style)
    if len(front):
        xs, ys = _staircase(front, x, y)
        ax.plot(xs, ys, color="tab:blue", alpha=0.6, lw=1.5)
        ax.scatter(
            [p.values[x] for p in front],
            [p.values[y] for p in front],
            color="tab:blue",
            s=36,
            zorder=3,
            label="Pareto front",
        )
        knee = front.knee()
        ax.scatter(
            [knee.values[x]],
            [knee.values[y]],
            s=140,
            facecolors="none",
            edgecolors="tab:red",
            lw=2,
            zorder=4,
            label="knee",
        )
    colours = iter(
        ("tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
    )  # not the knee's red
    for p in parts["baselines"][:7]:  # rings in a legend, not text: seeds of equal params share a spot
        ax.scatter(
            [p.values[x]],
            [p.values[y]],
            s=90,
            facecolors="none",
            edgecolors=next(colours),
            lw=1.6,
            zorder=4,
            label=f"search seed '{p.info['baseline']}' (its best trial)",
        )
    for (label, values), marker in zip(markers.items(), MARKERS * 3):
        ax.scatter([values[x]], [values[y]], marker=marker, s=70, zorder=5, label=label)
    if _log_x(front, x, markers):
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_xscale("log")  # ticks at 1, 2 and 5 of each decade, short (5k, 20k, 1M): one decade has room for them
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: short_count(v)))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(axes[x] + (" (log scale)" if ax.get_xscale() == "log" else ""))
    ax.set_ylabel(axes[y])
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # beside the axes: at the budget, points sit where a legend inside would
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    return write_atomic(path, png.getvalue())


def plot_html(
    front: ParetoFront,
    path: Path,
    x: str,
    y: str,
    title: str,
    axes: dict[str, str],
    markers: dict[str, dict[str, float]],
) -> Path:
    fig = html_figure(front, x, y, title, axes, markers)
    return write_atomic(path, fig.to_html(include_plotlyjs=True, full_html=True))


def html_figure(
    front: ParetoFront, x: str, y: str, title: str, axes: dict[str, str], markers: dict[str, dict[str, float]]
):
    """The plotly figure `plot_html` writes."""
    import plotly.graph_objects as go

    def hover(p: FrontPoint) -> str:
        return "<br>".join(
            [
                *(f"{k}: {v:,.4g}" for k, v in p.values.items()),
                *(f"{k}: {v}" for k, v in p.info.items()),
                p.plan.summary() if p.plan else "",
            ]
        )

    parts = layers(front, x, y)
    named = {(p.info.get("trial"), p.info["baseline"]) for p in parts["baselines"]}

    def names(pts: list[FrontPoint]) -> list[str]:  # each seed named once, at its best trial
        return [p.info["baseline"] if (p.info.get("trial"), p.info.get("baseline")) in named else "" for p in pts]

    fig = go.Figure()
    for key, name, color in (
        ("screened", "screened at a shorter fidelity", "rgba(128,128,128,0.35)"),
        ("dominated", "evaluated, dominated", "rgba(31,119,180,0.3)"),
    ):
        pts = parts[key]
        fig.add_trace(
            go.Scatter(
                x=[p.values[x] for p in pts],
                y=[p.values[y] for p in pts],
                mode="markers+text",
                name=name,
                marker={"color": color, "size": 7},
                text=names(pts),
                textposition="bottom right",
                hovertext=[hover(p) for p in pts],
                hoverinfo="text",
            )
        )
    xs, ys = _staircase(front, x, y) if len(front) else ([], [])
    fig.add_trace(
        go.Scatter(x=xs, y=ys, mode="lines", line={"color": "rgba(31,119,180,0.6)"}, hoverinfo="skip", name="front")
    )
    fig.add_trace(
        go.Scatter(
            x=[p.values[x] for p in front],
            y=[p.values[y] for p in front],
            mode="markers+text",
            marker={"size": 10, "color": "rgb(31,119,180)"},
            text=names(list(front)),
            textposition="bottom right",
            hovertext=[hover(p) for p in front],
            hoverinfo="text",
            name="Pareto front",
        )
    )
    for label, values in markers.items():
        fig.add_trace(
            go.Scatter(
                x=[values[x]],
                y=[values[y]],
                mode="markers",
                marker={"size": 12, "symbol": "diamond"},
                name=label,
                hovertext=[f"{label}: {values}"],
                hoverinfo="text",
            )
        )
    fig.update_layout(
        title=title,
        xaxis_title=axes[x],
        yaxis_title=axes[y],
        template="plotly_white",
        xaxis_type="log" if _log_x(front, x, markers) else "linear",
    )
    return fig

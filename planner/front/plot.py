"""Plots of a `ParetoFront`: a static PNG (matplotlib) and an interactive HTML page (plotly).

Both draw the same layers, so a reader understands them without reading the code: every
evaluated trial (short screening runs faintest, named by their length, full runs off the front
faint), the front as a staircase, the plan a search returns (the best within the budget) as a
star, the budget as a dashed line, each search seed's best trial as a ring named in the legend,
and any ``markers`` given (results trained elsewhere, e.g. a hand-tuned baseline) as labelled
points. The HTML's hover shows each trial's objectives, learning rate, run length and plan.

    >>> from peftplan.planner.front import ParetoFront
    >>> front = ParetoFront.from_points(
    ...     [({"metric": 0.80, "params": 1_000}, None), ({"metric": 0.85, "params": 4_000}, None)],
    ...     senses={"metric": "max", "params": "min"})
    >>> baseline = {"peft LoRA r8 q,v": {"metric": 0.83, "params": 74_498}}
    >>> front.plot("front.png", markers=baseline).read_bytes()[1:4]  # the PNG signature
    b'PNG'
    >>> "peft LoRA r8 q,v" in front.plot("front.html", markers=baseline).read_text()
    True
"""

from __future__ import annotations

import html
import io
import math
from pathlib import Path
from typing import TYPE_CHECKING

from ...plan import write_atomic
from ..training.evaluate import Fidelity

if TYPE_CHECKING:
    from .pareto import FrontPoint, ParetoFront

MARKERS = "s^vDPXhp<>"
SEED_COLOURS = ("tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")  # not red
RETURNED = "returned plan (best within the budget)"


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


def returned(front: ParetoFront) -> FrontPoint | None:
    """The point a search returns: the trial it ``picked`` where set (a baseline within one
    standard error of the front's best), else the best on the front within its limits (None:
    an empty front, or none within)."""
    picked = [p for p in front.evaluated if front.picked is not None and p.info.get("trial") == front.picked]
    if picked:
        return picked[-1]
    try:
        return front.best(within={k: v for k, v in front.limits.items() if k in front.senses})
    except ValueError:
        return None


def lr_of(p: FrontPoint) -> float | None:
    """The learning rate ``p`` trained at: its ``lr`` info, else its plan's recipe."""
    if p.info.get("lr") is not None:
        return float(p.info["lr"])
    recipe = p.plan.recipe if p.plan is not None else None
    return recipe.lr if recipe is not None else None


def run_length(fidelity: str, front: ParetoFront) -> str:
    """How long a trial trained, in words, from its stored fidelity (`Fidelity`'s text): the
    full recipe or a share of it is counted in steps of the recipe the front's plans carry.

    >>> from peftplan.planner.front import FrontPoint, ParetoFront
    >>> from peftplan import Plan, Recipe
    >>> front = ParetoFront([FrontPoint({"metric": 0.8}, Plan(sites={}, recipe=Recipe(steps=60)))], {"metric": "max"})
    >>> run_length(str(Fidelity(share=0.05)), front), run_length(str(Fidelity()), front)
    ('3 steps', '60 steps')
    """
    fidelity_of = Fidelity.from_text(fidelity)
    recipe = next((p.plan.recipe for p in front if p.plan is not None and p.plan.recipe is not None), None)
    if fidelity_of is None or fidelity_of.steps is not None or recipe is None or recipe.steps is None:
        return fidelity
    steps = fidelity_of.recipe(recipe).steps
    batches = f" on {fidelity_of.train_batches} batches" if fidelity_of.train_batches else ""
    return f"{steps} step{'s' * (steps != 1)}{batches}"


def short_run(fidelity: str, front: ParetoFront) -> str:
    """The legend name of trials screened at ``fidelity``: "short run (12 steps)"."""
    return f"short run ({run_length(fidelity, front)})" if fidelity else "short run"


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


def readable(v: float) -> str:
    """A value for people: whole numbers with thousands separators, others to 4 significant digits.

    >>> readable(111400.0), readable(0.41234567), readable(0.8125)
    ('111,400', '0.4123', '0.8125')
    """
    return f"{v:,.0f}" if float(v).is_integer() else f"{v:.4g}"


def hover(p: FrontPoint, front: ParetoFront, axes: dict[str, str]) -> str:
    """A trial's hover text: objectives, learning rate, validation loss, run length, seed, plan."""
    lines = [f"{axes.get(k, k)}: {readable(v)}" for k, v in p.values.items()]
    lr = lr_of(p)
    lines += [f"learning rate: {lr:.3g}"] if lr is not None else []
    lines += [f"validation loss: {p.info['validation_loss']:.4g}"] if "validation_loss" in p.info else []
    if "trial" in p.info:
        lines.append(
            f"trial {p.info['trial']}"
            + (f", {run_length(p.info['fidelity'], front)}" if p.info.get("fidelity") else "")
        )
    lines += [f"search seed: {p.info['baseline']}"] if p.info.get("baseline") else []
    lines += [p.plan.summary()] if p.plan is not None else []
    return "<br>".join(lines)


def _log_x(front: ParetoFront, x: str, markers: dict[str, dict[str, float]]) -> bool:
    xs = [p.values[x] for p in [*front, *front.evaluated]] + [m[x] for m in markers.values() if x in m]
    return bool(xs) and min(xs) > 0 and max(xs) / min(xs) > 10


def _screened_groups(front: ParetoFront, pts: list[FrontPoint]) -> dict[str, list[FrontPoint]]:
    groups: dict[str, list[FrontPoint]] = {}
    for p in pts:
        groups.setdefault(short_run(p.info.get("fidelity", ""), front), []).append(p)
    return groups


def budget_label(x: str, limit: float) -> str:
    return f"budget: {short_count(limit)}" + (" params" if x == "params" else "")


def _png_layers(ax, front: ParetoFront, x: str, y: str, markers: dict[str, dict[str, float]]) -> None:
    """The search's layers (short runs, off the front, the front, the returned plan, its seeds) and
    the user's markers, each a legend entry."""
    parts = layers(front, x, y)
    for name, pts in _screened_groups(front, parts["screened"]).items():
        ax.scatter([p.values[x] for p in pts], [p.values[y] for p in pts], color="grey", alpha=0.3, s=16, label=name)
    if parts["dominated"]:
        ax.scatter(
            [p.values[x] for p in parts["dominated"]],
            [p.values[y] for p in parts["dominated"]],
            color="tab:blue",
            alpha=0.3,
            s=22,
            label="off the front",
        )
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
    chosen = returned(front)
    if chosen is not None:
        ax.scatter([chosen.values[x]], [chosen.values[y]], marker="*", s=220, color="tab:red", zorder=6, label=RETURNED)
    # rings in a legend, not text: seeds of equal params share a spot
    for p, colour in zip(parts["baselines"], SEED_COLOURS):
        ax.scatter(
            [p.values[x]],
            [p.values[y]],
            s=90,
            facecolors="none",
            edgecolors=colour,
            lw=1.6,
            zorder=4,
            label=f"search seed '{p.info['baseline']}' (its best trial)",
        )
    for (label, values), marker in zip(markers.items(), MARKERS * 3):  # black: no layer of the search's is
        ax.scatter([values[x]], [values[y]], marker=marker, s=70, zorder=5, label=label, color="black")


def _png_x_axis(ax, front: ParetoFront, x: str, markers: dict[str, dict[str, float]]) -> None:
    """The budget as a dashed line; a log scale with short ticks where x spans over a decade."""
    if x in front.limits:
        ax.axvline(front.limits[x], color="tab:red", ls="--", lw=1, alpha=0.7, label=budget_label(x, front.limits[x]))
    if _log_x(front, x, markers):
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_xscale("log")  # ticks at 1, 2 and 5 of each decade, short (5k, 20k, 1M): one decade has room for them
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: short_count(v)))
        ax.xaxis.set_minor_formatter(NullFormatter())


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
    _png_layers(ax, front, x, y, markers)
    _png_x_axis(ax, front, x, markers)
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
    page = html_figure(front, x, y, title, axes, markers).to_html(include_plotlyjs=True, full_html=True)
    page = page.replace(
        "<head>", f"<head><title>{html.escape(title)}</title>", 1
    )  # plotly writes none: a tab named by the plot
    return write_atomic(path, page)


def _html_markers(fig, markers: dict[str, dict[str, float]], x: str, y: str, axes: dict[str, str]) -> None:
    """The user's markers, black, each with its values in hover."""
    import plotly.graph_objects as go

    for (label, values), symbol in zip(
        markers.items(), ("square", "triangle-up", "triangle-down", "diamond", "cross", "x") * 3
    ):
        text = "<br>".join([label, *(f"{axes.get(k, k)}: {readable(v)}" for k, v in values.items())])
        fig.add_trace(
            go.Scatter(
                x=[values[x]],
                y=[values[y]],
                mode="markers",
                marker={"size": 11, "symbol": symbol, "color": "black"},
                name=label,
                hovertext=[text],
                hoverinfo="text",
            )
        )


def _html_budget(fig, front: ParetoFront, x: str, log: bool) -> None:
    """The budget as a dashed line, named at its top."""
    if x in front.limits:
        limit = front.limits[x]
        fig.add_vline(x=limit, line={"dash": "dash", "color": "rgb(214,39,40)", "width": 1})
        # annotations on a log axis take log10 of the value (shapes do not); left of the line, so it stays inside
        fig.add_annotation(
            x=math.log10(limit) if log else limit,
            y=1,
            yref="paper",
            text=budget_label(x, limit),
            showarrow=False,
            xanchor="right",
            yanchor="top",
            font={"color": "rgb(214,39,40)"},
        )


def html_figure(
    front: ParetoFront, x: str, y: str, title: str, axes: dict[str, str], markers: dict[str, dict[str, float]]
):
    """The plotly figure `plot_html` writes: names in the legend, never as text on the points
    (labels of nearby points would overlap or run off the plot)."""
    import plotly.graph_objects as go

    def scatter(pts: list[FrontPoint], name: str, marker: dict, **kw) -> go.Scatter:
        return go.Scatter(
            x=[p.values[x] for p in pts],
            y=[p.values[y] for p in pts],
            mode="markers",
            name=name,
            marker=marker,
            hovertext=[hover(p, front, axes) for p in pts],
            hoverinfo="text",
            **kw,
        )

    parts = layers(front, x, y)
    fig = go.Figure()
    for name, pts in _screened_groups(front, parts["screened"]).items():
        fig.add_trace(scatter(pts, name, {"color": "rgba(128,128,128,0.35)", "size": 7}))
    fig.add_trace(scatter(parts["dominated"], "off the front", {"color": "rgba(31,119,180,0.3)", "size": 7}))
    xs, ys = _staircase(front, x, y) if len(front) else ([], [])
    fig.add_trace(
        go.Scatter(x=xs, y=ys, mode="lines", line={"color": "rgba(31,119,180,0.6)"}, hoverinfo="skip", name="front")
    )
    fig.add_trace(scatter(list(front), "Pareto front", {"size": 10, "color": "rgb(31,119,180)"}))
    chosen = returned(front)
    if chosen is not None:
        fig.add_trace(scatter([chosen], RETURNED, {"size": 18, "symbol": "star", "color": "rgb(214,39,40)"}))
    for p, colour in zip(parts["baselines"], SEED_COLOURS):
        fig.add_trace(
            scatter(
                [p],
                f"search seed '{p.info['baseline']}' (its best trial)",
                {"size": 14, "symbol": "circle-open", "line": {"width": 2}, "color": colour.removeprefix("tab:")},
            )
        )
    log = _log_x(front, x, markers)
    _html_markers(fig, markers, x, y, axes)
    _html_budget(fig, front, x, log)
    fig.update_layout(
        title=title,
        xaxis_title=axes[x],
        yaxis_title=axes[y],
        template="plotly_white",
        xaxis_type="log" if log else "linear",
        hoverlabel={"align": "left"},
    )
    return fig

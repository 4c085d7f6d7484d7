"""The quality study's plot of one task: the search's trials, its front and every contender on
validation (top), and what the verdicts compare, every contender's dev metric over the seeds
(bottom)."""

from __future__ import annotations

import itertools
import statistics
from pathlib import Path

from common import METRIC_NAMES, METRICS


def plot(name: str, rows: dict, path: Path) -> None:
    """Validation metric against trainable params: the search's trials at the full recipe
    (dominated ones faint) and its front, its screened trials fainter still, the other searches'
    trials, and every contender as a marker named in the legend. The metric axis is cut to the
    band the contenders compete in; whatever lies below it is drawn on its lower edge (contenders
    as open markers) and named under the plot."""
    from matplotlib.figure import Figure

    trials = rows["peftplan search"]["search"]["trials"]
    top = max(t["rung"] for t in trials)
    pts = front_points([t for t in trials if t["rung"] == top])
    markers = [(label, row["runs"][0]) for label, row in rows.items() if label != "peftplan search"]
    best = max([r["val_metric"] for _, r in markers] + [p[1] for p in pts])
    near = [v for v in [r["val_metric"] for _, r in markers] + [p[1] for p in pts] if v >= best - 0.15]
    floor, ceil = min(near) - 0.02, best + 0.01
    fig = Figure(figsize=(15, 11), dpi=100, layout="constrained")
    grid = fig.add_gridspec(2, 2, width_ratios=(1.3, 1), height_ratios=(1.1, 1))
    ax, legend_ax, dev_ax = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, :])
    search_trials(ax, trials, top, pts, floor)
    other_searches(ax, rows, top, floor)
    below = contenders(ax, rows, markers, floor)
    frame(ax, legend_ax, name, floor, ceil)
    screened_low = sum(t["metric"] < floor for t in trials)
    note = (
        f"Top, below {floor:.3f}, drawn on the lower edge: "
        + (", ".join(below) if below else "no contender")
        + (f"; {screened_low} search trials" if screened_low else "")
    )
    note += dev_panel(dev_ax, name, rows)
    fig.text(0.01, 0.01, note, fontsize=7, color="dimgrey", wrap=True)
    fig.get_layout_engine().set(rect=(0, 0.025, 1, 0.975))
    fig.savefig(path)


def front_points(full: list[dict]) -> list[tuple[float, float]]:
    """The Pareto front of trials ``full`` (most metric, fewest params) as sorted ``(params, metric)``."""
    from peftplan.planner.front import ParetoFront

    front = ParetoFront.from_points(
        [({"metric": t["metric"], "params": t["params"]}, None) for t in full], {"metric": "max", "params": "min"}
    )
    return sorted((p.values["params"], p.values["metric"]) for p in front)


def on_floor(ys: list[float], floor: float) -> list[float]:
    """``ys`` with every value under ``floor`` raised to it: drawn on the axis's lower edge."""
    return [max(y, floor) for y in ys]


def dots(ax, ts: list[dict], floor: float, **kw) -> None:
    """Trials ``ts`` as a scatter of metric against params, those under ``floor`` on it."""
    ax.scatter([t["params"] for t in ts], on_floor([t["metric"] for t in ts], floor), **kw)


def search_trials(ax, trials: list[dict], top: int, pts: list[tuple[float, float]], floor: float) -> None:
    """The default search's trials: screened, at the full recipe (``top`` rung) dominated and on
    the front ``pts``, refined, and the front as a step line."""
    full = [t for t in trials if t["rung"] == top]
    on_front = set(pts)
    dots(
        ax,
        [t for t in trials if t["rung"] < top],
        floor,
        s=14,
        color="grey",
        alpha=0.25,
        label="search trials, screened (short runs)",
    )
    dots(
        ax,
        [t for t in full if (t["params"], t["metric"]) not in on_front],
        floor,
        s=26,
        color="tab:blue",
        alpha=0.3,
        label="search trials at the full recipe, dominated",
    )
    dots(
        ax,
        [t for t in full if (t["params"], t["metric"]) in on_front],
        floor,
        s=34,
        color="tab:blue",
        alpha=0.95,
        label="search trials on the front",
    )
    if refined := [t for t in full if t.get("refined")]:
        dots(
            ax,
            refined,
            floor,
            s=40,
            marker="x",
            color="tab:blue",
            label="the best plan at neighbouring learning rates (full recipe)",
        )
    ax.step(
        [p[0] for p in pts],
        on_floor([p[1] for p in pts], floor),
        where="post",
        color="tab:blue",
        lw=1.2,
        label="search front",
    )


def other_searches(ax, rows: dict, top: int, floor: float) -> None:
    """The other searches' trials at the full recipe (``top`` rung; their screened ones left out)."""
    colours = iter(("tab:orange", "tab:green", "tab:purple"))
    for label, row in rows.items():
        if row["kind"] == "search-variant":
            dots(
                ax,
                [t for t in row["search"]["trials"] if t["rung"] == top],
                floor,
                s=18,
                color=next(colours),
                alpha=0.45,
                label=f"{label}: its trials at the full recipe",
            )


def contenders(ax, rows: dict, markers: list[tuple[str, dict]], floor: float) -> list[str]:
    """Every contender of ``markers`` at its params and seed 0's validation metric (open under
    ``floor``, on it), and the search's returned plan as a star; returns those under ``floor``."""
    below = []
    shapes = itertools.cycle("s^vDPXhop<>d8H")
    for i, (label, r) in enumerate(markers):
        y, colour = r["val_metric"], f"C{i % 10}"
        kw = {"facecolors": "none", "edgecolors": colour} if y < floor else {"color": colour}
        if y < floor:
            below.append(f"{label} ({y:.3f})")
        ax.scatter(
            [r["params"]],
            on_floor([y], floor),
            marker=next(shapes),
            s=60,
            zorder=4,
            linewidths=1.3,
            label=f"{label} (lr {rows[label]['lr']:.3g})",
            **kw,
        )
    s = rows["peftplan search"]["runs"][0]
    ax.scatter(
        [s["params"]],
        [s["val_metric"]],
        marker="*",
        s=240,
        color="tab:red",
        zorder=5,
        label="peftplan search: returned plan",
    )
    return below


def frame(ax, legend_ax, name: str, floor: float, ceil: float) -> None:
    """The top panel's axes, cut to ``floor``..``ceil``, and its legend drawn beside it."""
    metric = METRIC_NAMES[METRICS[name]]
    ax.set_ylim(floor - 0.005, ceil)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale, head included)")
    ax.set_ylabel(f"validation {metric} (held out of train.tsv, seed 0)")
    ax.set_title(f"MiniLM-L6 + {name}: every search trial, the front, each contender at its params", fontsize=10)
    ax.grid(alpha=0.3)
    legend_ax.axis("off")
    legend_ax.legend(*ax.get_legend_handles_labels(), fontsize=6.5, loc="center left", frameon=False)


def dev_panel(ax, name: str, rows: dict) -> str:
    """Each contender's dev metric, mean and every seed, sorted, the best tuned uniform LoRA
    as a line: the comparison the goals make, readable where the front's markers overlap at
    the budget. Returns the caption's part naming what lies left of the axis."""
    from peftplan.planner.front.plot import short_count

    metric = METRIC_NAMES[METRICS[name]]
    lora = [k for k, r in rows.items() if r["kind"] in ("lora-qv", "lora-qkvo", "lora-all")]
    mean = {k: statistics.fmean(r["dev_metric"] for r in row["runs"]) for k, row in rows.items()}
    order = sorted(mean, key=mean.get)
    best = max(mean[k] for k in lora)
    left = max(min(mean.values()), best - 0.04)
    colour = {
        "search": "tab:red",
        "full": "tab:pink",
        "lora-qv": "tab:blue",
        "lora-qkvo": "tab:blue",
        "lora-all": "tab:blue",
    }
    cut = []
    for y, label in enumerate(order):
        values = [r["dev_metric"] for r in rows[label]["runs"]]
        c = colour.get(rows[label]["kind"], "dimgrey")
        if mean[label] < left:
            cut.append(f"{label} ({mean[label]:.3f})")
        ax.scatter([max(v, left) for v in values], [y] * len(values), s=12, color=c, alpha=0.45, zorder=3)
        ax.scatter([max(mean[label], left)], [y], s=46, color=c, zorder=4, marker="<" if mean[label] < left else "o")
        ax.annotate(
            f"{mean[label]:.4f}", (max(mean[label], left), y), xytext=(6, 3), textcoords="offset points", fontsize=6.5
        )
    ax.axvline(best, color="tab:blue", ls="--", lw=0.9, label=f"best tuned uniform LoRA ({best:.4f})")
    ax.set_yticks(range(len(order)))
    ax.set_yticklabels([f"{k} · {short_count(rows[k]['runs'][0]['params'])}" for k in order], fontsize=6.5)
    ax.set_xlim(left - 0.004, max(mean.values()) + 0.012)
    seeds = len(next(iter(rows.values()))["runs"])
    ax.set_xlabel(
        f"dev {metric}: mean (large dot) and each of {seeds} seed(s) (small)" if seeds > 1 else f"dev {metric}"
    )
    ax.set_title(f"{name}: dev {metric}, never seen by a search or an lr choice", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", frameon=False)
    return f". Bottom, left of {left:.3f} (drawn on the edge as ◀): " + ", ".join(cut) if cut else ""

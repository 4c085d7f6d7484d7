"""The quality study's front plot: one task's search trials, its front and every contender."""

from __future__ import annotations

import itertools
from pathlib import Path

from common import METRIC_NAMES, METRICS


def plot(name: str, rows: dict, path: Path) -> None:
    """Validation metric against trainable params: the search's trials at the full recipe
    (dominated ones faint) and its front, its screened trials fainter still, the other searches'
    trials, and every contender as a marker named in the legend. The metric axis is cut to the
    band the contenders compete in; whatever lies below it is drawn on its lower edge (contenders
    as open markers) and named under the plot."""
    from matplotlib.figure import Figure

    from peftplan.planner.front import ParetoFront

    metric = METRIC_NAMES[METRICS[name]]
    trials = rows["peftplan search"]["search"]["trials"]
    top = max(t["rung"] for t in trials)
    full = [t for t in trials if t["rung"] == top]
    front = ParetoFront.from_points([({"metric": t["metric"], "params": t["params"]}, None) for t in full],
                                    {"metric": "max", "params": "min"})  # fmt: skip
    pts = sorted((p.values["params"], p.values["metric"]) for p in front)
    on_front = set(pts)
    markers = [(label, row["runs"][0]) for label, row in rows.items() if label != "peftplan search"]
    best = max([r["val_metric"] for _, r in markers] + [p[1] for p in pts])
    near = [v for v in [r["val_metric"] for _, r in markers] + [p[1] for p in pts] if v >= best - 0.15]
    floor, ceil = min(near) - 0.02, best + 0.01
    below: list[str] = []

    def clip(xs, ys, what=None):  # points under the floor sit on it; named ones are listed under the plot
        if what is not None:
            below.extend(f"{what} ({y:.3f})" for y in ys if y < floor)
        return xs, [max(y, floor) for y in ys]

    def dots(ax, ts, **kw):
        xs, ys = clip([t["params"] for t in ts], [t["metric"] for t in ts])
        ax.scatter(xs, ys, **kw)

    fig = Figure(figsize=(11.5, 5.4), dpi=120)
    ax = fig.subplots()
    dots(ax, [t for t in trials if t["rung"] < top], s=14, color="grey", alpha=0.25, label="search trials, screened (short runs)")
    dots(ax, [t for t in full if (t["params"], t["metric"]) not in on_front], s=26, color="tab:blue", alpha=0.3,
         label="search trials at the full recipe, dominated")  # fmt: skip
    dots(ax, [t for t in full if (t["params"], t["metric"]) in on_front], s=34, color="tab:blue", alpha=0.95,
         label="search trials on the front")  # fmt: skip
    if refined := [t for t in full if t.get("refined")]:
        dots(ax, refined, s=40, marker="x", color="tab:blue", label="the best plan at neighbouring learning rates (full recipe)")
    ax.step(*clip([p[0] for p in pts], [p[1] for p in pts]), where="post", color="tab:blue", lw=1.2, label="search front")
    colours = iter(("tab:orange", "tab:green", "tab:purple"))
    for label, row in rows.items():  # the other searches' trials at the full recipe (their screened ones left out)
        if row["kind"] == "search-variant":
            dots(ax, [t for t in row["search"]["trials"] if t["rung"] == top], s=18, color=next(colours), alpha=0.45,
                 label=f"{label}: its trials at the full recipe")  # fmt: skip
    shapes = itertools.cycle("s^vDPXhop<>d8H")
    for i, (label, r) in enumerate(markers):
        y, colour = r["val_metric"], f"C{i % 10}"
        kw = {"facecolors": "none", "edgecolors": colour} if y < floor else {"color": colour}
        ax.scatter(*clip([r["params"]], [y], what=label), marker=next(shapes), s=60, zorder=4, linewidths=1.3,
                   label=f"{label} (lr {rows[label]['lr']:.3g})", **kw)  # fmt: skip
    s = rows["peftplan search"]["runs"][0]
    ax.scatter([s["params"]], [s["val_metric"]], marker="*", s=240, color="tab:red", zorder=5, label="peftplan search: returned plan")
    ax.set_ylim(floor - 0.005, ceil)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale, head included)")
    ax.set_ylabel(f"validation {metric} (held out of train.tsv, seed 0)")
    ax.set_title(f"MiniLM-L6 + {name}: every search trial, the front, and each contender at its params")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    screened_low = sum(t["metric"] < floor for t in trials)
    note = (f"below {floor:.3f}, drawn on the lower edge: " + (", ".join(below) if below else "no contender")
            + (f"; {screened_low} search trials" if screened_low else ""))  # fmt: skip
    fig.text(0.01, 0.01, note, fontsize=7, color="dimgrey", wrap=True)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path)

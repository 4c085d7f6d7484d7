"""Fidelity benchmark: do short trainings rank plans the way the final training does?

A search can afford full trainings for only a few candidates, so most are ranked after a
fraction of the final recipe — the same batch size, warm-up share, schedule shape and
learning rate, compressed to fewer steps (`Recipe.with_steps`). This benchmark measures how
well each such rung predicts the final result:

* Contenders: 12 per task — uniform LoRA at several ranks and placements (r8 on query/value
  at three learning rates, r4 on the four attention projections, r2 on query/value, r3 on the
  MLP, every linear layer at the rank that fits), the proxy plan at the whole budget and at a
  quarter, and three random draws of the default space with random learning rates
  (log-uniform in [2e-4, 5e-3]); and each new dimension of a plan beside the plan it is tried on
  (`DIMENSIONS`: LoRA r8 q,v with LoRA+, B at 16x the rate, and LoRA r8 q,v started from the
  weights' principal directions, PiSSA, and from their mean gradient's, LoRA-GA, each at
  3e-4, 1e-3 and 3e-3, and LoRA+ at the first two), 20 in all.
  Every one trains the classification head fully; the budget is peft's LoRA r=8 on
  query/value (74,498 params, head included).
* Each trains at 5%, 10%, 25% and 100% of the final recipe (AdamW, 6% warm-up then linear
  decay, batch 32, max length 64, `--steps` steps, seed 0) on train.tsv less a stratified
  validation split of 1,000 examples. 200 steps (6,400 examples, about one epoch of the
  training split) because a step of MiniLM takes about 0.9 s on 2 cores: 12 contenders x 2
  tasks x 1.4 final runs then take about 2 hours. Each rung records the validation metric and
  loss and the mean training loss of its last fifth; the full run also the dev metric — the
  final result, which no rung's signal has seen.
* Reported per new dimension: its effect at each rung (validation loss, and the dev metric at
  the full recipe, with it minus without it), so a dimension enters the default space only
  once it moves a final result and the short rungs see the move.
* Reported per task and rung: Spearman's rho and Kendall's tau between each signal (losses
  negated, so higher is better everywhere) and the final dev metric, over the contenders; and
  the cheapest rung whose best signal reaches rho >= 0.8 on every task: the default
  fidelity schedule starts there and ends at the full recipe.

Every finished training is stored as JSON under benchmarks/runs/fidelity/ the moment it ends;
a rerun skips it (same plan, recipe and seed), so the benchmark resumes after an interruption.

``--proxies`` measures the site-scoring proxies instead: on the first task, the head alone and
then each tunable site alone with LoRA r=8 (plus the head) train for half the final recipe at
lr 3e-3; a site's gain is how much its LoRA lowers the validation loss below the head's alone.
Reported: Kendall's tau and Spearman's rho between each proxy's site scores — weights only
(Hill alpha), grad² (Fisher mass), grad norm (its square root: the same ranking, so the same
correlations), activation SVD (EVA's explained variance) — and the gains. Stored under
benchmarks/runs/site-gains/.

    python benchmarks/fidelity.py                         # sst2 + subj, 12 contenders x 4 rungs, 200 steps (~2 h)
    python benchmarks/fidelity.py --report                # the tables from what is stored; trains nothing
    python benchmarks/fidelity.py --results benchmarks/RESULTS.md --plot benchmarks/fidelity.png
    python benchmarks/fidelity.py --proxies --results benchmarks/RESULTS.md   # 37 half-length runs on sst2 (~45 min)
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from pathlib import Path
from typing import NamedTuple

from common import (
    METRIC_NAMES,
    METRICS,
    ROOT,
    RunStore,
    all_linear_ranks,
    examples,
    load_task,
    rank_correlations,
    write_section,
)

RUNGS = (0.05, 0.10, 0.25, 1.0)
STEPS = 200
VALIDATION = (
    1000  # examples held out of train.tsv (stratified): ±1.5 points of accuracy, a third of the eval cost of 20%
)
SIGNALS = {"validation metric": "val_metric", "validation loss": "val_loss", "training loss": "train_loss"}
TARGET = 0.8
STORE = ROOT / "benchmarks" / "runs" / "fidelity"
COMMAND = "python benchmarks/fidelity.py --results benchmarks/RESULTS.md --plot benchmarks/fidelity.png"


class Dimension(NamedTuple):
    """A new dimension of a plan: the contender it is added to, and the `Recipe` fields and
    LoRA site fields that add it."""

    plain: str
    recipe: dict
    sites: dict


DIMENSIONS = {  # contender -> the dimension it adds
    "lora r8 q,v lr 3e-4 + LoRA+ 16x": Dimension("lora r8 q,v lr 3e-4", {"lr_ratio": 16.0}, {}),
    "lora r8 q,v lr 1e-3 + LoRA+ 16x": Dimension("lora r8 q,v lr 1e-3", {"lr_ratio": 16.0}, {}),
    "lora r8 q,v lr 3e-4 + PiSSA start": Dimension("lora r8 q,v lr 3e-4", {}, {"init": "pissa"}),
    "lora r8 q,v lr 1e-3 + PiSSA start": Dimension("lora r8 q,v lr 1e-3", {}, {"init": "pissa"}),
    "lora r8 q,v lr 3e-3 + PiSSA start": Dimension("lora r8 q,v lr 3e-3", {}, {"init": "pissa"}),
    "lora r8 q,v lr 3e-4 + LoRA-GA start": Dimension("lora r8 q,v lr 3e-4", {}, {"init": "lora_ga"}),
    "lora r8 q,v lr 1e-3 + LoRA-GA start": Dimension("lora r8 q,v lr 1e-3", {}, {"init": "lora_ga"}),
    "lora r8 q,v lr 3e-3 + LoRA-GA start": Dimension("lora r8 q,v lr 3e-3", {}, {"init": "lora_ga"}),
}


def contenders(model, task, budget: int) -> dict[str, tuple[dict, float]]:
    """``{name: (plan sites, lr)}``: hand-written placements, proxy plans, random draws."""
    import numpy as np
    import optuna

    from peftplan import lower
    from peftplan.planner.space import default_space

    graph = lower(model)
    head = {s.name: {"method": "full"} for s in graph if s.name.split(".")[0] == "classifier"}

    def lora(roles: list[str], rank: int) -> dict:
        return {
            **{
                s.name: {"method": "lora", "rank": rank, "alpha": 2 * rank}
                for s in graph.select(role=roles)
                if s.op == "linear"
            },
            **head,
        }

    fit = all_linear_ranks(model, budget)
    out = {
        "lora r8 q,v lr 3e-4": (lora(["attn.q", "attn.v"], 8), 3e-4),
        "lora r8 q,v lr 1e-3": (lora(["attn.q", "attn.v"], 8), 1e-3),
        "lora r8 q,v lr 3e-3": (lora(["attn.q", "attn.v"], 8), 3e-3),
        "lora r4 q,k,v,o": (lora(["attn.q", "attn.k", "attn.v", "attn.o"], 4), 1e-3),
        "lora r2 q,v": (lora(["attn.q", "attn.v"], 2), 1e-3),
        "lora r3 mlp": (lora(["mlp"], 3), 1e-3),
        "lora all-linear fit": (
            {**{n: {"method": "lora", "rank": r, "alpha": 2 * r} for n, r in fit.items()}, **head},
            1e-3,
        ),
    }
    for name, dim in DIMENSIONS.items():
        sites, lr = out[dim.plain]
        out[name] = ({n: {**e, **dim.sites} if e["method"] == "lora" else e for n, e in sites.items()}, lr)
    space = default_space(model, budget, task, seed=0)
    for share, lr in ((1.0, 1e-3), (0.25, 2e-3)):
        out[f"proxy {share:.0%}"] = (space.plan_from_params(space.proxy_params(share)).sites, lr)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    rng = np.random.default_rng(0)
    for i in range(3):
        trial = study.ask(space.distributions())
        lr = float(np.exp(rng.uniform(math.log(2e-4), math.log(5e-3))))
        out[f"random {i}"] = (space.plan_from_params(trial.params).sites, round(lr, 6))
    return out


def train_rung(base, sites: dict, task, recipe, rung: float, seed: int) -> dict:
    """Train ``sites`` on a copy of ``base`` for ``rung`` of ``recipe``; the signals, and the
    dev metric at the full recipe."""
    from peftplan import Plan
    from peftplan.backends import apply, count_trainable
    from peftplan.planner.proxy.scores import plan_gradients
    from peftplan.planner.training.evaluate import metric_and_loss
    from peftplan.planner.training.train import train

    plan = Plan(sites=sites)
    model = apply(copy.deepcopy(base), plan, gradients=plan_gradients(base, plan, task, seed=seed))
    steps = max(1, round(rung * recipe.steps))
    run = train(model, task, recipe.with_steps(steps), seed=seed)
    tail = run.losses[-max(1, len(run.losses) // 5) :]
    start = time.perf_counter()
    val_metric, val_loss = metric_and_loss(model, task, task.validation_batches)
    result = {
        "steps": steps,
        "params": count_trainable(model),
        "train_seconds": round(run.seconds, 2),
        "val_metric": val_metric,
        "val_loss": val_loss,
        "train_loss": statistics.fmean(tail),
    }
    if rung == 1.0:
        result["dev_metric"] = metric_and_loss(model, task, task.eval_batches)[0]
    result["eval_seconds"] = round(time.perf_counter() - start, 2)
    return result


def run_all(tasks: list[str], steps: int, store: RunStore, threads: int = 2) -> None:
    import torch

    from peftplan.recipe import Recipe

    torch.set_num_threads(threads)
    started, done = time.perf_counter(), 0
    for name in tasks:
        base, task = load_task(name, validation=VALIDATION)
        budget = 74_498
        print(
            f"{name}: {examples(task.train_batches)} training, {examples(task.validation_batches)} validation, "
            f"{examples(task.eval_batches)} dev examples; budget {budget:,} params",
            flush=True,
        )
        for cname, (sites, lr) in contenders(base, task, budget).items():
            extra = DIMENSIONS[cname].recipe if cname in DIMENSIONS else {}
            recipe = Recipe(lr=lr, steps=steps, warmup=0.06, schedule="linear", batch_size=32, **extra)
            for rung in RUNGS:
                key = f"{name}/{cname}@{rung:g}"
                spec = {"task": name, "sites": sites, "recipe": recipe.to_dict(), "rung": rung, "seed": 0}
                if store.get(key, spec) is not None:
                    continue
                record = store.put(
                    key,
                    spec,
                    {
                        "task": name,
                        "contender": cname,
                        "rung": rung,
                        "lr": lr,
                        **train_rung(base, sites, task, recipe, rung, 0),
                    },
                )
                done += 1
                wall = (time.perf_counter() - started) / 60
                print(
                    f"  {key}: val {record['val_metric']:.4f} (loss {record['val_loss']:.3f})"
                    + (f", dev {record['dev_metric']:.4f}" if "dev_metric" in record else "")
                    + f", {record['params']:,} params, {record['train_seconds']:.0f}+{record['eval_seconds']:.0f} s"
                    f" [{done} trained, {wall:.1f} min]",
                    flush=True,
                )


GAINS = ROOT / "benchmarks" / "runs" / "site-gains"
GAIN_SHARE, GAIN_LR, GAIN_RANK = 0.5, 3e-3, 8


def site_gains(name: str, steps: int, store: RunStore) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """``({site: validation-loss gain}, {proxy: {site: score}})`` on task ``name``."""
    import torch

    from peftplan import lower
    from peftplan.planner.proxy import activation_scores, alpha_scores, grad2_scores
    from peftplan.planner.proxy.options import ProxyOptions
    from peftplan.recipe import Recipe

    torch.set_num_threads(2)
    base, task = load_task(name, validation=VALIDATION)
    graph = lower(base)
    options = ProxyOptions()
    names = options.tuned_sites(graph)
    head = {n: {"method": "full"} for n in options.full_sites(graph)}
    recipe = Recipe(lr=GAIN_LR, steps=steps, warmup=0.06, schedule="linear", batch_size=32)
    losses = {}
    for site in [None, *names]:
        sites = {**head, **({site: {"method": "lora", "rank": GAIN_RANK, "alpha": 2 * GAIN_RANK}} if site else {})}
        key = f"{name}/{site or 'head only'}"
        spec = {"task": name, "sites": sites, "recipe": recipe.to_dict(), "rung": GAIN_SHARE, "seed": 0}
        record = store.get(key, spec)
        if record is None:
            record = store.put(
                key, spec, {"task": name, "site": site, **train_rung(base, sites, task, recipe, GAIN_SHARE, 0)}
            )
            print(f"  {key}: val loss {record['val_loss']:.4f}, val {record['val_metric']:.4f}", flush=True)
        losses[site] = record["val_loss"]
    gains = {n: losses[None] - losses[n] for n in names}
    grad2 = grad2_scores(base, graph, task, names, batches=options.calibration_batches, progress=False)
    proxies = {
        "weights only (Hill alpha)": alpha_scores(base, graph, names),
        "grad²": grad2,
        "grad norm": {n: v**0.5 for n, v in grad2.items()},
        "activation SVD (EVA)": activation_scores(base, graph, task, names, batches=options.calibration_batches),
    }
    return gains, proxies


def proxy_report(name: str, gains: dict[str, float], proxies: dict[str, dict[str, float]]) -> str:
    sites = sorted(gains)
    lines = [
        f"Site gains on {name}: LoRA r={GAIN_RANK} on one site plus the head, {GAIN_SHARE:.0%} of the final recipe at "
        f"lr {GAIN_LR:g}; gain = the head-only validation loss minus the site's ({len(sites)} sites; largest "
        f"{max(gains.values()):.4f}, smallest {min(gains.values()):.4f}).",
        "",
        "| proxy | Kendall τ with the gain | Spearman ρ |",
        "|---|---:|---:|",
    ]
    for label, scores in proxies.items():
        rho, tau = rank_correlations([scores[n] for n in sites], [gains[n] for n in sites])
        lines.append(f"| {label} | {tau:.2f} | {rho:.2f} |")
    best = max(proxies, key=lambda k: rank_correlations([proxies[k][n] for n in sites], [gains[n] for n in sites])[1])
    lines += ["", f"Best proxy by Kendall τ: {best}."]
    return "\n".join(lines)


def correlations(records: list[dict]) -> dict:
    """``{task: {rung: {signal: (rho, tau, n)}}}``, each signal against the final dev metric,
    plus ``n`` contenders with every rung stored."""
    out: dict = {}
    for name in sorted({r["task"] for r in records}):
        mine = [r for r in records if r["task"] == name]
        final = {r["contender"]: r["dev_metric"] for r in mine if r["rung"] == 1.0}
        out[name] = {}
        for rung in RUNGS:
            at = {r["contender"]: r for r in mine if r["rung"] == rung and r["contender"] in final}
            names = sorted(at)
            target = [final[c] for c in names]
            out[name][rung] = {}
            for label, field in SIGNALS.items():
                sign = -1.0 if "loss" in field else 1.0
                rho, tau = rank_correlations([sign * at[c][field] for c in names], target)
                out[name][rung][label] = (rho, tau, len(names))
    return out


def report(records: list[dict], steps: int) -> str:
    corr = correlations(records)
    lines = [
        f"Final recipe: AdamW, 6% warm-up then linear decay, batch 32, max length 64, {steps} steps, seed 0; "
        "the contenders' learning rates as listed in the benchmark. Signals are measured on the validation split "
        f"({VALIDATION:,} examples held out of train.tsv, stratified) or the training batches; the target is the dev metric after the full "
        "recipe. Losses are negated, so a positive correlation means the signal ranks like the final result.",
        "",
    ]
    for name, rungs in corr.items():
        metric = METRIC_NAMES[METRICS[name]]
        lines += [
            f"**{name}** (target: dev {metric}):",
            "",
            "| rung (share of the final steps) | contenders | " + " | ".join(f"{s}: ρ / τ" for s in SIGNALS) + " |",
            "|---|---:|" + "---:|" * len(SIGNALS),
        ]
        for rung, by in rungs.items():
            n = next(iter(by.values()))[2]
            cells = " | ".join(
                f"{rho:.2f} / {tau:.2f}" if not math.isnan(rho) else "n/a" for rho, tau, _ in by.values()
            )
            lines.append(f"| {rung:.0%} ({round(rung * steps)} steps) | {n} | {cells} |")
        lines.append("")
        table = sorted((r for r in records if r["task"] == name and r["rung"] == 1.0), key=lambda r: -r["dev_metric"])
        lines.append(
            "Final runs: " + "; ".join(f"{r['contender']} {r['dev_metric']:.4f} ({r['params']:,})" for r in table)
        )
        lines.append("")
    lines += dimension_lines(records)
    lines.append(verdict(corr))
    return "\n".join(lines)


def dimension_lines(records: list[dict]) -> list[str]:
    """Each new dimension's effect (`DIMENSIONS`), per task and rung: its validation loss and, at
    the full recipe, its dev metric minus those of the same plan without it."""
    at = {(r["task"], r["contender"], r["rung"]): r for r in records}
    lines = []
    for name, dim in DIMENSIONS.items():
        extra, plain = {**dim.recipe, **dim.sites}, dim.plain
        for task in sorted({r["task"] for r in records}):
            pairs = [(rung, at.get((task, name, rung)), at.get((task, plain, rung))) for rung in RUNGS]
            cells = [
                f"{rung:.0%} loss {w['val_loss'] - wo['val_loss']:+.3f}"
                + (f", dev {100 * (w['dev_metric'] - wo['dev_metric']):+.2f} points" if rung == 1.0 else "")
                for rung, w, wo in pairs
                if w is not None and wo is not None
            ]
            if cells:
                said = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items())
                lines.append(f"- {task}, {name} minus {plain} ({said}): " + "; ".join(cells))
    return ["New dimensions, each against the same plan without it:", "", *lines, ""] if lines else []


def verdict(corr: dict) -> str:
    """The cheapest rung below the full recipe whose best signal reaches rho >= TARGET on every task."""
    if not corr:
        return "Nothing stored yet."
    complete = all(by[1.0]["validation metric"][2] >= 12 for by in corr.values())
    for rung in RUNGS[:-1]:
        best = {
            name: max(((v[0], s) for s, v in by[rung].items() if not math.isnan(v[0])), default=(float("nan"), ""))
            for name, by in corr.items()
        }  # (nan: a task with fewer than 3 contenders at this rung)
        if all(rho >= TARGET for rho, _ in best.values()):
            said = ", ".join(f"{n}: {s} ρ = {rho:.2f}" for n, (rho, s) in best.items())
            return f"Cheapest rung reaching ρ ≥ {TARGET} on every task: {rung:.0%} of the final steps ({said})." + (
                "" if complete else " (Partial: fewer than 12 contenders have every rung on some task.)"
            )
    return f"No rung below the full recipe reaches ρ ≥ {TARGET} on every task." + (
        "" if complete else " (Partial: fewer than 12 contenders have every rung on some task.)"
    )


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corr = correlations(records)
    fig, axes = plt.subplots(1, len(corr), figsize=(5 * len(corr), 3.8), squeeze=False, sharey=True)
    for ax, (name, rungs) in zip(axes[0], corr.items()):
        for label in SIGNALS:
            xs = [r * 100 for r in rungs]
            ax.plot(xs, [rungs[r][label][0] for r in rungs], marker="o", label=label)
        ax.axhline(TARGET, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_xticks([r * 100 for r in RUNGS], [f"{r:.0%}" for r in RUNGS])
        ax.set_title(f"{name}: rank correlation with final dev {METRIC_NAMES[METRICS[name]]}")
        ax.set_xlabel("training length (share of the final recipe's steps)")
    axes[0][0].set_ylabel("Spearman ρ over contenders")
    axes[0][0].legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=["sst2", "subj"], choices=sorted(METRICS))
    ap.add_argument("--steps", type=int, default=STEPS, help=f"the final recipe's steps (default {STEPS})")
    ap.add_argument("--store", type=Path, default=STORE, help="where each training's JSON goes")
    ap.add_argument("--report", action="store_true", help="only report what is stored")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 beside another job on 2 cores)")
    ap.add_argument("--results", type=Path, help="write the report into this RESULTS.md's fidelity section")
    ap.add_argument("--plot", type=Path, help="write the correlation plot here (PNG)")
    ap.add_argument("--proxies", action="store_true", help="measure the site-scoring proxies against per-site gains")
    args = ap.parse_args()
    if args.proxies:
        name = args.tasks[0]
        text = proxy_report(name, *site_gains(name, args.steps, RunStore(GAINS)))
        print("\n" + text)
        if args.results:
            command = "python benchmarks/fidelity.py --proxies --results benchmarks/RESULTS.md"
            write_section(args.results, "proxies", f"## Site-scoring proxies — `{command}`\n\n{text}")
        return
    store = RunStore(args.store)
    if not args.report:
        run_all(args.tasks, args.steps, store, args.threads)
    records = [r for r in store.all() if r["task"] in args.tasks and r["spec"]["recipe"]["steps"] == args.steps]
    text = report(records, args.steps)
    print("\n" + text)
    if args.results:
        write_section(args.results, "fidelity", f"## Fidelity — `{COMMAND}`\n\n{text}")
    if args.plot:
        plot(records, args.plot)


if __name__ == "__main__":
    main()

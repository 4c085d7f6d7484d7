"""Demo: search per-site PEFT plans on a real model and real data, against peft's default.

MiniLM-L6 (22M params, offline from its wheel) learns SST-2 sentiment. Every training below
uses one recipe (AdamW, 6% warm-up then linear decay, batch 16, ``--steps`` steps); searches
and learning rates only ever see a validation split held out of train.tsv, and dev.tsv is
read once, for the final table.

1. peft: LoRA r=8 (alpha 16) on every query and value projection — the usual default; its
   trainable-parameter count (classifier head included) becomes the budget. Trained at the
   recipe's untuned 1e-3 and, as a careful user would, at each rate of a small grid (3e-4,
   1e-3, 3e-3), the best chosen on the validation split;
2. peftplan's proxy plan: sensitivity scores and an allocation, no training while planning;
3. peftplan search with its defaults: 16 candidates (uniform LoRA on query/value at three
   learning rates, LoRA on every linear layer and the one-shot allocations once each at the
   best of them, then the sampler's proposals with their own) screened at 5% of the recipe and
   ranked by their validation loss, the best-screened baseline and the best-screened searched
   plan trained in full (2.8 final runs, under the cost cap of 3); prints the Pareto front and
   writes front.png, front.html, plan.json;
4. the best plan within the budget is applied to a fresh model and trained by its own
   recipe (the learning rate the search found), with the baseline's seed and data order.

Prints one table: trainable params, learning rate, what each row cost in trainings of the
recipe, validation and dev accuracy, training time; then where the searched plan's gain over
peft comes from: the learning rate (peft at its best rate of the grid) or the plan. Run from
the repository root: ``make demo``.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import optuna  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import peftplan as pp  # noqa: E402
from peftplan.models import load_minilm, minilm_dir  # noqa: E402
from peftplan.planner.training.evaluate import Fidelity, metric_and_loss  # noqa: E402
from peftplan.planner.training.train import train  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "text" / "sst2"


def peft_baseline(model):
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"], task_type=TaskType.SEQ_CLS
    )
    return get_peft_model(model, config)


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_and_score(model, task, recipe, args, description, cost: float = 1):
    """(trainable params, lr, cost in trainings, validation metric, dev metric, seconds), scored as
    every search trial is (`metric_and_loss`)."""
    run = train(model, task, recipe, seed=args.seed, progress=True, description=description)
    return (
        trainable(model),
        recipe.lr,
        cost,
        metric_and_loss(model, task, task.validation_batches)[0],
        metric_and_loss(model, task, task.eval_batches)[0],
        run.seconds,
    )


def peft_rows(base, task, recipe, args) -> tuple[list[tuple], int]:
    """peft's LoRA r=8 on query/value at the recipe's rate (untuned) and at the best rate of the
    grid ``args.peft_lrs`` by validation accuracy (never by dev); and its trainable params, the
    budget."""
    runs = {}
    for lr in sorted({*args.peft_lrs, recipe.lr}):
        torch.manual_seed(args.seed)  # every rate starts from the same LoRA weights
        model = peft_baseline(copy.deepcopy(base))
        runs[lr] = train_and_score(model, task, replace(recipe, lr=lr), args, f"peft r=8 q,v lr {lr:g}")
    best = max(runs, key=lambda lr: (runs[lr][3], -abs(math.log(lr / recipe.lr))))  # ties: the rate nearer the recipe's
    untuned = ("peft LoRA r=8 on query,value", *runs[recipe.lr], "-")
    tuned = ("peft LoRA r=8 on query,value, lr tuned", *runs[best][:2], len(runs), *runs[best][3:], "-")
    return [untuned, tuned], runs[best][0]


def search_cost(front, recipe) -> float:
    """The search's trainings in units of one run of ``recipe``: every evaluated trial's steps
    (short screening runs count by their share)."""
    steps = [Fidelity.from_text(p.info.get("fidelity", "")) for p in front.evaluated]
    return sum(f.recipe(recipe).steps for f in steps if f is not None) / recipe.steps


def gain_note(rows, plan, base) -> str:
    """Where the searched plan's dev gain over peft at the recipe's rate comes from, in words."""
    untuned, tuned, searched = rows[0], rows[1], rows[-1]
    lr_gain, plan_gain = tuned[5] - untuned[5], searched[5] - tuned[5]
    qv = {n for n, _ in base.named_modules() if n.endswith(("attention.self.query", "attention.self.value"))}
    lora = {n: e for n, e in plan.tuned().items() if e["method"] == "lora"}
    same = set(lora) == qv and {e.get("rank") for e in lora.values()} == {8}
    return (
        f"Where the gain comes from (dev accuracy): searched plan {searched[5]:.4f} vs peft at the recipe's lr "
        f"{untuned[5]:.4f} = {searched[5] - untuned[5]:+.4f}, of which tuning peft's learning rate alone (the best of "
        f"{tuned[3]} rates on validation, {tuned[2]:g}) gives {lr_gain:+.4f} and the plan beyond that {plan_gain:+.4f}"
        f" (the search cost {searched[3]:.1f} trainings)."
        + (
            " The searched plan tunes the same sites at the same rank as peft's LoRA r=8 on query,value: what it "
            "adds is its learning rate."
            if same
            else ""
        )
    )


def arguments(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA, help="folder with train.tsv and dev.tsv (default: shared sst2)")
    ap.add_argument("--steps", type=int, default=200, help="training steps of the final runs")
    ap.add_argument("--batch-size", type=int, default=16, help="batch size of the final runs")
    ap.add_argument("--lr", type=float, default=1e-3, help="the recipe's learning rate (peft's untuned row)")
    ap.add_argument(
        "--peft-lrs",
        type=lambda v: [float(x) for x in v.split(",")],
        default=[3e-4, 1e-3, 3e-3],
        help="learning rates peft's LoRA is tuned over, chosen on validation (comma-separated)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-dev", type=int, default=None, help="score on the first N dev examples (default: all)")
    ap.add_argument(
        "--strategy", default=None, help="search strategy (default: peftplan.search's; tpe, botorch, nsga2, gp, random)"
    )
    ap.add_argument(
        "--trials", type=int, default=None, help="candidates the search screens (default: peftplan.search's, 16)"
    )
    ap.add_argument("--max-train", type=int, default=None, help="keep this many training examples (default: all)")
    ap.add_argument(
        "--validation",
        type=int,
        default=500,
        help="training examples held out (stratified) to score candidates on; dev.tsv is never seen by the search",
    )
    ap.add_argument("--out", type=Path, default=Path("out/demo"), help="where plan.json, the front and the adapters go")
    ap.add_argument("--results", type=Path, help="also write the tables into this RESULTS.md's demo section")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = arguments(argv)
    started = time.perf_counter()
    if not (args.data / "train.tsv").exists():
        print(f"no {args.data / 'train.tsv'}: pass --data FOLDER with train.tsv and dev.tsv", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar says it all
    console = Console(width=150)
    args.out.mkdir(parents=True, exist_ok=True)

    base, task = model_and_task(args)
    recipe = pp.Recipe(lr=args.lr, steps=args.steps, batch_size=args.batch_size)
    console.print(
        f"MiniLM-L6 on {task.name}: {len(task.train_batches)} train batches of {args.batch_size}, "
        f"{sum(len(b['labels']) for b in task.validation_batches)} validation and "
        f"{sum(len(b['labels']) for b in task.eval_batches)} dev examples; every run: {recipe}"
    )
    rows = []

    # 1. peft's uniform LoRA sets the budget; untuned and at the best rate of a small grid
    peft, params = peft_rows(base, task, recipe, args)
    budget = pp.Budget(params=params)
    rows += peft

    # 2. the sensitivity plan alone (no training while planning)
    rows.append(proxy_row(base, task, budget, recipe, args))

    # 3. the multi-objective search, every default
    plan, model, row = searched_row(base, task, budget, recipe, args, console)
    rows.append(row)
    pp.save(model, args.out / "adapters")
    plot_front(plan, rows, task, args.out)
    console.print(results_table(rows, task, args))
    console.print(f"searched plan: {plan.summary()}")
    note = gain_note(rows, plan, base)
    console.print(note, soft_wrap=True)
    if args.results:
        write_results(args, task, recipe, rows, plan.front, budget, plan, note, time.perf_counter() - started)
    console.print(f"wrote {args.out}/plan.json, front.png, front.html and adapters/ (plan.json + adapters.safetensors)")
    over = [name for name, params, *_ in rows if params > budget.params]
    if over:
        console.print(f"[red]over the budget of {budget.params:,} params: {over}[/red]")
        return 1
    return 0


def model_and_task(args) -> tuple:
    """MiniLM-L6 with a new 2-way head (initialised once, shared by every run) and the task of
    ``args.data``: train.tsv less a validation split, dev.tsv for the final table."""
    torch.manual_seed(args.seed)
    base = load_minilm(num_labels=2)
    task = pp.Task.for_sequence_classification(
        minilm_dir(),
        None,
        args.data / "train.tsv",
        args.data / "dev.tsv",
        batch_size=args.batch_size,
        max_train=args.max_train,
        max_dev=args.max_dev,
        seed=args.seed,
        validation=args.validation,
    )
    task.name = args.data.name
    return base, task


def proxy_row(base, task, budget, recipe, args) -> tuple:
    """The sensitivity plan (no training while planning), trained by ``recipe``: its table row."""
    t0 = time.perf_counter()
    proxy = pp.search(base, budget, task=task, strategy="proxy", seed=args.seed, train_modules=["classifier"])
    planning = time.perf_counter() - t0
    model = pp.apply(copy.deepcopy(base), proxy)
    return (
        "peftplan sensitivity plan (proxy)",
        *train_and_score(model, task, recipe, args, "proxy plan"),
        f"{planning:.0f}s",
    )


def searched_row(base, task, budget, recipe, args, console) -> tuple:
    """The search with every default, its front printed and its plan written to plan.json, then
    that file's plan trained by its own recipe: the plan, the trained model and its table row."""
    t0 = time.perf_counter()
    plan = pp.search(
        base,
        budget,
        task=task,
        strategy=args.strategy,
        trials=args.trials,
        seed=args.seed,
        train_modules=["classifier"],
        recipe=recipe,
    )
    planning = time.perf_counter() - t0
    console.print(front_table(plan.front, budget))
    plan.save(args.out / "plan.json")
    model = pp.apply(copy.deepcopy(base), pp.Plan.load(args.out / "plan.json"))
    row = (
        f"peftplan searched plan ({plan.provenance['strategy']})",
        *train_and_score(
            model,
            task,
            pp.Plan.load(args.out / "plan.json").recipe,
            args,
            "searched plan",
            cost=search_cost(plan.front, recipe) + 1,
        ),
        f"{planning:.0f}s",
    )
    return plan, model, row


def plot_front(plan, rows, task, out: Path) -> None:
    """The search's front as front.png and front.html in ``out``, every row's run as a marker."""
    markers = {f"{row[0]} (trained after the search)": {"metric": row[4], "params": row[1]} for row in rows}
    for path in (out / "front.png", out / "front.html"):
        plan.front.plot(
            path,
            title=f"MiniLM-L6 + {task.name}: {plan.provenance['strategy']} search",
            labels={"metric": "validation accuracy"},
            markers=markers,
        )


def results_table(rows, task, args) -> Table:
    table = Table(
        title=f"MiniLM-L6 + {task.name}: final runs with the same recipe ({args.steps} steps of {args.batch_size}), "
        "seed and data order; the searched plan at its own learning rate"
    )
    for col in (
        "tuning",
        "trainable params",
        "lr",
        "trainings",
        "validation accuracy",
        "dev accuracy",
        "train time",
        "planning",
    ):
        table.add_column(col, justify="left" if col == "tuning" else "right")
    for name, params, lr, cost, val, acc, seconds, planned in rows:
        table.add_row(
            name, f"{params:,}", f"{lr:g}", f"{cost:.3g}", f"{val:.4f}", f"{acc:.4f}", f"{seconds:.1f}s", planned
        )
    return table


def write_results(args, task, recipe, rows, front, budget, plan, note: str, wall: float) -> None:
    """The demo's tables as markdown in ``args.results``'s demo section (benchmarks/common.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from common import write_section

    n = {
        k: sum(len(b["labels"]) for b in getattr(task, k))
        for k in ("train_batches", "validation_batches", "eval_batches")
    }
    lines = [
        f"MiniLM-L6 on {task.name}, seed {args.seed}: {n['train_batches']:,} training, {n['validation_batches']:,} "
        f"validation (held out of train.tsv, stratified: the search's) and {n['eval_batches']:,} dev examples; "
        f"every final run {recipe}, the searched plan at its own rate.",
        "",
        "| tuning | trainable params | lr | trainings | validation accuracy | dev accuracy | train time | planning |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {name} | {params:,} | {lr:g} | {cost:.3g} | {val:.4f} | {acc:.4f} | {seconds:.1f} s | {planned} |"
        for name, params, lr, cost, val, acc, seconds, planned in rows
    ]
    lines += ["", note]
    knee = front.knee()
    lines += [
        "",
        f"Pareto front of the search ({plan.provenance['strategy']}, {len(front.evaluated)} evaluations; validation "
        f"accuracy at the top rung), budget {budget.params:,} params:",
        "",
        "| validation accuracy | trainable params | plan |",
        "|---:|---:|---|",
    ]
    for p in front:
        name = f" [{p.info['baseline']}]" if p.info.get("baseline") else ""
        lines.append(
            f"| {p.values['metric']:.4f} | {int(p.values['params']):,} | {p.plan.summary() if p.plan else ''}{name}"
            f"{' (knee)' if p is knee else ''} |"
        )
    lines += ["", f"Returned: {plan.summary()} at lr {plan.recipe.lr:g}. Whole demo: {wall / 60:.1f} min wall."]
    command = "python examples/sst2_demo.py --results benchmarks/RESULTS.md"
    write_section(args.results, "demo", f"## Demo — `make demo` (`{command}`)\n\n" + "\n".join(lines))


def front_table(front, budget) -> Table:
    table = Table(title=f"Pareto front ({len(front)} plans, budget {budget.params:,} params)")
    for col in ("validation accuracy (full recipe)", "trainable params", "plan"):
        table.add_column(col, justify="left" if col == "plan" else "right")
    knee = front.knee()
    for p in front:
        mark = " (knee)" if p is knee else ""
        name = f" [{p.info['baseline']}]" if p.info.get("baseline") else ""
        table.add_row(
            f"{p.values['metric']:.4f}",
            f"{int(p.values['params']):,}",
            (p.plan.summary() if p.plan else "") + name + mark,
        )
    return table


if __name__ == "__main__":
    sys.exit(main())

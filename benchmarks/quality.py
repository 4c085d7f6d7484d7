"""Quality benchmark: does the searched plan beat what users do by hand, on data it never saw?

MiniLM-L6 (the bundled model) with a fresh 2-way head on real tasks of ../shared/data/text.
Every contender trains by one final recipe — AdamW, 6% warm-up then linear decay, batch 32,
max length 64, `steps` steps — on train.tsv less a stratified validation split; learning
rates and plans are chosen on that validation split only, and results are reported on
dev.tsv, which nothing chose anything on. At the same trainable parameters (±2%, head
included) as peft's LoRA r=8 on query/value (74,498):

* peft LoRA r=8 on query/value, r=4 on the four attention projections, and every linear
  layer at the largest rank that fits (``rank_pattern``: r=2, the MLP partly at r=1), each
  at the learning rate of the grid that scores best on validation (the grid is extended by a
  factor 2.5 while the best lies at its edge);
* peft AdaLoRA (q,v, initial rank 12, target rank 8: the same final rank budget) at the best
  rate on validation of {5e-3, 1.25e-2, 3.12e-2}, extended like the others': its singular
  values start at zero and its A, B at std 0.02, so in a short run it barely moves at LoRA's
  rates (mr validation 0.60 at 1e-3 and 2e-3, 0.81 at 1.25e-2; sst2 0.63 at 2e-3), and a
  comparison at LoRA's rate would not be a fair one;
* peft EVA (r=8 on q,v, ``init_lora_weights="eva"``, rho 2) at LoRA q,v's chosen rate;
* a placement probe at that rate too: peft LoRA r=7 on query/value plus r=12 on the pooler's
  dense layer before the head (exactly the same params), a site neither the hand-written
  placements nor the default space tune;
* full scale, on sst2 (the scale's first task, also when ``--tasks`` names others):
  peftplan plans of methods the default space leaves out (`PROBES`: LoRA r7 q,v + SSF on
  every LayerNorm; LoRA r4 q,v + SSF on the other linear layers and the pooler; SSF alone
  everywhere; sparse entries of every linear layer), each at the best on validation of a
  short lr grid, extended like the others': whether anything at this budget gets nearer the
  ceiling than the tuned LoRA placements do;
* full fine-tuning as the ceiling, its lr chosen on validation from {2e-5, 5e-5, 1e-4} (extended
  like the others'): how much any placement at this budget could gain;
* peftplan's proxy plan (one shot, no training while planning) at lr 1e-3;
* peftplan's default search (``pp.search(model, budget, task, recipe=…)`` with every default:
  its strategy, trials, seeds, learning-rate knob and fidelity schedule), its returned plan
  trained at the plan's own recipe;
* with ``--contrast``: the same search promoting by the other signal (validation loss when
  the default screens by the validation metric, and the other way round), for contrast;
* full scale, on sst2 alone, for its front plot: ``random`` search with as many
  evaluations (what seeding and the default strategy add), and the default search at a
  smaller budget (0.1%, 22,714 params) beside peft LoRA r=2 on query/value (19,202, its lr
  tuned like the others).

Why 200 steps (full scale): 200 steps of 32 is 6,400 examples, about one epoch of each task's
training split (5,900–7,500 examples once the 1,000 validation examples are held out) — long
enough that every contender has left the loss plateau of its first tens of steps and ranks on
validation as on dev (benchmarks/fidelity.py: rho 0.96 on sst2 at 200 steps). The study's
~170 trainings take 6-10 hours on 2 cores (a training with its validation and dev passes:
115-165 s on idle cores, 2026-12-06; 220-230 s on cores shared with another run, 2026-12-03),
so it runs over several sittings.

Why sst2, subj and mr: cola was the third task first, but at this recipe peft LoRA r8 q,v
predicts the majority class at every lr of the grid (validation and dev Matthews correlation
0.0000 from 2e-4 to 5e-3, stored under benchmarks/runs/quality/full_cola_*, 2026-12-04): 200
steps do not lift MiniLM-L6 off the majority answer on acceptability, every contender would
tie at 0 and the comparison would say nothing. mr (sentiment like sst2, but other reviews,
4x the dev examples) takes its place; `--tasks cola` still runs it.

The quick scale (2 tasks, 1 seed, 64 steps on 2,048 training examples, 256 validation and 512
dev examples) trains under bf16 autocast: matrix products in bf16, weights and optimizer state
in fp32, every reported score in fp32 (the search scores its own trials under the autocast).
On these cores (AVX-512 BF16) a LoRA step then takes 0.25 s instead of 0.46 s, with the same
loss after 24 steps (batch 32, measured 2026-12-06), which brings the whole quick study from
an empty store under 40 minutes; a CPU without bf16 instructions runs it slower than fp32
would. The full scale trains in fp32.

Final runs on every seed of the scale (the seed sets the head's initialisation, the adapters'
and the data order); lr choices and the search use seed 0. Each finished training is stored
as JSON under benchmarks/runs/quality/ the moment it ends and a rerun skips it, so the study
spans sittings. Costs are counted in optimizer steps (a search's every trial included) and
given as multiples of one final run.

    python benchmarks/quality.py --quick        # sst2 + subj, 1 seed, 64 steps on subsets, bf16 (indicative only)
    python benchmarks/quality.py                # sst2 + subj + mr, 2 seeds, 200 steps
    python benchmarks/quality.py --quick --results benchmarks/RESULTS.md   # a rerun trains only what is not stored
    python benchmarks/quality.py --baselines    # only peft's baselines, the probes and full fine-tuning, on every task
    python benchmarks/quality.py --baselines --stored --tasks sst2 --results benchmarks/RESULTS.md   # report those so far
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import METRICS, ROOT, RunStore, write_section
from contenders import PROBES
from quality_plot import plot
from quality_report import spread, table, verdicts, wall
from quality_study import ADALORA_GRID, FULL_GRID, PROXY_LR, SMALL_BUDGET, STORE, Study


def run_task(
    study: Study,
    name: str,
    extras: bool = False,
    baselines_only: bool = False,
    contrast: bool = False,
    extra_searches: bool = True,
) -> dict:
    """Every contender on task ``name``: ``{label: {"runs": [...], "lr": …, "cost": …}}``;
    ``extras``: also the search at `SMALL_BUDGET` with peft LoRA r2 q,v (lr tuned) beside it,
    and ``random`` search with as many evaluations, for the front plot; ``baselines_only``:
    only the contenders no planner choice touches (peft's, full fine-tuning); ``contrast``:
    also the search promoting by the signal the default does not use (a second search's cost);
    ``extra_searches`` False: with ``extras``, the stored extra searches as they are (of
    whichever planner tree, said so), none trained."""
    print(f"{name}:", flush=True)
    rows = baseline_rows(study, name)
    if extras:
        rows.update(probe_rows(study, name))
    if baselines_only:
        if extras:  # trained now for the row beside the 0.1% search, reported with the searches
            tuned_row(study, name, "lora-qv-r2")
        return rows
    rows.update(planner_rows(study, name))
    variants = search_variants(contrast, extras)
    if extras:
        rows["peft LoRA r2 q,v (beside the 0.1% search)"] = tuned_row(study, name, "lora-qv-r2")
    for label, contender, options in variants:
        try:
            plan, record = study.search(name, stored=not extra_searches, **options)
        except SystemExit:  # not stored, and not to be trained now
            print(f"  {name}: {label} is not stored", flush=True)
            continue
        rows[label] = search_row(study, name, contender, plan, record, "search-variant")
    return rows


def baseline_rows(study: Study, name: str) -> dict:
    """peft's contenders and full fine-tuning on task ``name``, each at its tuned lr (EVA and the
    placement probe at LoRA r8 q,v's), on every seed."""
    rows = {
        label: tuned_row(study, name, kind)
        for kind, label in (
            ("lora-qv", "peft LoRA r8 q,v"),
            ("lora-qkvo", "peft LoRA r4 q,k,v,o"),
            ("lora-all", "peft LoRA all linear (rank_pattern)"),
        )
    }
    rows["peft AdaLoRA (q,v, r 12→8)"] = tuned_row(study, name, "adalora", ADALORA_GRID)
    qv_lr = rows["peft LoRA r8 q,v"]["lr"]
    for kind, label in (
        ("eva", "peft EVA (r8 q,v)"),
        ("lora-qv-pooler", "peft LoRA r7 q,v + r12 pooler (placement probe)"),
    ):
        rows[label] = {
            "runs": [study.baseline(name, kind, qv_lr, s) for s in study.cfg["seeds"]],
            "lr": qv_lr,
            "cost": len(study.cfg["seeds"]),
            "kind": kind,
        }
    rows["full fine-tuning"] = tuned_row(study, name, "full", FULL_GRID)
    return rows


def tuned_row(study: Study, name: str, kind: str, grid: tuple[float, ...] | None = None) -> dict:
    """Baseline ``kind`` on task ``name`` at its best lr on validation (`Study.tuned`), on every seed."""
    seeds = study.cfg["seeds"]
    lr, grid = study.tuned(name, kind, grid)
    runs = [study.baseline(name, kind, lr, s) for s in seeds]
    return {"runs": runs, "lr": lr, "cost": len(grid) + len(seeds) - 1, "grid": grid, "kind": kind}


def probe_rows(study: Study, name: str) -> dict:
    """Every probe of `PROBES` on task ``name``; under ``--stored``, those not trained yet left out."""
    rows = {}
    for kind, (label, _) in PROBES.items():
        try:
            rows[label] = study.probe(name, kind)
        except SystemExit:  # --stored: a probe not trained yet is left out, and said so
            print(f"  {name}: {label} is not trained yet", flush=True)
    return rows


def planner_rows(study: Study, name: str) -> dict:
    """peftplan's proxy plan and default search on task ``name``, on every seed."""
    seeds = study.cfg["seeds"]
    proxy = study.proxy(name)
    rows = {
        "peftplan proxy plan": {
            "runs": [study.plan_run(name, "proxy", proxy, s) for s in seeds],
            "lr": PROXY_LR,
            "cost": len(seeds),
            "kind": "proxy",
        }
    }
    plan, record = study.search(name)
    rows["peftplan search"] = search_row(study, name, "search", plan, record, "search")
    return rows


def search_row(study: Study, name: str, contender: str, plan, record: dict, kind: str) -> dict:
    """A searched ``plan`` trained on every seed, its cost the search's steps and those runs."""
    seeds = study.cfg["seeds"]
    return {
        "runs": [study.plan_run(name, contender, plan, s) for s in seeds],
        "lr": plan.recipe.lr,
        "cost": record["steps"] / study.cfg["steps"] + len(seeds),
        "kind": kind,
        "search": record,
        "summary": plan.summary(),
    }


def search_variants(contrast: bool, extras: bool) -> list[tuple[str, str, dict]]:
    """The searches beside the default: ``(label, contender, options of Study.search)``."""
    variants = []
    if contrast:  # the promotion signal the default does not use
        other = "metric" if default_screen() == "loss" else "loss"
        variants.append((f"peftplan search, screened by {other}", f"search-screen-{other}", {"screen_by": other}))
    if extras:
        variants += [
            ("peftplan random search (as many evaluations)", "search-random", {"strategy": "random"}),
            (f"peftplan search at {SMALL_BUDGET:,} params (0.1%)", "search-small", {"budget": SMALL_BUDGET}),
        ]
    return variants


def reuse(study: Study, results: dict) -> None:
    """Each task's searched plan applied, with its recipe, to every other task of ``results``
    (on every seed): a row "peftplan plan searched on <task>" beside that task's own search."""
    import peftplan as pp

    searched = {name: pp.Plan.from_dict(rows["peftplan search"]["search"]["plan"]) for name, rows in results.items()}
    for target, rows in results.items():
        for source, plan in searched.items():
            if source == target:
                continue
            try:
                runs = [study.plan_run(target, f"reuse-{source}", plan, s) for s in study.cfg["seeds"]]
            except SystemExit:  # --stored: a pair not trained yet is left out, and said so
                print(f"  {target}: the plan searched on {source} is not trained there yet", flush=True)
                continue
            rows[f"peftplan plan searched on {source}"] = {
                "runs": runs,
                "lr": plan.recipe.lr,
                "cost": len(study.cfg["seeds"]),
                "kind": "reuse",
                "source": source,
            }


def default_screen() -> str:
    """What the default search promotes by (`run_search`'s ``screen_by``)."""
    import inspect

    from peftplan.planner.study import run_search

    return inspect.signature(run_search).parameters["screen_by"].default


def main() -> None:
    args = parse_args()
    import torch

    torch.set_num_threads(args.threads)
    scale = "quick" if args.quick else "full"
    study = Study(scale, RunStore(args.store), stored_only=args.stored)
    tasks = args.tasks or study.cfg["tasks"]
    extras_task = study.cfg["tasks"][0] if study.cfg["extras"] else None  # the probes and extra searches: sst2 alone
    started = time.perf_counter()
    if args.baselines:
        results = {name: run_task(study, name, extras=name == extras_task, baselines_only=True) for name in tasks}
        print(
            f"Baselines stored ({(time.perf_counter() - started) / 60:.1f} min wall); the goals need the searches: "
            "run without --baselines."
        )
        if args.results:
            write_baselines(study, results, args)
        return
    results = {
        name: run_task(
            study, name, extras=name == extras_task, contrast=args.contrast, extra_searches=args.extra_searches
        )
        for name in tasks
    }
    if args.reuse:
        reuse(study, results)
    text = report(study, results, args.plots)
    print("\n" + text + f"\n\nWhole benchmark: {(time.perf_counter() - started) / 60:.1f} min wall.")
    if args.results:
        write_section(args.results, f"quality-{scale}", f"## Quality ({scale}) — `{_command(args)}`\n\n{text}")


def parse_args() -> argparse.Namespace:
    """The command line: the scale, the tasks, which contenders, where the store and the report are."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="2 tasks, 1 seed, 64 steps on subsets under bf16 autocast, a higher "
        "lr grid (under 40 min on 2 cores with bf16 instructions)",
    )
    ap.add_argument("--tasks", nargs="+", choices=sorted(METRICS), help="override the scale's tasks")
    ap.add_argument("--store", type=Path, default=STORE)
    ap.add_argument(
        "--stored",
        action="store_true",
        help="report what is stored, training nothing (searches made by another planner tree included, and said so)",
    )
    ap.add_argument(
        "--baselines",
        action="store_true",
        help="train only the contenders no planner choice touches "
        "(peft's baselines, full fine-tuning) on every task, and stop: the searches can follow later",
    )
    ap.add_argument(
        "--contrast",
        action="store_true",
        help="also search promoting by the signal the default search "
        "does not screen by (validation loss or metric), trained and reported beside it: one more search per task",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads for every training (1 beside another job on 2 cores: two 2-thread jobs wait on each other)",
    )
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="also apply each task's searched plan (with its recipe) to every other task: plans that travel",
    )
    ap.add_argument(
        "--no-extra-searches",
        dest="extra_searches",
        action="store_false",
        help="report the first task's extra searches (random, 0.1%%) as stored, of whichever planner tree, "
        "training none: each costs a search",
    )
    ap.add_argument("--results", type=Path, help="write the tables into this RESULTS.md's quality section")
    ap.add_argument("--plots", type=Path, default=ROOT / "benchmarks", help="folder for quality-<scale>-<task>.png")
    return ap.parse_args()


def write_baselines(study: Study, results: dict, args) -> None:
    """The baselines' section of ``args.results``: what no planner choice touches, and how much
    room it leaves a plan."""
    scale = study.scale
    lines = [
        f"Scale {scale}, the contenders no planner choice touches (the searches follow): {study.describe()}",
        "",
    ]
    for name, rows in results.items():
        lines += table(name, rows, study)
    lines += [
        "Room above the tuned placements (measured):",
        "",
        *(f"- {spread(name, rows, study)}" for name, rows in results.items()),
    ]
    write_section(
        args.results,
        f"quality-{scale}-baselines",
        f"## Quality ({scale}), baselines — `{_command(args)}`\n\n" + "\n".join(lines),
    )


def report(study: Study, results: dict, plots: Path) -> str:
    """The study's report: each task's table and plot (written into ``plots``), the goals'
    verdicts and the wall time of every training."""
    lines = [f"Scale {study.scale}: {study.describe()}", ""]
    for name, rows in results.items():
        lines += table(name, rows, study)
        png = plots / f"quality-{study.scale}-{name}.png"
        plot(name, rows, png)
        lines += [f"![{name}]({png.name})", ""]
    lines += ["Goals:", "", *verdicts(results, study)]
    trained = sum(wall(row) for rows in results.values() for row in rows.values())
    lines += [
        "",
        f"Every training and search above took {trained / 60:.1f} min of wall time in all (from an empty store, "
        "the study takes that plus loading the model and data).",
    ]
    return "\n".join(lines)


def _command(args) -> str:
    """The command line that regenerates a section (the flags that shape it)."""
    flags = [
        f
        for f, on in (
            ("--quick", args.quick),
            ("--baselines", args.baselines),
            ("--stored", args.stored),
            ("--contrast", args.contrast),
            ("--reuse", args.reuse),
        )
        if on
    ]
    return " ".join(
        [
            "python benchmarks/quality.py",
            *flags,
            *(["--tasks", *args.tasks] if args.tasks else []),
            "--results benchmarks/RESULTS.md",
        ]
    )


if __name__ == "__main__":
    main()

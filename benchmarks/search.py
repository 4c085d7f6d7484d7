"""Search benchmark: every strategy on MiniLM-L6 + SST-2, hypervolume as evaluations accrue.

Each strategy (random, nsga2, tpe, gp, botorch, proxy) runs one `run_search` per seed, all
with the same budget (75,000 trainable params, the new classification head trained in full
and paid from it), the same search space (`default_space`, built once per seed and shared by
the strategies), the same data subset, learning rate and one fidelity. After each run the
front of its first N completed evaluations (in completion order) is measured against one
reference point, for every N up to the run's length.

* One fidelity, no promotion rungs: with successive halving the first N completions mix rungs,
  the study's front jumps to the highest rung as soon as one completes (metrics of different
  rungs are never compared), and a strategy's curve would follow the promotion schedule
  rather than what it proposed. One rung makes every evaluation cost the same and every
  front comparable.
* Reference point: accuracy 0.5 (chance on SST-2's two balanced classes) and params 75,000
  (the budget). Hypervolume is printed as a fraction of the box between the reference and
  the ideal point (accuracy 1.0 at 0 params), so 1.0 is unreachable and 0 is "nothing beats
  chance within budget".
* Fidelity: 64 AdamW steps of 8 examples at lr 2e-3 (one epoch of 512 examples), scored on
  256 dev examples. At 32 steps of 16 (lr 1e-3 or 3e-3) most plans stayed at chance, so the
  fronts measured luck; at 64 steps of 8 plans reach 0.70-0.82 and differ.
* Seeded strategies (nsga2, tpe, gp, botorch) start with the study's default seed plans (the
  default space's four baselines at the whole budget — uniform LoRA on query/value, every
  linear layer at the rank that fits, the proxy and activation allocations — then proxy plans
  at 5% and 22% of it); random does not; proxy evaluates proxy plans only. The learning rate
  is not searched here (one fixed rate), so the curves compare samplers on placements alone.
* Evaluations are deterministic for a plan, fidelity, lr and seed, so within one seed a plan
  any run already evaluated is not trained again (`CachedEvaluator`: the seeded strategies
  share their seed plans), nor, within a run, a plan the study already has (its trial is
  ``reused``). The curves are what they would be without either; "trained per run" counts
  the rest.
* Spread: ± half the range over seeds (the mean and the two extremes, for two seeds).

Goals, for the default strategy (``--default``, gp): (1) within 12 evaluations its mean
hypervolume reaches 95% of the best mean any strategy reaches at the largest N (32; at
``--quick`` scale, 12, which makes the check weaker: said so in the output); (2) its mean beats
random's at every N of the table.

    python benchmarks/search.py --save run.json   # 6 strategies x 2 seeds x 32 evaluations (73 min on 2 idle cores)
    python benchmarks/search.py --quick           # 6 strategies x 1 seed x 12 evaluations, smaller subsets (9.8 min)
    python benchmarks/search.py --load run.json --default tpe   # the table and goals again, for any strategy

Sizing: an evaluation takes 10-15 s on 2 idle cores (more params, longer); 384 evaluations
less the ~60 served from the cache took 73 min. Runs are sequential, so each run's wall time
also records the machine's load at that moment.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

from peftplan.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA = ROOT.parent / "shared" / "data" / "text" / "sst2"
STRATEGIES = ("random", "nsga2", "tpe", "gp", "botorch", "proxy")
BUDGET = 75_000
REFERENCE = {"metric": 0.5, "params": BUDGET}
BOX = (1.0 - REFERENCE["metric"]) * REFERENCE["params"]  # the hypervolume of the ideal point
BATCH, MAX_LENGTH, LR = 8, 32, 2e-3
# steps, training examples (steps * BATCH / examples epochs), validation examples, table's N, seeds
SCALES = {
    "full": {"steps": 64, "train": 512, "dev": 256, "evals": (4, 8, 12, 16, 32), "seeds": (0, 1)},
    "quick": {"steps": 64, "train": 384, "dev": 160, "evals": (4, 8, 12), "seeds": (0,)},
}
GOAL_WITHIN, GOAL_SHARE = 12, 0.95
# candidates train at a constant rate without warm-up or clipping: the rule this benchmark measured
RECIPE = Recipe(lr=LR, warmup=0.0, schedule="constant", clip=None)


def load_task(scale: dict):
    import torch
    from transformers import AutoTokenizer

    from peftplan.models import load_minilm, minilm_dir
    from peftplan.planner.training.task import Task

    torch.manual_seed(0)  # the new head's initialisation, the same for every run
    model = load_minilm(num_labels=2)
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    task = Task.for_sequence_classification(
        model,
        tokenizer,
        DATA / "train.tsv",
        DATA / "dev.tsv",
        batch_size=BATCH,
        max_length=MAX_LENGTH,
        max_train=scale["train"],
        validation=scale["dev"],
    )
    return model, task


def seconds_per_eval(model, task, space, fidelity, threads: int, cache: CachedEvaluator) -> float:
    """One evaluation of the full-budget proxy plan (a seed plan, so not wasted), timed."""
    import torch

    torch.set_num_threads(threads)
    result = cache(model, space.plan_from_params(space.proxy_params(1.0)), task, fidelity, recipe=RECIPE, seed=0)
    if not result.ok:
        raise SystemExit(f"the timing evaluation failed: {result.failed}")
    return result.seconds


class CachedEvaluator:
    """`evaluate`, remembering each (plan, fidelity, recipe, seed): training is deterministic for
    those, so a plan another run of the same seed evaluated (the seeded strategies share their
    seed plans) gets the same result without training again. Curves are unchanged; ``hits``
    counts what was not re-run."""

    def __init__(self) -> None:
        self.results: dict[tuple, object] = {}
        self.hits = 0

    def __call__(self, base, plan, task, fidelity, *, recipe, seed: int):
        from peftplan.planner.training.evaluate import evaluate

        key = (json.dumps(plan.sites, sort_keys=True), str(fidelity), str(recipe), seed)
        if key in self.results:
            self.hits += 1
        else:
            self.results[key] = evaluate(base, plan, task, fidelity, recipe=recipe, seed=seed)
        return self.results[key]


def run(
    model, task, space, strategy: str, seed: int, trials: int, fidelity, threads: int, cache: CachedEvaluator
) -> dict:
    """One search; its completed trials' values in completion order, wall time, what was skipped."""
    import optuna

    from peftplan.planner.study import run_search

    storage = optuna.storages.InMemoryStorage()
    name = f"bench-{strategy}-{seed}"
    start, hits = time.perf_counter(), cache.hits
    run_search(
        model,
        BUDGET,
        task,
        strategy=strategy,
        trials=trials,
        storage=storage,
        study_name=name,
        seed=seed,
        fidelities=[fidelity],
        space=space,
        progress=False,
        recipe=RECIPE,
        threads=threads,
        evaluator=cache,
        seeds=6,
    )
    wall = time.perf_counter() - start
    trials_ = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    done = sorted(
        (t for t in trials_ if t.state == optuna.trial.TrialState.COMPLETE),
        key=lambda t: (t.datetime_complete, t.number),
    )
    objectives = tuple(space.objectives)
    return {
        "values": [dict(zip(objectives, t.values)) for t in done],
        "wall": wall,
        "train": sum(t.user_attrs.get("seconds", 0.0) for t in trials_),
        "cached": cache.hits - hits + sum("reused" in t.user_attrs for t in done),
        "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in trials_),
        "failed": sum(t.state == optuna.trial.TrialState.FAIL for t in trials_),
    }


def hypervolume_curve(values: list[dict[str, float]], senses: dict[str, str]) -> list[float]:
    """Normalised hypervolume of the front of the first N values, for N = 1 … len(values)."""
    from peftplan.planner.front import ParetoFront

    return [
        ParetoFront.from_points([(v, None) for v in values[:n]], senses).hypervolume(REFERENCE) / BOX
        for n in range(1, len(values) + 1)
    ]


def at(curve: list[float], n: int) -> float | None:
    return curve[n - 1] if len(curve) >= n else None


def mean_at(curves: list[list[float]], n: int) -> float | None:
    vals = [at(c, n) for c in curves]
    return None if None in vals else statistics.fmean(vals)


def cell(curves: list[list[float]], n: int) -> str:
    vals = [at(c, n) for c in curves]
    if None in vals:
        return "n/a (fewer completed)"
    if len(vals) == 1:
        return f"{vals[0]:.4f}"
    return f"{statistics.fmean(vals):.4f} ± {(max(vals) - min(vals)) / 2:.4f}"


def verdicts(curves: dict[str, list[list[float]]], evals: tuple[int, ...], default: str, quick: bool) -> list[str]:
    top = evals[-1]
    means = {s: mean_at(c, top) for s, c in curves.items() if mean_at(c, top) is not None}
    best_strategy = max(means, key=means.get)
    best = means[best_strategy]
    mine = [mean_at(curves[default], n) for n in range(1, top + 1)]
    reached = next((n for n, v in enumerate(mine, 1) if v is not None and v >= GOAL_SHARE * best), None)
    ok1 = reached is not None and reached <= GOAL_WITHIN
    scale = (
        f" (quick scale: the best is taken at {top} evaluations, not 32, so this is a weaker check)" if top < 32 else ""
    )
    by = mean_at(curves[default], GOAL_WITHIN)
    mine_at = "n/a" if by is None else f"{by:.4f} ({by / best:.1%} of best)" if best else f"{by:.4f}"
    lines = [
        f"Goal 1 — {default} reaches {GOAL_SHARE:.0%} of the best hypervolume at {top} evaluations "
        f"({best_strategy}: {best:.4f}; target {GOAL_SHARE * best:.4f}) within {GOAL_WITHIN} evaluations: "
        f"{'PASS' if ok1 else 'MISS'} — {default} at {GOAL_WITHIN}: {mine_at}; "
        f"first reached at N = {reached or 'never'}{scale}"
    ]
    if "random" in curves:
        pairs = [(n, mean_at(curves[default], n), mean_at(curves["random"], n)) for n in evals]
        ok2 = all(d is not None and r is not None and d > r for _, d, r in pairs)
        detail = ", ".join(f"N={n}: {d:.4f} vs {r:.4f}" for n, d, r in pairs if d is not None and r is not None)
        lines.append(f"Goal 2 — {default} beats random at every N: {'PASS' if ok2 else 'MISS'} — {detail}")
    if quick:
        lines.append("Quick scale: one seed, 12 evaluations, smaller subsets; the verdicts are indicative only.")
    return lines


def report(runs: list[dict], evals: tuple[int, ...], seeds: tuple[int, ...], default: str, quick: bool) -> None:
    """The table and the goals' verdicts from the runs' records (fresh or ``--load``ed)."""
    by = {s: [r for r in runs if r["strategy"] == s] for s in STRATEGIES}
    by = {s: mine for s, mine in by.items() if mine}
    curves = {s: [r["curve"] for r in mine] for s, mine in by.items()}
    print(
        f"\nHypervolume (fraction of the box from accuracy 0.5 / {BUDGET:,} params to accuracy 1.0 / 0 params) of the "
        f"front of the first N evaluations, mean ± half-range over seeds {list(seeds)}:\n"
    )
    print("| strategy | " + " | ".join(f"N = {n}" for n in evals) + " | wall per run | trained per run |")
    print("|---|" + "---:|" * (len(evals) + 2))
    for s, mine in by.items():
        wall = statistics.fmean(r["wall"] for r in mine)
        trained = statistics.fmean(len(r["values"]) - r["cached"] for r in mine)
        print(f"| {s} | " + " | ".join(cell(curves[s], n) for n in evals) + f" | {wall:.0f} s | {trained:.1f} |")
    print()
    if default in curves:
        for line in verdicts(curves, evals, default, quick):
            print(line)


def save(path: Path, record: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


def main() -> None:
    args = parse_args()
    if args.load:
        record = json.loads(args.load.read_text())
        report(record["runs"], tuple(record["evals"]), tuple(record["seeds"]), args.default, record["quick"])
        return

    import optuna
    import torch

    from peftplan.planner.training.evaluate import Fidelity

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    torch.set_num_threads(args.threads)
    scale = SCALES["quick" if args.quick else "full"]
    evals, seeds, trials = scale["evals"], scale["seeds"], scale["evals"][-1]
    fidelity = Fidelity(steps=scale["steps"])
    started = time.perf_counter()
    model, task = load_task(scale)
    spaces, space_s = seed_spaces(model, task, seeds)
    caches = {seed: CachedEvaluator() for seed in seeds}
    per_eval = seconds_per_eval(model, task, spaces[seeds[0]], fidelity, args.threads, caches[seeds[0]])
    estimate = len(STRATEGIES) * len(seeds) * trials * per_eval
    print(
        f"Task: sst2, {len(task.train_batches) * BATCH} training examples ({len(task.train_batches)} batches of {BATCH}, "
        f"max length {MAX_LENGTH}), {sum(len(b['labels']) for b in task.validation_batches)} validation examples held out of train.tsv; "
        f"fidelity {fidelity} (one rung), lr {LR}, budget {BUDGET:,} params, reference {REFERENCE}, {args.threads} threads"
    )
    print(
        f"Plan: {len(STRATEGIES)} strategies x {len(seeds)} seed(s) x {trials} evaluations x {per_eval:.1f} s/eval "
        f"(one timed evaluation) = {estimate / 60:.1f} min of training at most (plans evaluated before in the same "
        f"seed are not trained again), + samplers' time (space: {space_s:.1f} s per seed)\n",
        flush=True,
    )
    record = run_all(model, task, spaces, caches, fidelity, scale, args)
    report(record["runs"], evals, seeds, args.default, args.quick)
    print(f"\nWhole benchmark: {(time.perf_counter() - started) / 60:.1f} min wall.")


def parse_args() -> argparse.Namespace:
    """The command line: the scale, the threads, the strategy the goals are for, a saved run."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, up to 12 evaluations, smaller subsets (~10 min)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per evaluation (default 2)")
    from peftplan.planner.strategies import DEFAULT

    ap.add_argument(
        "--default", default=DEFAULT, choices=STRATEGIES, help=f"the strategy the goals are checked for ({DEFAULT})"
    )
    ap.add_argument(
        "--save", type=Path, help="write every run's evaluations and curve to this JSON file, after each run"
    )
    ap.add_argument(
        "--load", type=Path, help="report a saved run (its table and the goals for --default); trains nothing"
    )
    return ap.parse_args()


def seed_spaces(model, task, seeds: tuple[int, ...]) -> tuple[dict, float]:
    """The default space of each seed, and the seconds the last one took to build."""
    from peftplan.planner.space import default_space

    spaces = {}
    for seed in seeds:
        t0 = time.perf_counter()
        spaces[seed] = default_space(model, BUDGET, task, seed=seed)
        space_s = time.perf_counter() - t0
    return spaces, space_s


def run_all(model, task, spaces: dict, caches: dict, fidelity, scale: dict, args) -> dict:
    """Every strategy on every seed of ``scale``, each run's line printed and, with ``--save``,
    the record written after it: the record."""
    evals, seeds, trials = scale["evals"], scale["seeds"], scale["evals"][-1]
    record = {
        "quick": args.quick,
        "evals": list(evals),
        "seeds": list(seeds),
        "scale": scale,
        "batch": BATCH,
        "lr": LR,
        "budget": BUDGET,
        "reference": REFERENCE,
        "threads": args.threads,
        "runs": [],
    }
    for seed in seeds:
        for strategy in STRATEGIES:
            out = run(model, task, spaces[seed], strategy, seed, trials, fidelity, args.threads, caches[seed])
            curve = hypervolume_curve(out["values"], spaces[seed].objectives)
            record["runs"].append({"strategy": strategy, "seed": seed, "curve": curve, **out})
            if args.save:
                save(args.save, record)
            shown = " ".join(f"@{n}={at(curve, n):.4f}" if at(curve, n) is not None else f"@{n}=n/a" for n in evals)
            print(
                f"{strategy:8s} seed {seed}: {len(out['values'])} evaluations ({out['cached']} seen before, "
                f"{out['pruned']} skipped, {out['failed']} failed) in {out['wall']:.0f} s; HV {shown}",
                flush=True,
            )
    return record


if __name__ == "__main__":
    main()

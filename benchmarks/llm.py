"""Language-model study: does a searched plan beat what LLM fine-tuners do by default, on a real
instruction-tuned model and data it never chose anything on?

SmolLM2-135M-Instruct (the bundled ``smollm2``, from its GGUF file) on four tasks made from
../shared/data/text (`llm_tasks`): sst2 (sentiment), subj (subjectivity) and cola
(acceptability) as chat instructions with one-word answers, scored by choice accuracy (the
likelier of the two answers); and mr-text, next-token loss on movie-review texts (scored by
perplexity). At the trainable parameters of peft's LoRA r8 on q,v (460,800, ±2%), the
contenders of `llm_contenders.KINDS` — peft's default, the Unsloth and axolotl placements at
the budget and once at their own ranks, DoRA, rsLoRA, PiSSA, EVA, LoRA-GA, LoRA+, full
fine-tuning as the ceiling — and peftplan's proxy plan, its default search and its search over
every method; and (``--searches loraplus``) the default search given a recipe with LoRA+ (B's rate
16x A's in every trial, as a user may write it), to measure that dimension inside a search.

Protocol: every contender trains by one recipe (AdamW, 6% warm-up, linear decay, batches of 8,
`steps` steps) on train.tsv less a held-out validation split; each learning rate is the best on
that validation split: a grid on seed 0, extended by 2.5x while the best lies at its edge, then
seed 0's two best rates on every seed, the better validation mean chosen; the plan and the rate
of a search are chosen on it too; results are dev.tsv's (a prefix), which
nothing chose anything on, as mean ± std over two seeds (the seed sets the adapters' start and
the data order). Plans that travel: each task's searched plan is also trained, at its own
rate, on every other task that has a search of its own, beside that task's search. Every run trains and is scored under bf16 autocast, in a process of its own
with one torch thread (two side by side: `--jobs`), so its peak memory is the process's.

Why this scale: a training step of batch 8 at about 50 tokens takes about 2 s on one of these
cores under bf16 with the output layer at labelled positions (benchmarks/llm_speed.py), and
choice scoring costs one forward pass per candidate answer: `STEPS` steps plus 200 validation
and 500 dev examples keep one run near 5 minutes, and the study's ~50 runs per task near 2
hours per task with two processes; every finished run is stored as JSON the moment it ends
(benchmarks/runs/llm/), so the study advances across sittings.

    python benchmarks/llm.py --tasks sst2                 # train what is not stored yet, report
    python benchmarks/llm.py --results benchmarks/RESULTS.md --stored   # report what is stored
    python benchmarks/llm.py --keep-searches-as front --kinds --searches default   # search again, beside the old
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import ROOT, RunStore, write_section
from llm_contenders import BUDGET, EARLIER, KINDS, LORAPLUS

STORE = ROOT / "benchmarks" / "runs" / "llm"
TASKS = ("sst2", "subj", "cola", "mr-text")
STEPS, BATCH, MAX_LENGTH, VALIDATION, MAX_DEV, SEEDS = 100, 8, 96, 200, 500, (0, 1)
GRID, FULL_GRID = (3e-4, 1e-3, 3e-3), (1e-5, 3e-5, 1e-4)  # lr grids, extended by 2.5x at an edge (twice at most)
SEARCH_LR = 1e-3  # the recipe the searches are given (their knob spans a tenth to ten times it)
SEARCH_RUNS = 3.0  # the searches' cost cap in final-run equivalents (run_search's default; a record without it ran
# uncapped: benchmarks/runs/llm/sst2_search-uncapped.json, 7.8 runs)
EVERY_METHOD = ("lora", "dora", "sparse", "moe_lora", "ia3", "ssf")  # what the search over every method may choose


def recipe(lr: float, steps: int = STEPS, lr_ratio: float = 1.0):
    from peftplan.recipe import Recipe

    return Recipe(lr=lr, steps=steps, warmup=0.06, schedule="linear", batch_size=BATCH, lr_ratio=lr_ratio)


def load(name: str, model=None):
    import llm_tasks

    return llm_tasks.load(
        name,
        batch_size=BATCH,
        max_length=MAX_LENGTH,
        validation=VALIDATION,
        max_train=None,
        max_dev=MAX_DEV,
        model=model,
    )


# ---- one run, in a process of its own ------------------------------------------------------


def run_job(job: dict) -> dict:
    """Train and score ``job`` (a contender kind at an lr and seed, or a plan) in this process."""
    import resource

    import torch
    from llm_contenders import build

    import peftplan as pp
    from peftplan.planner.training.device import autocast
    from peftplan.planner.training.evaluate import metric_and_loss

    torch.set_num_threads(1)
    base, _, task = load(job["task"])
    torch.manual_seed(job["seed"])
    if "sites" in job:
        model, make_optimizer = pp.apply(base, pp.Plan(sites=job["sites"])), None
    else:
        model, make_optimizer = build(job["kind"], base, task)
    steps = job.get("steps", STEPS)  # fewer: a screen (the schedule compressed, as a search's), judged on validation
    rec = recipe(job["lr"], steps, job.get("lr_ratio", 1.0))  # a plan searched with LoRA+ trains with it
    run = pp.train(model, task, rec, seed=job["seed"], bf16=True, make_optimizer=make_optimizer)
    device = torch.device("cpu")
    with autocast(device, True):
        val, val_loss = metric_and_loss(model, task, task.validation_batches)
        dev, dev_loss = (float("nan"),) * 2 if steps < STEPS else metric_and_loss(model, task, task.eval_batches)
    return {
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "val_metric": val,
        "val_loss": val_loss,
        "dev_metric": dev,
        "dev_loss": dev_loss,
        "seconds": round(run.seconds, 1),
        "step_s": round(run.seconds / run.steps, 3),
        "steps": run.steps,
        "first_loss": run.losses[0],
        "last_loss": sum(run.losses[-10:]) / len(run.losses[-10:]),
        "peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def _job(key: str, job: dict, relay: bool) -> str:
    """Run ``job`` in a process of its own (one torch thread) and return its stdout; ``relay``:
    its progress lines (stderr) are printed as they come, named by ``key``, so a 20-minute
    search shows its trials while it runs. A failed job raises with the end of its stderr."""
    proc = subprocess.Popen(
        [sys.executable, __file__, "--job", json.dumps(job)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"},
    )
    tail: collections.deque[str] = collections.deque(maxlen=100)

    def read_stderr() -> None:
        for line in proc.stderr:
            tail.append(line)
            if relay:
                print(f"  {key}: {line.rstrip()}", flush=True)

    reader = threading.Thread(target=read_stderr)
    reader.start()
    stdout = proc.stdout.read()
    proc.wait()
    reader.join()
    if proc.returncode:
        raise RuntimeError(f"{key} failed:\n{''.join(tail)[-4000:]}")
    return stdout


def search_job(job: dict) -> dict:
    """peftplan's search on ``job['task']`` (seed 0's data), every default but the methods."""
    import optuna
    import torch
    from search_record import planner_tree, trial_point, trial_steps

    import peftplan as pp

    tree = planner_tree()  # the code this search runs (HEAD may move while it does)
    torch.set_num_threads(1)
    base, _, task = load(job["task"])
    storage = optuna.storages.InMemoryStorage()
    start = time.perf_counter()
    options = {"methods": tuple(job["methods"])} if job.get("methods") else {}
    options["runs"] = job.get("runs")
    plan = pp.search(
        base,
        BUDGET,
        task,
        recipe=recipe(SEARCH_LR, lr_ratio=job.get("lr_ratio", 1.0)),
        storage=storage,
        study_name="llm",
        threads=1,
        bf16=True,
        **options,
    )
    trials = optuna.load_study(study_name="llm", storage=storage).get_trials(deepcopy=False)
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    points = [trial_point(t) for t in done]
    steps = sum(trial_steps(t, STEPS) for t in done if "reused" not in t.user_attrs)
    return {
        "plan": plan.to_dict(),
        "search_wall": round(time.perf_counter() - start, 1),
        "trials": points,
        "evaluations": sum(not p["reused"] for p in points),
        "search_steps": steps,
        "planner": tree,
    }


def _rank(run: dict) -> tuple[float, float]:
    """A run's place on validation: the metric, ties broken by the loss."""
    return run["val_metric"], -run["val_loss"]


def _mean_rank(runs: list[dict]) -> tuple[float, float]:
    return sum(r["val_metric"] for r in runs) / len(runs), -sum(r["val_loss"] for r in runs) / len(runs)


# ---- the study: which runs, in which order ---------------------------------------------------


class Study:
    """Runs stored under ``store``, trained in up to ``jobs`` processes at a time."""

    def __init__(self, store: RunStore, jobs: int, stored_only: bool) -> None:
        self.store, self.stored_only = store, stored_only
        self.slots = threading.Semaphore(jobs)

    def run(self, key: str, job: dict) -> dict:
        spec = {
            "steps": STEPS,
            **job,
            "batch": BATCH,
            "max_length": MAX_LENGTH,
            "validation": VALIDATION,
            "max_dev": MAX_DEV,
        }
        record = self.store.get(key, spec)
        if record is not None:
            return record
        if self.stored_only:
            raise LookupError(key)
        with self.slots:
            start = time.perf_counter()
            stdout = _job(key, job, relay=job.get("search", False))
            result = json.loads(stdout.strip().splitlines()[-1])
        record = self.store.put(key, spec, {**result, "key": key, "wall": round(time.perf_counter() - start, 1)})
        shown = (
            f"val {record['val_metric']:.4f}, dev {record['dev_metric']:.4f}"
            if "val_metric" in record
            else f"{record['evaluations']} evaluations, {record['search_steps']} steps"
        )
        print(f"  {key}: {shown}, {record['wall'] / 60:.1f} min", flush=True)
        return record

    def baseline(self, task: str, kind: str, lr: float, seed: int) -> dict:
        return self.run(f"{task}/{kind}@lr={lr:g},seed={seed}", {"task": task, "kind": kind, "lr": lr, "seed": seed})

    def tuned(self, task: str, kind: str, grid: tuple[float, ...], train=None) -> dict:
        """The contender at its best lr: ``grid`` on seed 0, extended by 2.5x while the best is at
        an edge (twice at most); then the other seeds at seed 0's two best rates, the rate with
        the better validation mean over the seeds chosen (seed 0 alone once chose a rate at the
        edge of stability, where seed 1 collapsed), and its runs on every seed reported."""
        train = train or (lambda lr, seed: self.baseline(task, kind, lr, seed))
        with cf.ThreadPoolExecutor(len(grid)) as pool:
            runs = dict(zip(grid, pool.map(lambda lr: train(lr, 0), grid)))
        while True:
            best = max(runs, key=lambda lr: _rank(runs[lr]))
            if len(runs) >= len(grid) + 2 or min(runs) < best < max(runs):
                break
            lr = float(f"{best / 2.5 if best == min(runs) else best * 2.5:.3g}")
            runs[lr] = train(lr, 0)
        finalists = sorted(runs, key=lambda lr: _rank(runs[lr]), reverse=True)[:2]
        seeds = {lr: [runs[lr]] + [train(lr, s) for s in SEEDS[1:]] for lr in finalists}
        best = max(finalists, key=lambda lr: _mean_rank(seeds[lr]))
        return {
            "runs": seeds[best],
            "lr": best,
            "grid": [runs[lr] for lr in sorted(runs)],
            "finalists": {lr: seeds[lr] for lr in finalists},
            "cost": len(runs) + len(finalists) * (len(SEEDS) - 1),
        }

    def plan_runs(self, task: str, label: str, plan, lr: float) -> list[dict]:
        """``plan`` on every seed at ``lr`` (and its recipe's LoRA+ ratio, where it has one)."""
        ratio = {"lr_ratio": plan.recipe.lr_ratio} if plan.recipe and plan.recipe.lr_ratio != 1.0 else {}
        return [
            self.run(
                f"{task}/{label}@lr={lr:g},seed={s}", {"task": task, "sites": plan.sites, "lr": lr, "seed": s, **ratio}
            )
            for s in SEEDS
        ]

    def proxy(self, task: str) -> dict:
        """The one-shot plan (no training while planning), its lr tuned like a baseline's."""
        import peftplan as pp

        base, _, t = load(task)
        plan = pp.search(base, BUDGET, t, strategy="proxy")

        def train(lr, seed):
            return self.run(
                f"{task}/proxy@lr={lr:g},seed={seed}",
                {"task": task, "sites": plan.sites, "lr": lr, "seed": seed},
            )

        return {**self.tuned(task, "proxy", GRID, train), "summary": plan.summary()}

    def search(
        self,
        task: str,
        methods: tuple[str, ...] | None = None,
        runs: float | None = SEARCH_RUNS,
        earlier: str = "",
        lr_ratio: float = 1.0,
    ) -> dict:
        """A search (its plan at its own lr, on every seed) and what it cost in final runs;
        ``earlier``: one stored under an earlier rule (`EARLIER`); ``lr_ratio``: its recipe's
        LoRA+ ratio (every trial's B matrices at that multiple of the rate)."""
        import peftplan as pp

        label = ("search" if methods is None else "search-every-method") + (f"-{earlier}" if earlier else "")
        label += "-loraplus" if lr_ratio != 1.0 else ""
        job = {
            "task": task,
            "search": True,
            "lr": SEARCH_LR,
            "runs": runs,
            **({"methods": list(methods)} if methods else {}),
            **({"lr_ratio": lr_ratio} if lr_ratio != 1.0 else {}),
        }
        record = self.run(f"{task}/{label}", job)
        plan = pp.Plan.from_dict(record["plan"])
        runs = self.plan_runs(task, label, plan, plan.recipe.lr)
        return {
            "runs": runs,
            "lr": plan.recipe.lr,
            "cost": record["search_steps"] / STEPS + len(SEEDS) - 1,
            "search": record,
            "summary": plan.summary(),
        }


def run_task(study: Study, task: str, kinds: list[str], searches: str) -> dict[str, dict]:
    """Every contender of ``task`` (the baselines' lr grids side by side), as report rows;
    ``searches``: "all" (the proxy plan, the default search and the search over every method),
    "default" (the proxy plan and the default search), "loraplus" (the default search with
    LoRA+ in its recipe, `LORAPLUS`) or "none"; a stored LoRA+ search is reported beside the others."""
    work = {KINDS[k][0]: (lambda k=k: study.tuned(task, k, FULL_GRID if k == "full" else GRID)) for k in kinds}
    if searches != "none":
        work["peftplan proxy plan"] = lambda: study.proxy(task)
        work["peftplan search"] = lambda: study.search(task)
    if searches == "all":
        work["peftplan search, every method"] = lambda: study.search(task, EVERY_METHOD)
    if searches == "loraplus" or (searches != "none" and study.store.path(f"{task}/search-loraplus").exists()):
        work[LORAPLUS[0]] = lambda: study.search(task, lr_ratio=LORAPLUS[1])
    for earlier, (row, runs) in EARLIER.items():
        if searches != "none" and study.store.path(f"{task}/search-{earlier}").exists():
            work[row] = lambda earlier=earlier, runs=runs: study.search(task, runs=runs, earlier=earlier)
    if not work:
        return {}
    with cf.ThreadPoolExecutor(len(work)) as pool:
        futures = {label: pool.submit(fn) for label, fn in work.items()}
        rows = {}
        for label, future in futures.items():
            try:
                rows[label] = future.result()
            except LookupError as missing:  # --stored: what is not trained yet is left out of the report
                print(f"  {task}: {label} is not complete ({missing} missing)", flush=True)
    return rows


def reuse(study: Study, results: dict[str, dict]) -> None:
    """Each task's searched plan applied, with its rate, to every other task of ``results`` that
    has a search of its own (on every seed, pairs side by side): a row "peftplan plan searched
    on <task>" there."""
    import peftplan as pp

    searched = {
        task: pp.Plan.from_dict(rows["peftplan search"]["search"]["plan"])
        for task, rows in results.items()
        if "peftplan search" in rows
    }
    pairs = [(target, source) for target in searched for source in searched if source != target]

    def runs(pair: tuple[str, str]) -> list[dict] | None:
        target, source = pair
        try:
            return study.plan_runs(target, f"reuse-{source}", searched[source], searched[source].recipe.lr)
        except LookupError:  # --stored: a pair not trained yet is left out, and said so
            print(f"  {target}: the plan searched on {source} is not trained there yet", flush=True)
            return None

    with cf.ThreadPoolExecutor(max(1, len(pairs))) as pool:
        for (target, source), trained in zip(pairs, pool.map(runs, pairs)):
            if trained is not None:
                row = {"runs": trained, "lr": searched[source].recipe.lr, "cost": len(SEEDS), "source": source}
                results[target][f"peftplan plan searched on {source}"] = row


def keep_searches(store: RunStore, label: str) -> None:
    """Keep every task's default search and its runs under the `EARLIER` label ``label``
    ("search-<label>"), so the study searches again under today's code and reports the two
    side by side."""
    for task in TASKS:
        search = store.path(f"{task}/search")
        stored = [search, *sorted(store.root.glob(f"{search.stem}@*.json"))]
        for key in [json.loads(p.read_text())["key"] for p in stored if p.exists()]:
            kept = key.replace("/search", f"/search-{label}", 1)
            store.rename(key, kept)
            print(f"  {key} kept as {kept}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    ap.add_argument(
        "--kinds",
        nargs="*",
        choices=sorted(KINDS),
        default=list(KINDS),
        help="baselines to run (none: only the searches)",
    )
    ap.add_argument(
        "--searches",
        choices=("all", "default", "loraplus", "none"),
        default="all",
        help="peftplan's contenders: all "
        "(default), default (the proxy plan and the default search, not the search over every method), "
        "none (baselines only; the searches can follow), loraplus (only the search with LoRA+ in its recipe)",
    )
    ap.add_argument("--jobs", type=int, default=2, help="trainings side by side, one process and one thread each")
    ap.add_argument("--stored", action="store_true", help="report what is stored, training nothing")
    ap.add_argument(
        "--keep-searches-as",
        choices=sorted(EARLIER),
        help="first keep the stored default searches under this earlier rule's label (llm_contenders.EARLIER), "
        "so they are searched again under today's code",
    )
    ap.add_argument("--store", type=Path, default=STORE)
    ap.add_argument("--results", type=Path, help="write the report into this RESULTS.md")
    args = ap.parse_args()
    if args.job:
        job = json.loads(args.job)
        print(json.dumps(search_job(job) if job.get("search") else run_job(job)))
        return
    from llm_report import report

    store = RunStore(args.store)
    if args.keep_searches_as:
        keep_searches(store, args.keep_searches_as)
    study = Study(store, args.jobs, args.stored)
    started = time.perf_counter()
    results = {}
    for task in args.tasks:
        print(f"{task}:", flush=True)
        results[task] = run_task(study, task, args.kinds, args.searches)
    if args.searches != "none":
        reuse(study, results)
    text = report(results, args.store)
    print("\n" + text + f"\n\nWhole benchmark: {(time.perf_counter() - started) / 60:.1f} min wall.")
    if args.results:
        command = "python benchmarks/llm.py --stored --results benchmarks/RESULTS.md"
        write_section(args.results, "llm", f"## Language-model study (SmolLM2-135M-Instruct) — `{command}`\n\n{text}")


if __name__ == "__main__":
    main()

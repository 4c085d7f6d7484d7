"""The quality study's scales and its `Study`: the runs of one scale (baselines, plans,
searches), each stored as JSON the moment it ends (benchmarks/quality.py says what the study
compares and why)."""

from __future__ import annotations

import copy
import threading
import time

from common import ROOT, RunStore, load_task
from contenders import BUDGET, PROBES, build, probe_plan, recipe, train_and_score
from search_record import code_differs, planner_tree, tick, trial_point, trial_steps

SMALL_BUDGET = 22_714  # 0.1% of MiniLM-L6 with its head (22,713,986 params); peft LoRA r=2 on query/value is 19,202
SCALES = {
    "full": {
        "tasks": ("sst2", "subj", "mr"),
        "seeds": (0, 1),
        "steps": 200,
        "validation": 1000,
        "max_train": None,
        "max_dev": None,
        "grid": (2e-4, 5e-4, 1e-3, 2e-3, 5e-3),
        "extras": True,
        "bf16": False,
    },
    "quick": {
        "tasks": ("sst2", "subj"),
        "seeds": (0,),
        "steps": 64,
        "validation": 256,
        "max_train": 2048,
        "max_dev": 512,
        "grid": (1e-3, 2e-3, 5e-3),
        "extras": False,
        "bf16": True,
    },
}
FULL_GRID, PROXY_LR, SEARCH_LR = (2e-5, 5e-5, 1e-4), 1e-3, 1e-3
ADALORA_GRID = (
    5e-3,
    1.25e-2,
    3.12e-2,
)  # LoRA's grid moved up two steps: on mr, 1e-3 and 2e-3 left it at 0.60 validation
STORE = ROOT / "benchmarks" / "runs" / "quality"


class Study:
    """One scale's runs, stored as they finish."""

    def __init__(self, scale: str, store: RunStore, stored_only: bool = False) -> None:
        self.scale, self.cfg, self.store, self.stored_only = scale, SCALES[scale], store, stored_only
        self.tasks: dict = {}

    @property
    def precision(self) -> dict:
        """What a run's spec says of its precision: nothing for fp32, so fp32 runs stored before
        the quick scale went bf16 keep their keys."""
        return {"bf16": True} if self.cfg["bf16"] else {}

    def describe(self) -> str:
        cfg = self.cfg
        return (
            f"{cfg['steps']} steps per final run{' under bf16 autocast' if cfg['bf16'] else ''}, validation "
            f"{cfg['validation']} examples, lr grid {list(cfg['grid'])} (AdaLoRA {list(ADALORA_GRID)}, full fine-tuning "
            f"{list(FULL_GRID)}), seeds {list(cfg['seeds'])}; budget {BUDGET:,} params."
        )

    def task(self, name: str, seed: int):
        if (name, seed) not in self.tasks:
            self.tasks[(name, seed)] = load_task(
                name,
                seed=seed,
                validation=self.cfg["validation"],
                max_train=self.cfg["max_train"],
                max_dev=self.cfg["max_dev"],
            )
        return self.tasks[(name, seed)]

    def run(self, name: str, contender: str, spec: dict, make) -> dict:
        key = f"{self.scale}/{name}/{contender}"
        spec = {"scale": self.scale, "task": name, **spec, **self.precision}
        record = self.store.get(key, spec)
        if record is None and self.stored_only:
            raise SystemExit(f"{key} is not stored: run without --stored to train it")
        if record is None:
            start = time.perf_counter()
            result = make()
            record = self.store.put(
                key,
                spec,
                {"task": name, "contender": contender, **result, "wall": round(time.perf_counter() - start, 1)},
            )
            print(
                f"  {key}: val {record['val_metric']:.4f}, dev {record['dev_metric']:.4f}, {record['params']:,} params, "
                f"{record['wall']:.0f} s",
                flush=True,
            )
        return record

    def baseline(self, name: str, kind: str, lr: float, seed: int) -> dict:
        steps = self.cfg["steps"]

        def make():
            base, task = self.task(name, seed)
            model, loss, hook = build(kind, base, task, lr, steps)
            return train_and_score(model, task, recipe(steps, lr), seed, loss, hook, bf16=self.cfg["bf16"])

        return self.run(
            name, f"{kind}@lr={lr:g},seed={seed}", {"kind": kind, "lr": lr, "seed": seed, "steps": steps}, make
        )

    def tuned(
        self, name: str, kind: str, grid: tuple[float, ...] | None = None, train=None
    ) -> tuple[float, list[dict]]:
        """The best lr on validation (seed 0) of ``grid`` (default: the scale's), extended by a
        factor 2.5 while the best is at an edge (at most twice); ``train(lr, seed)``: the run
        (default: baseline ``kind``'s)."""
        train = train or (lambda lr, seed: self.baseline(name, kind, lr, seed))
        grid = list(grid or self.cfg["grid"])
        runs = {lr: train(lr, 0) for lr in grid}
        while True:
            best = max(runs, key=lambda lr: (runs[lr]["val_metric"], -runs[lr]["val_loss"]))
            if len(runs) >= len(grid) + 2 or min(runs) < best < max(runs):  # at most two extensions
                return best, [runs[lr] for lr in sorted(runs)]
            lr = float(f"{best / 2.5 if best == min(runs) else best * 2.5:.3g}")
            runs[lr] = train(lr, 0)

    def plan_run(self, name: str, contender: str, plan, seed: int, extra: dict | None = None) -> dict:
        from peftplan.backends import apply

        steps = self.cfg["steps"]
        rec = recipe(steps, plan.recipe.lr, plan.recipe.lr_ratio) if plan.recipe else recipe(steps, PROXY_LR)

        def make():
            base, task = self.task(name, seed)
            return train_and_score(apply(copy.deepcopy(base), plan), task, rec, seed, bf16=self.cfg["bf16"])

        spec = {"sites": plan.sites, "recipe": rec.to_dict(), "seed": seed}
        record = self.run(name, f"{contender},seed={seed}", spec, make)
        return {**record, **(extra or {})}

    def probe(self, name: str, kind: str) -> dict:
        """Probe ``kind``: the best lr on validation of its grid, extended like the baselines'
        (seed 0), then on every seed."""
        import peftplan as pp

        graph = pp.lower(self.task(name, 0)[0])  # once: every run's plan is made from it

        def train(lr: float, seed: int) -> dict:
            return self.plan_run(name, f"probe-{kind}@lr={lr:g}", probe_plan(graph, kind, lr, self.cfg["steps"]), seed)

        lr, grid = self.tuned(name, kind, PROBES[kind][1], train)
        runs = [train(lr, s) for s in self.cfg["seeds"]]
        return {"runs": runs, "lr": lr, "cost": len(grid) + len(runs) - 1, "grid": grid, "kind": "probe"}

    def proxy(self, name: str) -> object:
        import peftplan as pp

        base, task = self.task(name, 0)
        plan = pp.search(base, BUDGET, task, strategy="proxy")
        plan.recipe = recipe(self.cfg["steps"], PROXY_LR)
        return plan

    def search(
        self,
        name: str,
        screen_by: str | None = None,
        budget: int = BUDGET,
        strategy: str | None = None,
        stored: bool = False,
    ) -> tuple[object, dict]:
        """peftplan's default search on seed 0's task (``screen_by``: promotion by another
        signal than the default's; ``budget``, ``strategy``: another budget or strategy, the
        rest as the default's); its plan and what it cost, stored (``stored``: only as stored,
        of whichever planner tree, as under ``--stored``)."""
        stored = stored or self.stored_only
        import peftplan as pp

        options = {
            k: v
            for k, v in (
                ("screen_by", screen_by),
                ("budget", budget if budget != BUDGET else None),
                ("strategy", strategy),
            )
            if v is not None
        }  # what differs from the default search
        key = (
            f"{self.scale}/{name}/search"
            + (f"-screen-{screen_by}" if screen_by else "")
            + (f"-budget-{budget}" if "budget" in options else "")
            + (f"-{strategy}" if strategy else "")
        )
        spec = {
            "scale": self.scale,
            "task": name,
            "steps": self.cfg["steps"],
            "lr": SEARCH_LR,
            "version": pp.__version__,
            **options,
            **self.precision,
        }
        record = self.stored_search(key, spec, stored)
        if record is None:
            record = self.search_now(name, key, spec, budget, strategy, screen_by)
        return pp.Plan.from_dict(record["plan"]), record

    def stored_search(self, key: str, spec: dict, stored: bool) -> dict | None:
        """The search stored under ``key`` and ``spec``; None where there is none, or where its
        planner tree's search code differs from today's and ``stored`` is off (it is searched
        again); with ``stored``, a missing one is a SystemExit."""
        record = self.store.get(key, spec)
        if record is not None and code_differs(record.get("planner")) and not stored:
            print(
                f"  {key}: stored under planner tree {record.get('planner', 'unrecorded')}, searching again", flush=True
            )
            record = None
        if record is None and stored:
            raise SystemExit(f"{key} is not stored: run without --stored to train it")
        return record

    def search_now(
        self, name: str, key: str, spec: dict, budget: int, strategy: str | None, screen_by: str | None
    ) -> dict:
        """Search, store under ``key`` and ``spec`` the plan, every completed trial and what it
        cost in wall time and optimizer steps, and return that record."""
        import optuna

        tree = planner_tree()  # the code this search runs (HEAD may move while it does)
        plan, storage, wall = self.logged_search(name, key, budget, strategy, screen_by)
        trials = optuna.load_study(study_name="quality", storage=storage).get_trials(deepcopy=False)
        done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        points = [trial_point(t) for t in done]
        steps = sum(trial_steps(t, self.cfg["steps"]) for t in done if "reused" not in t.user_attrs)
        record = self.store.put(
            key,
            spec,
            {
                "plan": plan.to_dict(),
                "wall": round(wall, 1),
                "trials": points,
                "evaluations": sum(not p["reused"] for p in points),
                "steps": steps,
                "planner": tree,
            },
        )
        print(
            f"  {key}: {record['evaluations']} evaluations, {steps} steps, {wall:.0f} s; {plan.summary()}",
            flush=True,
        )
        return record

    def logged_search(
        self, name: str, key: str, budget: int, strategy: str | None, screen_by: str | None
    ) -> tuple[object, object, float]:
        """``pp.search`` on seed 0's task, its trials in a fresh in-memory storage, a line printed
        every minute (`tick`): the plan, the storage and the wall time."""
        import optuna
        import torch

        import peftplan as pp

        base, task = self.task(name, 0)
        storage = optuna.storages.InMemoryStorage()
        start, stop = time.perf_counter(), threading.Event()
        ticker = threading.Thread(target=tick, args=(key, storage, "quality", stop, start), daemon=True)
        ticker.start()
        try:  # the search's own progress bar is off: this log may be a file, not a terminal
            plan = pp.search(
                base,
                budget,
                task,
                recipe=recipe(self.cfg["steps"], SEARCH_LR),
                storage=storage,
                study_name="quality",
                progress=False,
                threads=torch.get_num_threads(),  # the study's (--threads)
                strategy=strategy,
                bf16=self.cfg["bf16"],
                **({"screen_by": screen_by} if screen_by else {}),
            )
        finally:
            stop.set()
            ticker.join()
        return plan, storage, time.perf_counter() - start

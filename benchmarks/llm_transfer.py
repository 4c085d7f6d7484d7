"""Learning-rate transfer on SmolLM2: does the rate a search's short screen prefers carry to the
full recipe, for plans of different sizes?

A search screens each plan for 5% of the recipe's steps (the schedule compressed into them) and
ranks by validation loss; its proposals then cluster at the top of the rate range (1e-2), where
a full run of the same plan lost to the seeds (benchmarks/RESULTS.md). Here three plans — peft
LoRA r8 q,v at the study's budget, and peftplan's proxy plan at 5% and 22% of it (the sizes the
sampler proposes) — are screened at a ladder of rates and trained in full at the rates around
the screens' best, seed 0, everything else as in benchmarks/llm.py (whose stored LoRA q,v runs
are reused). A fourth, ``search-edge``, is the plan a default search returned when its seed sweep
(4e-4, 1e-3, 2.5e-3) was never extended (`--search`: which stored search): it is screened on the
search's own rate ladder, that sweep extended by 2.5x, and trained in full at its returned rate
(the study's stored run), 2.5x below it, and √2.5 and 2.5x above it — how much its rate, the top
of the seeds' sweep on every task, left on the table. The table gives each plan's best screened
and best full rate. (On MiniLM the screens' rate did not carry: a search whose seed sweep
followed its best-screened edge by 2.5x steps to 1e-2 there fell to chance in full,
benchmarks/runs/quality/full_sst2_search-extended.json.)

    python benchmarks/llm_transfer.py --tasks sst2 --jobs 2 --results benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import threading
import time
from pathlib import Path

import llm
from common import RunStore, write_section
from llm_contenders import BUDGET

STORE = llm.STORE.parent / "llm-transfer"
LADDER = (3e-4, 1e-3, 3e-3, 7.5e-3, 1.87e-2, 4.69e-2)  # the study's grid and its 2.5x extensions
SCREEN = max(1, round(0.05 * llm.STEPS))  # a search's screen (Fidelity(share=0.05))
SHARES = (0.05, 0.22)  # proxy plans at these shares of the budget (the search's cheaper seeds)
SEARCH_LADDER = tuple(float(f"{llm.SEARCH_LR * 2.5**k:.3g}") for k in range(-1, 5))  # the seeds' sweep, extended
AROUND = (1 / 2.5, 1.0, 2.5**0.5, 2.5)  # a searched plan's full runs: these multiples of its returned rate


PLANS = ("lora-qv", *(f"proxy-{share:g}" for share in SHARES), "search")


def plans(task: str, chosen: tuple[str, ...] = PLANS, search: str = "search") -> dict[str, dict]:
    """Label -> job fields of each ``chosen`` plan (a contender kind, or a plan's sites); "search"
    is the plan of the study's stored search ``search`` ("search" or "search-<label>",
    `llm_contenders.EARLIER`), labelled so."""
    import peftplan as pp

    out = {"lora-qv": {"kind": "lora-qv"}}
    shares = [share for share in SHARES if f"proxy-{share:g}" in chosen]
    if shares:
        base, _, t = llm.load(task)
    for share in shares:
        plan = pp.search(base, round(BUDGET * share), t, strategy="proxy")
        out[f"proxy-{share:g}"] = {"sites": plan.sites}
    searched = RunStore(llm.STORE).path(f"{task}/{search}")
    if "search" in chosen and searched.exists():  # the study's search, as stored
        plan = pp.Plan.from_dict(json.loads(searched.read_text())["plan"])
        rates = [float(f"{plan.recipe.lr * k:.3g}") for k in AROUND]
        out[search] = {"sites": plan.sites, "ladder": SEARCH_LADDER, "full": rates, "search": True}
    return {label: fields for label, fields in out.items() if label in chosen or fields.get("search")}


class Transfer:
    """Screens and full runs of the plans of one task (full LoRA q,v runs from the study's store)."""

    def __init__(self, task: str, slots: threading.Semaphore, stored_only: bool) -> None:
        self.task = task
        self.mine = llm.Study(RunStore(STORE), 1, stored_only)
        self.study = llm.Study(RunStore(llm.STORE), 1, stored_only)
        self.mine.slots = self.study.slots = slots  # one limit on processes for every task

    def results(self, todo: dict[str, dict]) -> dict[str, dict]:
        """Each plan's screens and full runs (``todo``: `plans`); with nothing trained
        (``--stored``), a plan not stored yet is left out, and said so."""

        def one(label: str) -> dict | None:
            try:
                return self.plan(label, todo[label])
            except LookupError as missing:
                print(f"  {self.task}: {label} is not complete ({missing} missing)", flush=True)
                return None

        with cf.ThreadPoolExecutor(len(todo)) as pool:
            return {label: r for label, r in zip(todo, pool.map(one, todo)) if r is not None}

    def run(self, label: str, fields: dict, lr: float, steps: int) -> dict:
        fields = {k: v for k, v in fields.items() if k in ("kind", "sites")}
        job = {"task": self.task, **fields, "lr": lr, "seed": 0}
        if steps == llm.STEPS and "kind" in fields:
            return self.study.baseline(self.task, fields["kind"], lr, 0)
        if steps == llm.STEPS and label.startswith("search"):  # the study's runs of its searched plan
            return self.study.run(f"{self.task}/{label}@lr={lr:g},seed=0", job)
        key = f"{self.task}/{label}@lr={lr:g},steps={steps}"
        return self.mine.run(key, {**job, **({"steps": steps} if steps != llm.STEPS else {})})

    def plan(self, label: str, fields: dict) -> dict:
        """The plan's screens at every rate of its ladder, then full runs at its own ``full``
        rates, else from two rates below the screens' best up to one above it (the full run's
        best is expected at or below)."""
        ladder = fields.get("ladder", LADDER)
        with cf.ThreadPoolExecutor(len(ladder)) as pool:
            screens = dict(zip(ladder, pool.map(lambda lr: self.run(label, fields, lr, SCREEN), ladder)))
        best = min(screens, key=lambda lr: screens[lr]["val_loss"])
        i = ladder.index(best)
        rates = fields.get("full") or ladder[max(0, i - 2) : i + 2]
        with cf.ThreadPoolExecutor(len(rates)) as pool:
            full = dict(zip(rates, pool.map(lambda lr: self.run(label, fields, lr, llm.STEPS), rates)))
        return {"screens": screens, "full": full}


def lines(task: str, results: dict[str, dict]) -> list[str]:
    out = [
        f"**{task}** (validation, seed 0; a screen: {SCREEN} steps ranked by loss; a full run: "
        f"{llm.STEPS} steps ranked by the metric, then the loss):",
        "",
        "| plan | params | screens: loss by lr | best screened | full runs: metric (loss) by lr | best full | ratio |",
        "|---|---:|---|---:|---|---:|---:|",
    ]
    same = 0
    for label, r in results.items():
        screens, full = r["screens"], r["full"]
        s_best = min(screens, key=lambda lr: screens[lr]["val_loss"])
        f_best = max(full, key=lambda lr: llm._rank(full[lr]))
        same += s_best == f_best
        params = next(iter(full.values()))["params"]
        out.append(
            f"| {label} | {params:,} | "
            + ", ".join(f"{lr:g} → {screens[lr]['val_loss']:.3f}" for lr in sorted(screens))
            + f" | {s_best:g} | "
            + ", ".join(f"{lr:g} → {full[lr]['val_metric']:.3f} ({full[lr]['val_loss']:.4f})" for lr in sorted(full))
            + f" | {f_best:g} | {f_best / s_best:.2g} |"
        )
    return out + ["", f"The screens' best rate is the full runs' best on {same} of {len(results)} plans.", ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", choices=llm.TASKS, default=["sst2"])
    ap.add_argument("--plans", nargs="+", choices=PLANS, default=list(PLANS))
    ap.add_argument("--search", default="search", help="the stored search whose plan is 'search' (search-<label>)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--stored", action="store_true", help="report what is stored, training nothing")
    ap.add_argument("--results", type=Path, help="write the report into this RESULTS.md")
    args = ap.parse_args()
    started, slots = time.perf_counter(), threading.Semaphore(args.jobs)
    todo = {
        task: plans(task, tuple(args.plans), args.search) for task in args.tasks
    }  # one at a time: the model loads once
    with cf.ThreadPoolExecutor(len(args.tasks)) as pool:  # tasks side by side, `--jobs` trainings at a time
        done = list(pool.map(lambda task: Transfer(task, slots, args.stored).results(todo[task]), args.tasks))
    body = "\n".join(line for task, results in zip(args.tasks, done) if results for line in lines(task, results))
    print(body + f"\nWhole benchmark: {(time.perf_counter() - started) / 60:.1f} min wall.", flush=True)
    if args.results:
        command = "python benchmarks/llm_transfer.py --stored --tasks " + " ".join(args.tasks)
        command += f" --search {args.search}" if args.search != "search" else ""
        title = f"## Learning-rate transfer, screens to full runs (SmolLM2-135M-Instruct) — `{command}`"
        write_section(args.results, "llm-transfer", f"{title}\n\n{__doc__.split(chr(10) * 2)[1]}\n\n{body}")


if __name__ == "__main__":
    main()

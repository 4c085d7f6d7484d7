"""Learning-rate transfer on SmolLM2: does the rate a search's short screen prefers carry to the
full recipe, for plans of different sizes?

A search screens each plan for 5% of the recipe's steps (the schedule compressed into them) and
ranks by validation loss; its proposals then cluster at the top of the rate range (1e-2), where
a full run of the same plan lost to the seeds (benchmarks/RESULTS.md). Here three plans — peft
LoRA r8 q,v at the study's budget, and peftplan's proxy plan at 5% and 22% of it (the sizes the
sampler proposes) — are screened at a ladder of rates and trained in full at the rates around
the screens' best, seed 0, everything else as in benchmarks/llm.py (whose stored LoRA q,v runs
are reused). The table gives each plan's best screened and best full rate. (On MiniLM the
screens' rate did not carry: a search whose seed sweep followed its best-screened edge to 1e-2
there fell to chance in full, benchmarks/runs/quality/full_sst2_search-extended.json, so the
search does not extend its sweep.)

    python benchmarks/llm_transfer.py --tasks sst2 --jobs 2 --results benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import time
from pathlib import Path

import llm
from common import RunStore, write_section
from llm_contenders import BUDGET

STORE = llm.STORE.parent / "llm-transfer"
LADDER = (3e-4, 1e-3, 3e-3, 7.5e-3, 1.87e-2, 4.69e-2)  # the study's grid and its 2.5x extensions
SCREEN = max(1, round(0.05 * llm.STEPS))  # a search's screen (Fidelity(share=0.05))
SHARES = (0.05, 0.22)  # proxy plans at these shares of the budget (the search's cheaper seeds)


def plans(task: str) -> dict[str, dict]:
    """Label -> job fields of each plan (a contender kind, or a plan's sites)."""
    import peftplan as pp

    base, _, t = llm.load(task)
    out = {"lora-qv": {"kind": "lora-qv"}}
    for share in SHARES:
        plan = pp.search(base, round(BUDGET * share), t, strategy="proxy")
        out[f"proxy-{share:g}"] = {"sites": plan.sites}
    return out


class Transfer:
    """Screens and full runs of the plans of one task (full LoRA q,v runs from the study's store)."""

    def __init__(self, task: str, jobs: int, stored_only: bool) -> None:
        self.task = task
        self.mine = llm.Study(RunStore(STORE), jobs, stored_only)
        self.study = llm.Study(RunStore(llm.STORE), jobs, stored_only)
        self.study.slots = self.mine.slots  # one limit on processes for both

    def run(self, label: str, fields: dict, lr: float, steps: int) -> dict:
        job = {"task": self.task, **fields, "lr": lr, "seed": 0}
        if steps == llm.STEPS and "kind" in fields:
            return self.study.baseline(self.task, fields["kind"], lr, 0)
        key = f"{self.task}/{label}@lr={lr:g},steps={steps}"
        return self.mine.run(key, {**job, **({"steps": steps} if steps != llm.STEPS else {})})

    def plan(self, label: str, fields: dict) -> dict:
        """The plan's screens at every rate of the ladder, then full runs from two rates below the
        screens' best up to one above it (the full run's best is expected at or below)."""
        with cf.ThreadPoolExecutor(len(LADDER)) as pool:
            screens = dict(zip(LADDER, pool.map(lambda lr: self.run(label, fields, lr, SCREEN), LADDER)))
        best = min(screens, key=lambda lr: screens[lr]["val_loss"])
        i = LADDER.index(best)
        rates = LADDER[max(0, i - 2) : i + 2]
        with cf.ThreadPoolExecutor(len(rates)) as pool:
            full = dict(zip(rates, pool.map(lambda lr: self.run(label, fields, lr, llm.STEPS), rates)))
        return {"screens": screens, "full": full}


def lines(task: str, results: dict[str, dict]) -> list[str]:
    out = [
        f"**{task}** (validation, seed 0; a screen: {SCREEN} steps ranked by loss; a full run: "
        f"{llm.STEPS} steps ranked by the metric, then the loss):",
        "",
        "| plan | params | screens: loss by lr | best screened | full runs: metric by lr | best full | ratio |",
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
            + ", ".join(f"{lr:g} → {full[lr]['val_metric']:.3f}" for lr in sorted(full))
            + f" | {f_best:g} | {f_best / s_best:.2g} |"
        )
    return out + ["", f"The screens' best rate is the full runs' best on {same} of {len(results)} plans.", ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", choices=("sst2", "subj", "cola"), default=["sst2"])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--stored", action="store_true", help="report what is stored, training nothing")
    ap.add_argument("--results", type=Path, help="write the report into this RESULTS.md")
    args = ap.parse_args()
    started, text = time.perf_counter(), []
    for task in args.tasks:
        transfer = Transfer(task, args.jobs, args.stored)
        todo = plans(task)
        with cf.ThreadPoolExecutor(len(todo)) as pool:
            results = dict(zip(todo, pool.map(transfer.plan, todo, todo.values())))
        text += lines(task, results)
    body = "\n".join(text)
    print(body + f"\nWhole benchmark: {(time.perf_counter() - started) / 60:.1f} min wall.", flush=True)
    if args.results:
        command = "python benchmarks/llm_transfer.py --stored --tasks " + " ".join(args.tasks)
        title = f"## Learning-rate transfer, screens to full runs (SmolLM2-135M-Instruct) — `{command}`"
        write_section(args.results, "llm-transfer", f"{title}\n\n{__doc__.split(chr(10) * 2)[1]}\n\n{body}")


if __name__ == "__main__":
    main()

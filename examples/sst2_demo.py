"""Demo: a sensitivity-planned LoRA against peft's uniform LoRA, on a real model and real data.

MiniLM-L6 (22M params, offline from its wheel) learns SST-2 sentiment twice, with the same
steps, seed, data order and learning rate:

1. peft: LoRA r=8 (alpha 16) on every query and value projection — the usual default;
2. peftplan: per-site LoRA ranks planned by gradient sensitivity (grad², as in SPT) on a few
   training batches, at the same trainable-parameter count (within 2%).

Both train the new classification head in full. Prints one table: trainable params, dev
accuracy, training time. Run from the repository root: ``make demo``.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import peftplan as pp  # noqa: E402
from peftplan.models import load_minilm, minilm_dir  # noqa: E402
from peftplan.planner.task import accuracy  # noqa: E402
from peftplan.planner.train import train  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "text" / "sst2"


def peft_baseline(model):
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"], task_type=TaskType.SEQ_CLS)
    return get_peft_model(model, config)


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA, help="folder with train.tsv and dev.tsv (default: shared sst2)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-dev", type=int, default=None, help="score on the first N dev examples (default: all)")
    ap.add_argument("--out", type=Path, default=Path("out/demo"), help="where the plan and adapters are saved")
    args = ap.parse_args(argv)
    if not (args.data / "train.tsv").exists():
        print(f"no {args.data / 'train.tsv'}: pass --data FOLDER with train.tsv and dev.tsv", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    console = Console(width=120)

    torch.manual_seed(args.seed)
    base = load_minilm(num_labels=2)  # the new head is initialised once, shared by both runs
    task = pp.Task.for_sequence_classification(
        minilm_dir(), None, args.data / "train.tsv", args.data / "dev.tsv",
        batch_size=args.batch_size, max_dev=args.max_dev, seed=args.seed,
    )  # fmt: skip
    task.name = args.data.name
    console.print(f"MiniLM-L6 on {task.name}: {len(task.train_batches)} train batches of {args.batch_size}, "
                  f"{sum(len(b['labels']) for b in task.eval_batches)} dev examples, {args.steps} steps")  # fmt: skip

    results = []

    # 1. peft's uniform LoRA
    reference = peft_baseline(copy.deepcopy(base))
    budget = trainable(reference)
    run = train(reference, task, steps=args.steps, lr=args.lr, seed=args.seed, progress=True, description="peft r=8 q,v")
    results.append(("peft LoRA r=8 on query,value", trainable(reference), accuracy(reference, task.eval_batches), run.seconds, "-"))

    # 2. peftplan's sensitivity plan at the same parameter count
    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    plan = pp.search(model, pp.Budget(params=budget), task=task, strategy="proxy", seed=args.seed, train_modules=["classifier"])
    plan_seconds = time.perf_counter() - t0
    pp.apply(model, plan)
    run = train(model, task, steps=args.steps, lr=args.lr, seed=args.seed, progress=True, description="peftplan plan")
    results.append(("peftplan sensitivity plan", trainable(model), accuracy(model, task.eval_batches), run.seconds, f"{plan_seconds:.1f}s"))
    pp.save(model, args.out)

    table = Table(title=f"MiniLM-L6 + {task.name}: same steps ({args.steps}), seed, data order and lr")
    for col in ("tuning", "trainable params", "dev accuracy", "train time", "planning"):
        table.add_column(col, justify="left" if col == "tuning" else "right")
    for name, params, acc, seconds, planning in results:
        table.add_row(name, f"{params:,}", f"{acc:.4f}", f"{seconds:.1f}s", planning)
    console.print(table)
    console.print(f"plan: {plan.summary()}")
    lora = {n: e["rank"] for n, e in plan.sites.items() if e["method"] == "lora"}
    by_role: dict[str, list[int]] = {}
    for n, r in lora.items():
        by_role.setdefault(plan.sites[n]["role"], []).append(r)
    console.print("ranks by role: " + ", ".join(f"{role} {sorted(rs)}" for role, rs in sorted(by_role.items())))
    console.print(f"saved plan.json + adapters.safetensors to {args.out}/")
    ratio = results[1][1] / results[0][1]
    if abs(ratio - 1) > 0.02:
        console.print(f"[red]parameter counts differ by {ratio - 1:+.1%} (more than 2%)[/red]")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``peftplan`` command.

    peftplan lower minilm                       # the site table of the bundled real model
    peftplan lower tests.zoo:llama --json g.json
    peftplan plan minilm --budget 0.5% -o plan.json
    peftplan plan minilm --budget 75k --task ../shared/data/text/sst2 -o plan.json

MODEL is ``minilm``, a local Hugging Face model directory, or ``package.module:factory``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _lower(args: argparse.Namespace) -> int:
    from peftplan.ir import lower
    from peftplan.models import load_model

    graph = lower(load_model(args.model))
    print(graph.table(max_rows=None if args.all else 60))
    if args.json:
        from peftplan.planner.plan import write_atomic

        write_atomic(args.json, graph.to_json() + "\n")
        print(f"wrote {args.json}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from peftplan.models import load_model
    from peftplan.planner import Budget, Task, search

    budget = Budget.parse(args.budget)
    task = None
    if args.task:
        folder = Path(args.task)
        model = load_model(args.model, num_labels=args.num_labels)
        tokenizer = _tokenizer(args.model)
        task = Task.for_sequence_classification(
            model, tokenizer, folder / "train.tsv", folder / "dev.tsv", batch_size=args.batch_size, max_train=args.batch_size * args.batches
        )
        heads = [n for n in ("classifier", "score") if hasattr(model, n)]
    else:
        model = load_model(args.model)
        heads = []
    plan = search(model, budget, task=task, seed=args.seed, train_modules=heads or None)
    print(plan.summary())
    plan.save(args.out)
    print(f"wrote {args.out}")
    return 0


def _tokenizer(spec: str):
    from transformers import AutoTokenizer

    from peftplan.models import minilm_dir

    return AutoTokenizer.from_pretrained(minilm_dir() if spec == "minilm" else spec)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peftplan", description="Plan and apply parameter-efficient fine-tuning, per site.")
    sub = p.add_subparsers(dest="command", required=True)

    lo = sub.add_parser("lower", help="show every tunable site of a model")
    lo.add_argument("model", help="minilm, a local HF model directory, or package.module:factory")
    lo.add_argument("--json", help="also write the site graph as JSON to this file")
    lo.add_argument("--all", action="store_true", help="print every row (default: at most 60)")
    lo.set_defaults(run=_lower)

    pl = sub.add_parser("plan", help="allocate a LoRA plan under a parameter budget")
    pl.add_argument("model", help="minilm, a local HF model directory, or package.module:factory")
    pl.add_argument("--budget", required=True, help="trainable parameters: a count (250000, 250k) or a percentage (0.5%%)")
    pl.add_argument("--task", help="folder with train.tsv/dev.tsv (LABEL<TAB>TEXT): plan by gradient sensitivity")
    pl.add_argument("--num-labels", type=int, default=2, help="classes of the task (with --task)")
    pl.add_argument("--batches", type=int, default=8, help="calibration batches for the sensitivity pass")
    pl.add_argument("--batch-size", type=int, default=16)
    pl.add_argument("--seed", type=int, default=0)
    pl.add_argument("-o", "--out", default="plan.json", help="where to write the plan (default plan.json)")
    pl.set_defaults(run=_plan)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"peftplan {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

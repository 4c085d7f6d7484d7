"""``peftplan plan MODEL --budget B``: a LoRA plan allocated without training, from the
weights alone or, with ``--task``, by gradient sensitivity on the task's first batches."""

from __future__ import annotations

import argparse

from . import arguments


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="allocate a LoRA plan under a parameter budget")
    arguments.model(p)
    arguments.budget(p)
    arguments.task(
        p,
        required=False,
        help=arguments.TASK + "; with it, sites are scored by gradient sensitivity on its "
        "first batches and the plan is made on the task's model (a classifier, with its head)",
    )
    p.add_argument(
        "--batches", type=int, default=4, help="calibration batches of the sensitivity pass (with --task; default 4)"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--out", default="plan.json", help="where to write the plan (default plan.json)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from peftplan.models import load_model
    from peftplan.planner import search

    task = None
    if args.task:
        model, task = arguments.source(args, args.batch_size, args.batch_size * args.batches).load()
    else:
        model = load_model(args.model)
    plan = search(
        model,
        arguments.as_budget(args),
        task=task,
        strategy="proxy",
        seed=args.seed,
        calibration_batches=args.batches if task else None,
    )
    print(plan.summary())
    plan.save(args.out)
    print(f"wrote {args.out}")
    return 0

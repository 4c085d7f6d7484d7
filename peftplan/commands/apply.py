"""``peftplan apply MODEL --plan plan.json --task DATA``: apply a plan, train it by its recipe
(or the flags'), report the validation and evaluation metric, save the artifact."""

from __future__ import annotations

import argparse
import sys

from . import arguments


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("apply", help="apply a plan, train it by its recipe, save the adapters")
    arguments.model(p)
    p.add_argument("--plan", required=True, help="plan.json from `peftplan plan` or `peftplan search`")
    arguments.task(
        p,
        required=True,
        help=arguments.TASK + "; its validation split (--validation) is held out as in search, "
        "the evaluation data (--eval, a folder's dev.tsv) scored after training",
    )
    p.add_argument("--lr", type=float, help="override the plan's learning rate")
    p.add_argument("--steps", type=int, help="override the plan's training length")
    p.add_argument(
        "--validation", type=float, default=0.2, help="share of the training data held out (default 0.2, as search)"
    )
    p.add_argument("--batch-size", type=int, help="default: the plan's recipe's")
    p.add_argument("--max-train", type=int, help="keep this many training examples (after the validation split)")
    p.add_argument("--max-dev", type=int, help="keep this many evaluation examples")
    p.add_argument("--seed", type=int, default=0)
    arguments.training(p)
    p.add_argument(
        "--match",
        choices=("name", "role+depth"),
        default="name",
        help="how plan entries find their sites: by name on the model the plan was made for (default), or by role "
        "and depth on another model (a deeper one of the same family)",
    )
    p.add_argument("-o", "--out", default="adapter", help="artifact directory (default adapter/)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    import peftplan as pp

    plan = pp.Plan.load(args.plan)
    recipe = plan.recipe or pp.Recipe()
    changes = {k: v for k, v in (("lr", args.lr), ("steps", args.steps)) if v is not None}
    recipe = replace(recipe, **changes, **({"epochs": None} if "steps" in changes else {}))
    batch_size = args.batch_size or recipe.batch_size or 16
    source = arguments.source(args, batch_size, args.max_train, args.max_dev, validation=args.validation)
    model, task = source.load()
    model, seconds = train_and_report(model, plan, task, recipe, args)
    print(f"wrote {pp.save(model, args.out)} ({seconds:.0f} s of training)")
    return 0


def train_and_report(model, plan, task, recipe, args: argparse.Namespace):
    """``model`` with ``plan`` applied and trained by ``recipe``, its metric and loss printed on the
    validation and evaluation data, with a warning where they are at chance; (model, seconds)."""
    import peftplan as pp
    from peftplan.backends.inspection import applied_plan
    from peftplan.describe import reuse_warnings
    from peftplan.planner.training.diagnose import diagnose_model
    from peftplan.planner.training.evaluate import scores

    for warning in reuse_warnings(plan.provenance, model, task.kind):
        print(f"warning: {warning}")
    applied = applied_plan(pp.apply(model, plan, match=getattr(args, "match", "name")))
    if "retargeted" in applied.provenance:
        print(f"re-targeted: {applied.provenance['retargeted']}")
    print(
        f"applied {applied.summary()}; training {recipe.total_steps(len(task.train_batches))} steps at lr {recipe.lr:g}"
    )
    run = pp.train(
        model,
        task,
        recipe,
        seed=args.seed,
        progress=not args.quiet,
        device=args.device,
        bf16=args.bf16,
        checkpointing=args.checkpointing,
    )
    for split, batches in (("validation", task.validation_batches), ("evaluation", task.eval_batches)):
        if batches:
            scored = scores(model, task, batches)  # one pass: the metric, the loss and the predictions
            print(f"{split} {task.metric_name} {scored.metric:.4f}, loss {scored.loss:.4f}")
            warning = diagnose_model(model, task, split, batches, scored.metric, scored)
            if warning:
                print(warning, file=sys.stderr)
    return model, run.seconds

"""``peftplan search`` and ``peftplan worker``: the multi-objective search over plans (one
process, or several joining a stored study), its Pareto front and best plan reported."""

from __future__ import annotations

import argparse
import sys

from . import arguments


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="multi-objective search over plans: trains candidates, keeps the Pareto front")
    arguments.model(p)
    arguments.task(
        p,
        required=True,
        help=arguments.TASK + "; candidates are scored on a validation split of the training data "
        "(--validation), never on the evaluation data, which --eval has the returned plan trained and scored on "
        "at the end",
    )
    arguments.budget(p)
    _study(p)
    _recipe(p)
    p.add_argument(
        "--validation",
        type=float,
        default=0.2,
        help="share of the training data held out to score candidates on (default 0.2)",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-train", type=int, help="keep this many training examples (after the validation split)")
    p.add_argument("--max-dev", type=int, help="keep this many dev (evaluation) examples")
    p.set_defaults(run=run)
    _outputs(p)


def _study(p: argparse.ArgumentParser) -> None:
    """The study: its strategy, size, storage, objectives, methods and successive-halving policy."""
    from peftplan.backends.base import DEFAULT_METHODS
    from peftplan.planner.search import TRIALS
    from peftplan.planner.strategies import DEFAULT, STRATEGIES

    p.add_argument(
        "--strategy", default=DEFAULT, help=f"{DEFAULT} (default), {', '.join(s for s in STRATEGIES if s != DEFAULT)}"
    )
    p.add_argument(
        "--trials", type=int, default=TRIALS, help=f"completed candidates at the first rung (default {TRIALS})"
    )
    p.add_argument(
        "--storage",
        default="sqlite:///peftplan-study.db",
        help="optuna storage URL: SQLite file (default sqlite:///peftplan-study.db) or postgresql://… for several machines",
    )
    p.add_argument("--study", help="study name (default: derived from the settings, so a rerun resumes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--objectives", default="metric,params", help="comma-separated: metric plus params, memory, latency")
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated PEFT methods of the space (default {','.join(DEFAULT_METHODS)})",
    )
    p.add_argument(
        "--rungs",
        type=int,
        help="successive-halving rungs, each eta times longer (default: every candidate at "
        "5%% of the recipe, then at the full recipe what --runs leaves)",
    )
    p.add_argument(
        "--refine",
        type=int,
        default=0,
        help="trainings of the top rung's best plan at neighbouring learning "
        "rates, at the full recipe (default 0: none)",
    )
    p.add_argument(
        "--runs",
        type=float,
        default=3.0,
        help="the search's cost cap in final-run equivalents: the full recipe's runs get what the "
        "screens and refinements leave (default 3; 0: no cap, the baselines and 1/eta of the rest go on)",
    )
    p.add_argument(
        "--screen-by",
        default="loss",
        choices=("loss", "metric"),
        help="what promotion to the next rung ranks candidates by (default: the validation loss; the "
        "returned plan is the best by the metric at the top rung)",
    )
    p.add_argument("--eta", type=int, default=3, help="each rung keeps 1/eta of the candidates, eta times longer")


def _recipe(p: argparse.ArgumentParser) -> None:
    from peftplan.recipe import SCHEDULES

    p.add_argument(
        "--lr-range",
        default="auto",
        help="learning rates the search tries: auto (a tenth to ten times --lr), none (--lr for all) or LOW,HIGH",
    )
    p.add_argument(
        "--steps",
        type=int,
        help="training steps of the recipe, the last rung's (default: one pass over the training batches)",
    )
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the recipe (default 1e-3)")
    p.add_argument(
        "--warmup", type=float, default=0.06, help="share of the steps the learning rate warms up over (default 0.06)"
    )
    p.add_argument("--schedule", default="linear", choices=SCHEDULES, help="after warm-up (default linear decay)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument(
        "--lr-ratio",
        type=float,
        default=1.0,
        help="LoRA+: the B matrices' learning rate as a multiple of --lr (default 1: plain LoRA; typically 2 to 16)",
    )


def add_worker(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="join a study made by `peftplan search` and take a share of its trials")
    p.add_argument("storage", help="the study's storage URL")
    p.add_argument("--study", help="study name (default: the storage's only study)")
    p.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="PACKAGE.MODULE:FACTORY",
        help="a model or space factory this worker may import and run (repeatable); the study's "
        "database cannot choose code on its own",
    )
    p.set_defaults(run=run_worker)
    _outputs(p)


def _outputs(p: argparse.ArgumentParser) -> None:
    """What search and worker share: where the plan goes, how trials run."""
    p.add_argument(
        "-o", "--out", default="plan.json", help="where to write the best plan within budget (default plan.json)"
    )
    p.add_argument("--front-png", help="also plot the front to this PNG")
    p.add_argument("--threads", type=int, help="torch threads per trial (default: torch's)")
    arguments.training(p)
    p.add_argument(
        "--heartbeat",
        type=int,
        default=30,
        help="seconds between heartbeats; a trial silent for twice that is re-queued",
    )
    p.add_argument(
        "--trial-timeout",
        type=float,
        metavar="SECONDS",
        help="stop a trial that runs longer and record it as failed, with the reason (default: no limit)",
    )


def run(args: argparse.Namespace) -> int:
    from peftplan.planner.study import run_search
    from peftplan.planner.study.halving import default_rungs, halving_rungs
    from peftplan.planner.training.evaluate import Fidelity

    source = arguments.source(args, args.batch_size, args.max_train, args.max_dev, validation=args.validation)
    model, task = source.load()
    recipe = _recipe_of(args)
    top = Fidelity(recipe.total_steps(len(task.train_batches)))
    rungs = default_rungs() if args.rungs is None else halving_rungs(top, args.rungs, args.eta)
    plan = run_search(
        model,
        arguments.as_budget(args),
        task,
        strategy=args.strategy,
        trials=args.trials,
        storage=args.storage,
        study_name=args.study,
        seed=args.seed,
        objectives=args.objectives.split(","),
        fidelities=rungs,
        eta=args.eta,
        recipe=recipe,
        lr_range=lr_range(args.lr_range),
        screen_by=args.screen_by,
        refine=args.refine,
        runs=args.runs or None,
        methods=args.methods.split(","),
        threads=args.threads,
        source=source,
        device=args.device,
        bf16=args.bf16,
        checkpointing=args.checkpointing,
        progress=not args.quiet,
        heartbeat=args.heartbeat,
        trial_timeout=args.trial_timeout,
    )
    report(plan, args, task)
    _evaluate(model, plan, task, args)
    return 0


def _evaluate(model, plan, task, args: argparse.Namespace) -> None:
    """The returned plan trained by its recipe and scored on ``--eval``; else a line saying why not."""
    import copy

    from .apply import train_and_report

    if not task.eval_batches:
        return
    if not args.eval:
        print(
            f"the evaluation data ({args.task}'s dev.tsv) is not scored: a search ranks plans on the validation split "
            f"only; pass --eval FILE to train the returned plan once more and score it here, or run `peftplan apply "
            f"{args.model} --plan {args.out} --task {args.task}`"
        )
        return
    print(f"training the returned plan once more by its recipe, to score it on {args.eval}")
    train_and_report(copy.deepcopy(model), plan, task, plan.recipe or _recipe_of(args), args)


def _recipe_of(args: argparse.Namespace):
    from peftplan.recipe import Recipe

    return Recipe(
        lr=args.lr,
        steps=args.steps,
        warmup=args.warmup,
        schedule=args.schedule,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        lr_ratio=args.lr_ratio,
    )


def lr_range(text: str):
    """``auto``, ``none`` or ``LOW,HIGH`` (e.g. ``2e-4,5e-3``) as `run_search`'s ``lr_range``."""
    if text in ("auto", "none"):
        return None if text == "none" else "auto"
    try:
        low, high = (float(x) for x in text.split(","))
    except ValueError:
        raise SystemExit(f"--lr-range {text!r}: give auto, none, or LOW,HIGH such as 2e-4,5e-3") from None
    return (low, high)


def run_worker(args: argparse.Namespace) -> int:
    from peftplan.planner.study import run_worker

    plan = run_worker(
        args.storage,
        args.study,
        progress=not args.quiet,
        threads=args.threads,
        heartbeat=args.heartbeat,
        allow=args.allow,
        device=args.device,
        bf16=args.bf16,
        checkpointing=args.checkpointing,
        trial_timeout=args.trial_timeout,
    )
    report(plan, args)
    return 0


def report(plan, args: argparse.Namespace, task=None) -> None:
    """The front, the best plan (written to ``--out``), a warning if its metric is at chance."""
    import math

    from peftplan.planner.training.diagnose import diagnose_metric

    from .front import print_front

    print_front(plan.front)
    print(f"best within budget: {plan.summary()}")
    metric = plan.objectives.get("metric")
    if plan.provenance.get("kind") == "causal-lm" and metric is not None:
        print(f"validation perplexity {math.exp(-metric):,.4g} (loss {-metric:.4f} per token)")
    warning = diagnose_metric(task, metric) if task is not None else None
    if warning:
        print(warning, file=sys.stderr)
    plan.save(args.out)
    print(f"wrote {args.out}")
    if args.front_png:
        print(f"wrote {plan.front.plot(args.front_png)}")
    if args.command == "search" and args.storage:
        from peftplan.planner.study.config import is_factory

        allow = f" --allow {args.model}" if is_factory(args.model) else ""
        study = plan.provenance.get("study")
        print(f"study {study!r}: more workers join with `peftplan worker {args.storage} --study {study}{allow}`")

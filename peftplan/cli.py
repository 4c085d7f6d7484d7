"""The ``peftplan`` command.

    peftplan lower minilm                       # the site table of the bundled real model
    peftplan lower tests.zoo:llama --json g.json
    peftplan plan minilm --budget 0.5% -o plan.json
    peftplan plan minilm --budget 75k --task ../shared/data/text/sst2 -o plan.json
    peftplan search minilm --task data/sst2 --budget 1% --strategy nsga2 --trials 27 --rungs 3
    peftplan apply minilm --plan plan.json --task data/sst2 -o adapter/   # train it by its recipe, save it
    peftplan worker sqlite:///peftplan-study.db     # another process joins the same study
    peftplan worker sqlite:///s.db --allow tests.zoo:llama   # ... whose model is a factory it trusts
    peftplan worker postgresql://host/db --device cuda:1     # one worker per GPU
    peftplan front sqlite:///peftplan-study.db --csv front.csv --png front.png --html front.html
    peftplan export ./base adapter/ -o merged/                # a merged Hugging Face folder
    peftplan export ./base adapter/ --peft -o peft_adapter/   # a peft adapter
    peftplan export --config axolotl --plan plan.json -o axolotl.yml

MODEL is ``minilm``, a local Hugging Face model directory, or ``package.module:factory``.
"""

from __future__ import annotations

import argparse
import sys


def _lower(args: argparse.Namespace) -> int:
    from peftplan.ir import lower
    from peftplan.models import load_model

    graph = lower(load_model(args.model))
    print(graph.table(max_rows=None if args.all else 60))
    if args.json:
        from peftplan.plan import write_atomic

        write_atomic(args.json, graph.to_json() + "\n")
        print(f"wrote {args.json}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from peftplan.models import load_model
    from peftplan.planner import search
    from peftplan.planner.study import Source

    budget = _budget(args)
    task = None
    if args.task:
        source = Source(
            args.model,
            args.task,
            args.tokenizer,
            args.num_labels,
            args.batch_size,
            args.batch_size * args.batches,
            seed=args.seed,
            eval=args.eval,
            **_columns(args),
        )
        model, task = source.load()
    else:
        model = load_model(args.model)
    plan = search(
        model, budget, task=task, strategy="proxy", seed=args.seed, calibration_batches=args.batches if task else None
    )
    print(plan.summary())
    plan.save(args.out)
    print(f"wrote {args.out}")
    return 0


def _columns(args: argparse.Namespace) -> dict[str, str | None]:
    """The data's columns and kind as `Source` fields; a flag of the other kind is an error."""
    from peftplan.models import is_causal_lm

    causal_lm = args.causal_lm or is_causal_lm(args.model)
    if causal_lm and (args.pair_column or args.label_column):
        raise ValueError(
            "--pair-column and --label-column are for classification; a causal LM reads --text-column, "
            "--prompt-column and --response-column, or --messages-column"
        )
    lm_only = [
        flag
        for flag, given in (
            ("--prompt-column", args.prompt_column),
            ("--response-column", args.response_column),
            ("--messages-column", args.messages_column),
            ("--choices", args.choices),
            ("--metric", args.metric),
        )
        if given
    ]
    if not causal_lm and lm_only:
        flags = ", ".join(lm_only[:-1]) + " and " + lm_only[-1] if len(lm_only) > 1 else lm_only[0]
        raise ValueError(f"{flags} {'are' if len(lm_only) > 1 else 'is'} for a causal language model: add --causal-lm")
    if causal_lm:
        return {
            "text_column": args.text_column,
            "prompt_column": args.prompt_column,
            "response_column": args.response_column,
            "messages_column": args.messages_column,
            "metric": args.metric or "loss",
            "choices": tuple(args.choices.split(",")) if args.choices else None,
            "kind": "causal-lm",
            "max_length": args.max_length,
        }
    return {
        "text_column": args.text_column,
        "pair_column": args.pair_column,
        "label_column": args.label_column,
        "max_length": args.max_length,
    }


def _tokenizer(spec: str):
    from peftplan.planner.study import load_tokenizer

    return load_tokenizer(spec)


def _budget(args: argparse.Namespace):
    from dataclasses import replace

    from peftplan.planner import Budget

    return replace(
        Budget.parse(args.budget), memory=args.memory, latency=args.latency, adapter_bytes=args.adapter_bytes
    )


def _search(args: argparse.Namespace) -> int:
    from peftplan.planner.study import Source, run_search
    from peftplan.planner.study.halving import default_rungs, halving_rungs
    from peftplan.planner.training.evaluate import Fidelity
    from peftplan.recipe import Recipe

    source = Source(
        args.model,
        args.task,
        args.tokenizer,
        args.num_labels,
        args.batch_size,
        args.max_train,
        args.max_dev,
        validation=args.validation,
        seed=args.seed,
        eval=args.eval,
        **_columns(args),
    )
    model, task = source.load()
    recipe = Recipe(
        lr=args.lr,
        steps=args.steps,
        warmup=args.warmup,
        schedule=args.schedule,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
    )
    top = Fidelity(recipe.total_steps(len(task.train_batches)))
    rungs = default_rungs() if args.rungs is None else halving_rungs(top, args.rungs, args.eta)
    plan = run_search(
        model,
        _budget(args),
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
        lr_range=_lr_range(args.lr_range),
        screen_by=args.screen_by,
        refine=args.refine,
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
    return _report(plan, args)


def _apply(args: argparse.Namespace) -> int:
    """Apply a plan to the model, train it by the plan's recipe (or the flags'), report the
    validation and evaluation metric, save the artifact."""
    from dataclasses import replace

    import peftplan as pp
    from peftplan.planner.study import Source
    from peftplan.planner.training.evaluate import validation_loss

    plan = pp.Plan.load(args.plan)
    recipe = plan.recipe or pp.Recipe()
    changes = {k: v for k, v in (("lr", args.lr), ("steps", args.steps)) if v is not None}
    recipe = replace(recipe, **changes, **({"epochs": None} if "steps" in changes else {}))
    batch_size = args.batch_size or recipe.batch_size or 16
    source = Source(
        args.model,
        args.task,
        args.tokenizer,
        args.num_labels,
        batch_size,
        args.max_train,
        args.max_dev,
        validation=args.validation,
        seed=args.seed,
        eval=args.eval,
        **_columns(args),
    )
    model, task = source.load()
    model = pp.apply(model, plan)
    print(f"applied {plan.summary()}; training {recipe.total_steps(len(task.train_batches))} steps at lr {recipe.lr:g}")
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
            print(
                f"{split} {task.metric_name} {task.metric(model, batches):.4f}, loss {validation_loss(model, task, batches):.4f}"
            )
    print(f"wrote {pp.save(model, args.out)} ({run.seconds:.0f} s of training)")
    return 0


def _lr_range(text: str):
    """``auto``, ``none`` or ``LOW,HIGH`` (e.g. ``2e-4,5e-3``) as `run_search`'s ``lr_range``."""
    if text in ("auto", "none"):
        return None if text == "none" else "auto"
    try:
        low, high = (float(x) for x in text.split(","))
    except ValueError:
        raise SystemExit(f"--lr-range {text!r}: give auto, none, or LOW,HIGH such as 2e-4,5e-3") from None
    return (low, high)


def _worker(args: argparse.Namespace) -> int:
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
    return _report(plan, args)


def _report(plan, args: argparse.Namespace) -> int:
    import math

    _print_front(plan.front)
    print(f"best within budget: {plan.summary()}")
    metric = plan.objectives.get("metric")
    if plan.provenance.get("kind") == "causal-lm" and metric is not None:
        print(f"validation perplexity {math.exp(-metric):,.4g} (loss {-metric:.4f} per token)")
    plan.save(args.out)
    print(f"wrote {args.out}")
    if args.front_png:
        print(f"wrote {plan.front.plot(args.front_png)}")
    study = plan.provenance.get("study")
    if args.command == "search" and args.storage:
        from peftplan.planner.study.config import is_factory

        allow = f" --allow {args.model}" if is_factory(args.model) else ""
        print(f"study {study!r}: more workers join with `peftplan worker {args.storage} --study {study}{allow}`")
    return 0


def _front(args: argparse.Namespace) -> int:
    from peftplan.planner.study import study_front

    front = study_front(args.storage, args.study)
    _print_front(front)
    for path, write in (
        (args.csv, front.to_csv),
        (args.json, front.to_json),
        (args.png, front.plot),
        (args.html, front.plot),
    ):
        if path:
            print(f"wrote {write(path)}")
    return 0


def _print_front(front) -> None:
    print(f"Pareto front: {len(front)} plan{'s' if len(front) != 1 else ''}")
    for p in front:
        values = "  ".join(f"{k}={v:,.4g}" for k, v in p.values.items())
        where = f"trial {p.info.get('trial')}, rung {p.info.get('rung')}"
        print(f"  {values}  ({where}) {p.plan.summary().split(' (')[0] if p.plan else ''}")


def _export(args: argparse.Namespace) -> int:
    """Out of peftplan, into the user's stack: the tuned model (an artifact of `peftplan
    apply`, or a plan's untrained adapters) merged into a Hugging Face folder or as a peft
    adapter; or the plan alone as a peft or axolotl training config."""
    import json
    from pathlib import Path

    import peftplan as pp
    from peftplan.plan import write_atomic

    if bool(args.adapter) == bool(args.plan):
        raise ValueError("give the tuned model's artifact directory (MODEL ADAPTER) or --plan plan.json, one of them")
    plan = pp.Plan.load(args.plan) if args.plan else pp.Plan.load(Path(args.adapter) / "plan.json")
    if args.config == "axolotl":
        print(f"wrote {write_atomic(args.out, plan.to_axolotl())}")
        return 0
    if args.config == "peft":
        config = {k: sorted(v) if isinstance(v, set) else v for k, v in plan.to_peft_config().to_dict().items()}
        text = json.dumps(config, indent=2) + "\n"
        print(f"wrote {write_atomic(Path(args.out) / 'adapter_config.json', text)}")
        return 0
    if not args.model:
        raise ValueError(
            "name the base model (minilm, a local HF directory or package.module:factory) before the adapter"
        )
    model = _export_model(args.model, plan, args.num_labels)
    model = pp.load(model, args.adapter) if args.adapter else pp.apply(model, plan)
    if args.peft:
        written = pp.export_peft(model, args.out)
        print(f"wrote {', '.join(f'{k} adapter to {v}' for k, v in written.adapters.items())}")
        return 0
    try:
        out = pp.export_merged(model, args.out, tokenizer=args.tokenizer, max_shard_size=args.max_shard_size)
    except TypeError as e:  # a factory's plain module: no Hugging Face folder to write
        raise ValueError(str(e)) from None
    saved = sorted(p.name for p in out.iterdir())
    print(
        f"wrote {out}: {', '.join(saved)}"
        + (
            ""
            if any(n.startswith("tokenizer") for n in saved)
            else " (no tokenizer found: pass --tokenizer DIR to include one)"
        )
    )
    return 0


def _export_model(spec: str, plan, num_labels: int | None):
    """The base model a plan was made for, loaded as its class says: a causal LM, a
    classifier (with the plan's classes, else ``num_labels``), else the bare model."""
    from peftplan.models import load_model

    kind = str(plan.model.get("class", ""))
    if kind.endswith("ForCausalLM"):
        return load_model(spec, causal_lm=True)
    if kind.endswith("ForSequenceClassification"):
        return load_model(spec, num_labels or len(plan.provenance.get("labels") or ()) or 2)
    return load_model(spec, num_labels)


def _data(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--eval",
        metavar="FILE",
        help="evaluation data (default: the task folder's dev.tsv; none for a data file); only for the final report",
    )
    parser.add_argument("--text-column", help="the text column of a data file (default text)")
    parser.add_argument("--pair-column", help="the second text of sentence pairs (default: none)")
    parser.add_argument(
        "--label-column", help="the label column of a data file, class numbers or names (default label)"
    )
    parser.add_argument(
        "--causal-lm",
        action="store_true",
        help="fine-tune a causal language model (next-token loss) "
        "instead of a classifier; the data is a .txt (one example per line) or a table",
    )
    parser.add_argument(
        "--prompt-column", help="with --causal-lm: the prompt column of instruction data (not predicted)"
    )
    parser.add_argument("--response-column", help="with --causal-lm: the response column (the tokens the loss is over)")
    parser.add_argument(
        "--messages-column",
        help="with --causal-lm: chat data, a column of [{role, content}, ...] rendered "
        "by the tokenizer's chat template, the loss on the assistant turns (default: messages, if there)",
    )
    parser.add_argument(
        "--metric",
        choices=("loss", "choice", "exact_match"),
        help="with --causal-lm: what candidates are "
        "scored by: the loss (default), the accuracy of the likeliest of --choices, or exact answers",
    )
    parser.add_argument("--choices", help="with --metric choice: the answers, comma-separated (e.g. negative,positive)")
    parser.add_argument("--max-length", type=int, help="tokens per example (default 64; 128 with --causal-lm)")


def _limits(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--memory", help="limit on the training memory the plan adds (512MiB, 2GB)")
    parser.add_argument("--latency", help="limit on the forward FLOPs left after merging (2%%)")
    parser.add_argument("--adapter-bytes", help="limit on the saved adapters' size (10MiB)")


def build_parser() -> argparse.ArgumentParser:
    from peftplan.backends.base import DEFAULT_METHODS
    from peftplan.planner.search import TRIALS
    from peftplan.planner.strategies import DEFAULT, STRATEGIES
    from peftplan.recipe import SCHEDULES

    p = argparse.ArgumentParser(
        prog="peftplan", description="Plan and apply parameter-efficient fine-tuning, per site."
    )
    sub = p.add_subparsers(dest="command", required=True)

    lo = sub.add_parser("lower", help="show every tunable site of a model")
    lo.add_argument("model", help="minilm, a local HF model directory, or package.module:factory")
    lo.add_argument("--json", help="also write the site graph as JSON to this file")
    lo.add_argument("--all", action="store_true", help="print every row (default: at most 60)")
    lo.set_defaults(run=_lower)

    pl = sub.add_parser("plan", help="allocate a LoRA plan under a parameter budget")
    pl.add_argument("model", help="minilm, a local HF model directory, or package.module:factory")
    pl.add_argument(
        "--budget", required=True, help="trainable parameters: a count (250000, 250k) or a percentage (0.5%%)"
    )
    _limits(pl)
    pl.add_argument(
        "--task",
        help="folder with train.tsv/dev.tsv (LABEL<TAB>TEXT) or a data file (.csv, .json, .jsonl, "
        ".parquet): plan by gradient sensitivity",
    )
    _data(pl)
    pl.add_argument(
        "--tokenizer", help="tokenizer directory or 'minilm' (with --task; default: the model's; needed for a factory)"
    )
    pl.add_argument("--num-labels", type=int, default=2, help="classes of the task (with --task)")
    pl.add_argument(
        "--batches", type=int, default=4, help="calibration batches of the sensitivity pass (with --task; default 4)"
    )
    pl.add_argument("--batch-size", type=int, default=16)
    pl.add_argument("--seed", type=int, default=0)
    pl.add_argument("-o", "--out", default="plan.json", help="where to write the plan (default plan.json)")
    pl.set_defaults(run=_plan)

    ap = sub.add_parser("apply", help="apply a plan, train it by its recipe, save the adapters")
    ap.add_argument("model", help="minilm, a local HF model directory, or package.module:factory")
    ap.add_argument("--plan", required=True, help="plan.json from `peftplan plan` or `peftplan search`")
    ap.add_argument(
        "--task",
        required=True,
        help="the training data, as for search (its validation split held out the "
        "same way); the evaluation data (--eval, a folder's dev.tsv) is scored after training",
    )
    _data(ap)
    ap.add_argument("--lr", type=float, help="override the plan's learning rate")
    ap.add_argument("--steps", type=int, help="override the plan's training length")
    ap.add_argument(
        "--validation", type=float, default=0.2, help="share of the training data held out (default 0.2, as search)"
    )
    ap.add_argument("--tokenizer", help="tokenizer directory or 'minilm' (default: the model's; needed for a factory)")
    ap.add_argument("--num-labels", type=int, default=2, help="classes of the task")
    ap.add_argument("--batch-size", type=int, help="default: the plan's recipe's")
    ap.add_argument("--max-train", type=int, help="keep this many training examples (after the validation split)")
    ap.add_argument("--max-dev", type=int, help="keep this many evaluation examples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when available, else cpu)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast while training")
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (less memory, more compute)")
    ap.add_argument("-o", "--out", default="adapter", help="artifact directory (default adapter/)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    ap.set_defaults(run=_apply)

    se = sub.add_parser("search", help="multi-objective search over plans: trains candidates, keeps the Pareto front")
    se.add_argument("model", help="minilm, a local HF model directory, or package.module:factory")
    se.add_argument(
        "--task",
        required=True,
        help="folder with train.tsv/dev.tsv (LABEL<TAB>TEXT) or a data file (.csv, "
        ".json, .jsonl, .parquet); candidates are scored on a validation split of the training data "
        "(--validation), never on the evaluation data",
    )
    _data(se)
    se.add_argument(
        "--budget", required=True, help="trainable parameters: a count (250000, 250k) or a percentage (0.5%%)"
    )
    _limits(se)
    se.add_argument(
        "--strategy", default=DEFAULT, help=f"{DEFAULT} (default), {', '.join(s for s in STRATEGIES if s != DEFAULT)}"
    )
    se.add_argument(
        "--trials", type=int, default=TRIALS, help=f"completed candidates at the first rung (default {TRIALS})"
    )
    se.add_argument(
        "--storage",
        default="sqlite:///peftplan-study.db",
        help="optuna storage URL: SQLite file (default sqlite:///peftplan-study.db) or postgresql://… for several machines",
    )
    se.add_argument("--study", help="study name (default: derived from the settings, so a rerun resumes)")
    se.add_argument("--seed", type=int, default=0)
    se.add_argument(
        "--objectives", default="metric,params", help="comma-separated: metric plus params, memory, latency"
    )
    se.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated PEFT methods of the space (default {','.join(DEFAULT_METHODS)})",
    )
    se.add_argument(
        "--rungs",
        type=int,
        help="successive-halving rungs, each eta times longer (default: every candidate at "
        "5%% of the recipe, then the baselines and the best 1/eta of the rest at the full recipe)",
    )
    se.add_argument(
        "--refine",
        type=int,
        default=2,
        help="trainings of the top rung's best plan at neighbouring learning "
        "rates, at the full recipe (default 2; 0: none)",
    )
    se.add_argument(
        "--screen-by",
        default="loss",
        choices=("loss", "metric"),
        help="what promotion to the next rung ranks candidates by (default: the validation loss; the "
        "returned plan is the best by the metric at the top rung)",
    )
    se.add_argument(
        "--lr-range",
        default="auto",
        help="learning rates the search tries: auto (a tenth to ten times --lr), none (--lr for all) or LOW,HIGH",
    )
    se.add_argument("--eta", type=int, default=3, help="each rung keeps 1/eta of the candidates, eta times longer")
    se.add_argument(
        "--steps",
        type=int,
        help="training steps of the recipe, the last rung's (default: one pass over the training batches)",
    )
    se.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the recipe (default 1e-3)")
    se.add_argument(
        "--warmup", type=float, default=0.06, help="share of the steps the learning rate warms up over (default 0.06)"
    )
    se.add_argument("--schedule", default="linear", choices=SCHEDULES, help="after warm-up (default linear decay)")
    se.add_argument("--weight-decay", type=float, default=0.0)
    se.add_argument(
        "--validation",
        type=float,
        default=0.2,
        help="share of the training data held out to score candidates on (default 0.2)",
    )
    se.add_argument("--tokenizer", help="tokenizer directory or 'minilm' (default: the model's; needed for a factory)")
    se.add_argument("--num-labels", type=int, default=2, help="classes of the task")
    se.add_argument("--batch-size", type=int, default=16)
    se.add_argument("--max-train", type=int, help="keep this many training examples (after the validation split)")
    se.add_argument("--max-dev", type=int, help="keep this many dev (evaluation) examples")
    se.set_defaults(run=_search)

    wo = sub.add_parser("worker", help="join a study made by `peftplan search` and take a share of its trials")
    wo.add_argument("storage", help="the study's storage URL")
    wo.add_argument("--study", help="study name (default: the storage's only study)")
    wo.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="PACKAGE.MODULE:FACTORY",
        help="a model or space factory this worker may import and run (repeatable); the study's "
        "database cannot choose code on its own",
    )
    wo.set_defaults(run=_worker)

    for cmd in (se, wo):
        cmd.add_argument(
            "-o", "--out", default="plan.json", help="where to write the best plan within budget (default plan.json)"
        )
        cmd.add_argument("--front-png", help="also plot the front to this PNG")
        cmd.add_argument("--threads", type=int, help="torch threads per trial (default: torch's)")
        cmd.add_argument(
            "--device", help="where trials train: cpu, cuda, cuda:N (default: cuda when available, else cpu)"
        )
        cmd.add_argument(
            "--bf16", action="store_true", help="bf16 autocast in training and scoring (weights stay fp32)"
        )
        cmd.add_argument(
            "--checkpointing", action="store_true", help="gradient checkpointing (less memory, more compute)"
        )
        cmd.add_argument(
            "--heartbeat",
            type=int,
            default=30,
            help="seconds between heartbeats; a trial silent for twice that is re-queued",
        )
        cmd.add_argument(
            "--trial-timeout",
            type=float,
            metavar="SECONDS",
            help="stop a trial that runs longer and record it as failed, with the reason (default: no limit)",
        )
        cmd.add_argument("-q", "--quiet", action="store_true", help="no progress display")

    ex = sub.add_parser(
        "export",
        help="into your own stack: a merged Hugging Face folder, a peft adapter, or the plan as a "
        "peft or axolotl training config",
    )
    ex.add_argument(
        "model", nargs="?", help="the base model: minilm, a local HF model directory, or package.module:factory"
    )
    ex.add_argument(
        "adapter", nargs="?", help="the tuned model's artifact directory (peftplan apply -o, peftplan.save)"
    )
    ex.add_argument(
        "--plan",
        help="a plan.json instead of an artifact: its untrained adapters (e.g. --peft, to start "
        "axolotl's lora_model_dir from), or with --config the plan to write",
    )
    ex.add_argument(
        "--peft",
        action="store_true",
        help="write a peft adapter (adapter_config.json, adapter_model.safetensors) instead of a merged model",
    )
    ex.add_argument(
        "--config",
        choices=("peft", "axolotl"),
        help="write only the plan as a training config: peft's "
        "adapter_config.json into the -o folder (LoraConfig.from_pretrained), or an axolotl YAML fragment",
    )
    ex.add_argument(
        "--tokenizer", help="tokenizer directory saved beside a merged model (default: the model directory's)"
    )
    ex.add_argument(
        "--num-labels", type=int, help="classes of a sequence classifier (default: the plan's class names, else 2)"
    )
    ex.add_argument(
        "--max-shard-size", help="largest safetensors shard of a merged model (5GB, 500MB; default: transformers')"
    )
    ex.add_argument("-o", "--out", required=True, help="the folder (the YAML file with --config axolotl) to write")
    ex.set_defaults(run=_export)

    fr = sub.add_parser("front", help="export and plot the Pareto front of a stored study")
    fr.add_argument("storage", help="the study's storage URL")
    fr.add_argument("--study", help="study name (default: the storage's only study)")
    fr.add_argument("--csv", help="write the front as CSV")
    fr.add_argument("--json", help="write the front (plans included) as JSON")
    fr.add_argument("--png", help="plot the front (matplotlib)")
    fr.add_argument("--html", help="plot the front (plotly, interactive)")
    fr.set_defaults(run=_front)
    return p


def main(argv: list[str] | None = None) -> int:
    import optuna

    from peftplan.backends.base import shorten
    from peftplan.planner.study import StudyError

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # a search says itself what it runs and resumes
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, ImportError, StudyError, FloatingPointError) as e:
        print(f"peftplan {args.command}: error: {shorten(str(e), 4000)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C: a search says how far it got and how to go on; no traceback
        print(f"peftplan {args.command}: {str(e) or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

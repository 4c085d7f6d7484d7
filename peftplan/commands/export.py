"""``peftplan export``: out of peftplan, into the user's stack: the tuned model (an artifact of
`peftplan apply`, or a plan's untrained adapters) merged into a Hugging Face folder or as a peft
adapter; or the plan alone as a peft or axolotl training config."""

from __future__ import annotations

import argparse


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="into your own stack: a merged Hugging Face folder, a peft adapter, or the plan as a "
        "peft or axolotl training config",
    )
    p.add_argument(
        "model", nargs="?", help="the base model: minilm, a local HF model directory, or package.module:factory"
    )
    p.add_argument("adapter", nargs="?", help="the tuned model's artifact directory (peftplan apply -o, peftplan.save)")
    p.add_argument(
        "--plan",
        help="a plan.json instead of an artifact: its untrained adapters (e.g. --peft, to start "
        "axolotl's lora_model_dir from), or with --config the plan to write",
    )
    p.add_argument(
        "--peft",
        action="store_true",
        help="write a peft adapter (adapter_config.json, adapter_model.safetensors) instead of a merged model",
    )
    p.add_argument(
        "--config",
        choices=("peft", "axolotl"),
        help="write only the plan as a training config: peft's "
        "adapter_config.json into the -o folder (LoraConfig.from_pretrained), or an axolotl YAML fragment",
    )
    p.add_argument(
        "--tokenizer", help="tokenizer directory saved beside a merged model (default: the model directory's)"
    )
    p.add_argument(
        "--num-labels", type=int, help="classes of a sequence classifier (default: the plan's class names, else 2)"
    )
    p.add_argument(
        "--max-shard-size", help="largest safetensors shard of a merged model (5GB, 500MB; default: transformers')"
    )
    p.add_argument("-o", "--out", required=True, help="the folder (the YAML file with --config axolotl) to write")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import peftplan as pp

    if bool(args.adapter) == bool(args.plan):
        raise ValueError("give the tuned model's artifact directory (MODEL ADAPTER) or --plan plan.json, one of them")
    plan = pp.Plan.load(args.plan) if args.plan else pp.Plan.load(Path(args.adapter) / "plan.json")
    if args.config:
        return _config(plan, args)
    if not args.model:
        raise ValueError(
            "name the base model (minilm, a local HF directory or package.module:factory) before the adapter"
        )
    model = _model(args.model, plan, args.num_labels)
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


def _config(plan, args: argparse.Namespace) -> int:
    """The plan alone, as an axolotl YAML fragment or peft's adapter_config.json."""
    import json
    from pathlib import Path

    from peftplan.plan import write_atomic

    if args.config == "axolotl":
        print(f"wrote {write_atomic(args.out, plan.to_axolotl())}")
        return 0
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in plan.to_peft_config().to_dict().items()}
    text = json.dumps(config, indent=2) + "\n"
    print(f"wrote {write_atomic(Path(args.out) / 'adapter_config.json', text)}")
    return 0


def _model(spec: str, plan, num_labels: int | None):
    """The base model a plan was made for, loaded as its class says: a causal LM, a
    classifier (with the plan's classes, else ``num_labels``), else the bare model."""
    from peftplan.models import load_model

    kind = str(plan.model.get("class", ""))
    if kind.endswith("ForCausalLM"):
        return load_model(spec, causal_lm=True)
    if kind.endswith("ForSequenceClassification"):
        return load_model(spec, num_labels or len(plan.provenance.get("labels") or ()) or 2)
    return load_model(spec, num_labels)

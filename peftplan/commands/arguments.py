"""Flags several commands share, each defined once, and what they become: a `Source`, a
`Budget`, the data's columns."""

from __future__ import annotations

import argparse

MODEL = "minilm, a local HF model directory, or package.module:factory"
TASK = "folder with train.tsv/dev.tsv (LABEL<TAB>TEXT) or a data file (.csv, .json, .jsonl, .parquet)"


def model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help=MODEL)


def task(parser: argparse.ArgumentParser, *, required: bool, help: str = TASK) -> None:
    """``--task`` with the flags that read it: the data's columns and kind, the tokenizer, the classes."""
    parser.add_argument("--task", required=required, help=help)
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
    parser.add_argument(
        "--tokenizer", help="tokenizer directory or 'minilm' (default: the model's; needed for a factory)"
    )
    parser.add_argument(
        "--num-labels",
        type=int,
        default=2,
        help="classes of the task (default 2; a warning names the classes the data has when they are fewer)",
    )


def budget(parser: argparse.ArgumentParser) -> None:
    """``--budget`` and the other limits a plan must keep."""
    parser.add_argument(
        "--budget", required=True, help="trainable parameters: a count (250000, 250k) or a percentage (0.5%%)"
    )
    parser.add_argument("--memory", help="limit on the training memory the plan adds (512MiB, 2GB)")
    parser.add_argument("--latency", help="limit on the forward FLOPs left after merging (2%%)")
    parser.add_argument("--adapter-bytes", help="limit on the saved adapters' size (10MiB)")


def training(parser: argparse.ArgumentParser) -> None:
    """Where and how trainings run."""
    parser.add_argument(
        "--device", help="where training runs: cpu, cuda, cuda:N (default: cuda when available, else cpu)"
    )
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast in training and scoring (weights stay fp32)")
    parser.add_argument(
        "--checkpointing", action="store_true", help="gradient checkpointing (less memory, more compute)"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress display")


def as_budget(args: argparse.Namespace):
    from dataclasses import replace

    from peftplan.planner import Budget

    return replace(
        Budget.parse(args.budget), memory=args.memory, latency=args.latency, adapter_bytes=args.adapter_bytes
    )


def source(args: argparse.Namespace, batch_size: int, max_train: int | None, max_dev: int | None = None, **fields):
    """The `Source` the task flags name (``fields``: its other settings, such as ``validation``)."""
    from peftplan.planner.study import Source

    return Source(
        args.model,
        args.task,
        args.tokenizer,
        args.num_labels,
        batch_size,
        max_train,
        max_dev,
        seed=args.seed,
        eval=args.eval,
        **fields,
        **columns(args),
    )


def columns(args: argparse.Namespace) -> dict[str, str | None]:
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

"""Causal language modelling: building its `Task` from texts, instruction pairs or chats
(`for_causal_lm`, ``Task``'s constructor of the same name); the data, loss and encoding are
`lm`'s, the answer metrics `answers`'.

The data: ``train`` (and ``dev``, the evaluation data: the final report only) is a ``.txt`` file
(one example per non-blank line), a CSV, JSON/JSONL or Parquet file, a `datasets.Dataset` or
``DatasetDict`` (its ``train`` split; ``validation`` or ``test`` as dev), or a list of strings or
of dicts. Columns default to ``messages``, else ``text``, else ``prompt`` and ``response``.
Training examples are shuffled with ``seed``; then ``validation`` of them (a fraction, or a
count; or data of its own) become the validation split; ``max_train`` keeps a prefix of the rest
(``max_dev`` of dev). Each example is cut to ``max_length`` tokens; batches are right-padded (the
pad token, else EOS) with padding labelled -100 and masked. ``tokenizer`` None loads the model
directory's; ``device`` as in `for_sequence_classification`.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from . import answers, lm
from .data import load_tokenizer, splits, stratified_split, task_name

if TYPE_CHECKING:
    from .task import Task


def for_causal_lm(
    cls: type[Task],
    model_dir_or_model: str | os.PathLike | nn.Module,
    tokenizer: Any,
    train: Any,
    dev: Any = None,
    *,
    text_column: str | None = None,
    prompt_column: str | None = None,
    response_column: str | None = None,
    messages_column: str | None = None,
    metric: str = "loss",
    choices: Sequence[str] | None = None,
    batch_size: int = 8,
    max_length: int = 128,
    max_train: int | None = None,
    max_dev: int | None = None,
    seed: int = 0,
    validation: Any = 0.2,
    name: str | None = None,
    device: str | torch.device | None = None,
) -> Task:
    """A causal language-model task: next-token loss over each text; with ``prompt_column`` and
    ``response_column`` (instruction data) over the response alone, the prompt's tokens labelled
    -100; with ``messages_column`` (chat data: lists of ``{"role", "content"}`` messages, rendered
    by the tokenizer's chat template) over the assistant turns alone.

    ``metric`` is what a search maximises on the validation split: ``"loss"`` (minus the loss per
    predicted token; the perplexity is ``exp(-metric)``), ``"choice"`` (accuracy of the likeliest
    of ``choices``, the fixed set of answers) or ``"exact_match"`` (greedy answers equal to the
    reference, normalised); `answers` has the details, the module docstring the data and splits.

    >>> from peftplan.planner import Task
    >>> task = Task.for_causal_lm(tiny_llama(), chat_tokenizer(), [
    ...     {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    ...     for q, a in [("good?", "yes"), ("bad?", "no"), ("fine?", "yes"), ("ok?", "yes")]],
    ...     metric="choice", choices=["no", "yes"], validation=2)
    >>> task.kind, task.metric_name, len(task.validation_batches[0]["choice"])
    ('causal-lm', 'choice accuracy', 2)
    """
    columns = _check_options(
        train, batch_size, max_length, text_column, prompt_column, response_column, messages_column
    )
    lm.check_causal_lm(model_dir_or_model)
    default_name = name or task_name(train)
    rows, held, dev_rows = _lm_splits(train, dev, validation, columns, seed)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_dir_or_model)
    score, held_batches = answers.scoring(metric, tokenizer, choices, batch_size, max_length)
    task = cls(
        train_batches=lm.lm_batches(tokenizer, rows[:max_train], batch_size, max_length),
        eval_batches=held_batches(dev_rows[:max_dev]),
        loss=lm.causal_lm_loss,
        metric=score,
        name=default_name,
        validation_batches=held_batches(held),
        kind="causal-lm",
        weight=lm.predicted_tokens,
    )
    _check_predicts(task, default_name, max_length)
    return task if device is None else task.to(device)


def _check_predicts(task: Task, name: str, max_length: int) -> None:
    """Each split's batches predict at least one token (`lm.check_predicts`)."""
    for what, batches in (
        ("training", task.train_batches),
        ("validation", task.validation_batches),
        ("evaluation", task.eval_batches),
    ):
        lm.check_predicts(batches, what, name, max_length)


def _check_options(train: Any, batch_size: int, max_length: int, *columns: str | None) -> lm.LMColumns | None:
    """The columns a causal-LM task reads, after checking what can be checked before reading."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if max_length < 2:
        raise ValueError(
            f"max_length={max_length}: a causal LM example needs at least 2 tokens (one read, one predicted)"
        )
    checked = lm.LMColumns.of(*columns)
    if isinstance(train, (str, os.PathLike)) and Path(train).is_dir():
        raise ValueError(
            f"{train} is a folder: a causal LM task reads a data file (.txt with one example per line, "
            ".csv, .json, .jsonl, .parquet), a datasets.Dataset or a list of texts"
        )
    return checked


def _lm_splits(
    train: Any, dev: Any, validation: Any, columns: lm.LMColumns | None, seed: int
) -> tuple[list, list, list]:
    """(training, validation, evaluation) examples of a causal-LM task: the training examples
    shuffled with ``seed``, then ``validation`` of them held out (unless it is data of its own)."""
    train, dev, given = splits(train, dev, validation)
    rows = lm.read_examples(train, columns, "training data")
    random.Random(seed).shuffle(rows)
    held: list = []
    if given is not None:
        held = lm.read_examples(given, columns, "validation data")
    elif validation is not None:
        rest, kept = stratified_split([(0, x) for x in rows], validation, seed=seed)  # one class: a seeded draw
        rows, held = [x for _, x in rest], [x for _, x in kept]
    return rows, held, [] if dev is None else lm.read_examples(dev, columns, "evaluation data")

"""Sequence classification: building its `Task` from labelled data (`for_sequence_classification`,
``Task``'s constructor of the same name), its loss and its metrics (`accuracy`, `mcc`).

The data: each of ``train``, ``dev`` and ``validation`` (when it is data) is a ``LABEL<TAB>TEXT``
file (``.tsv``, integer labels), a CSV, JSON/JSONL or Parquet file (read by `datasets`), or a
`datasets.Dataset`; ``train`` may also be a folder holding ``train.tsv`` and ``dev.tsv``, or a
`datasets.DatasetDict` (its ``train`` split; its ``validation``, else ``test``, split as
``dev``). Tables have a ``text_column`` (default ``text``), optionally a ``pair_column`` (the
second text of sentence pairs) and a ``label_column`` (default ``label``) of class numbers or
class names; names become ids in ``labels`` order (default: sorted, or a ClassLabel's order),
kept in ``task.labels`` and in the provenance of the plans searched on it. A ``.tsv`` whose
columns are named is read as a table with a header row.

The splits: training examples are shuffled with ``seed``; then ``validation`` of them (a
fraction, or a count; None: none) become the validation split, stratified by label
(`stratified_split`), unless ``validation`` is itself data (a path or Dataset); ``max_train``
keeps a prefix of the rest; dev keeps file order (``max_dev``, a prefix). Each batch is padded
to its own longest text (at most ``max_length`` tokens). The loss is cross-entropy on
``model(**inputs).logits``.

    >>> matthews(torch.tensor([1, 0, 1, 0]), torch.tensor([1, 0, 1, 0]))
    1.0
"""

from __future__ import annotations

import math
import os
import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...backends.labels import check_model_labels
from .data import (
    Columns,
    Labels,
    Row,
    load_tokenizer,
    read_split,
    splits,
    stratified_split,
    task_name,
)
from .device import inference

if TYPE_CHECKING:
    from .task import Task

Batch = dict[str, torch.Tensor]


def for_sequence_classification(
    cls: type[Task],
    model_dir_or_model: str | os.PathLike | nn.Module,
    tokenizer: Any,
    train: Any,
    dev: Any = None,
    *,
    text_column: str | None = None,
    pair_column: str | None = None,
    label_column: str | None = None,
    labels: Sequence[str] | None = None,
    batch_size: int = 32,
    max_length: int = 64,
    max_train: int | None = None,
    max_dev: int | None = None,
    metric: str = "accuracy",
    seed: int = 0,
    validation: Any = 0.2,
    name: str | None = None,
    device: str | torch.device | None = None,
) -> Task:
    """A classification task: ``train`` gives the training and validation examples, ``dev``
    the evaluation examples (the final report only; None: none, or a DatasetDict's own).

    The data forms, columns, labels and splits are described in the module docstring.
    ``tokenizer`` may be None to load it from the model directory (or, for a model, from
    ``model.config._name_or_path``). ``metric`` is ``"accuracy"`` or ``"mcc"`` (Matthews
    correlation, the usual CoLA metric). ``device`` puts the batches there (None: they stay
    on the CPU and move to the model's device batch by batch).

    >>> from datasets import Dataset
    >>> from peftplan.planner import Task
    >>> data = Dataset.from_list([{"text": t, "label": y} for t, y in [("a good film", "pos"), ("a bad film", "neg")] * 4])
    >>> task = Task.for_sequence_classification(tiny_bert(), char_tokenizer(), data, batch_size=3, validation=2)
    >>> sorted(task.train_batches[0]), len(task.train_batches), task.labels
    (['attention_mask', 'input_ids', 'labels'], 2, ('neg', 'pos'))
    """
    _check_options(metric, batch_size)
    table, (train_rows, validation_rows, dev_rows) = _labelled_rows(
        train, dev, validation, _columns(text_column, pair_column, label_column), labels, seed
    )
    train_rows, dev_rows = train_rows[:max_train], dev_rows[:max_dev]
    _check_classes(model_dir_or_model, table, train_rows + validation_rows + dev_rows)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_dir_or_model)

    def batches(rows: list[Row]) -> list[Batch]:
        return _batches(tokenizer, rows, batch_size, max_length)

    task = cls(
        train_batches=batches(train_rows),
        eval_batches=batches(dev_rows),
        loss=classification_loss,
        metric=ClassMetric(METRICS[metric], table.names),
        name=name or task_name(train),
        validation_batches=batches(validation_rows),
        labels=table.names,
    )
    return task if device is None else task.to(device)


def _check_options(metric: str, batch_size: int) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {sorted(METRICS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")


def _columns(text: str | None, pair: str | None, label: str | None) -> Columns | None:
    """The columns a table is read by, or None when none was named (a ``.tsv`` is then
    ``LABEL<TAB>TEXT``)."""
    if (text, pair, label) == (None, None, None):
        return None
    return Columns(text or "text", pair, label or "label")


def _labelled_rows(
    train: Any, dev: Any, validation: Any, columns: Columns | None, labels: Sequence[str] | None, seed: int
) -> tuple[Labels, tuple[list[Row], list[Row], list[Row]]]:
    """The class table and the (training, validation, evaluation) rows: the training rows
    shuffled with ``seed``, then ``validation`` of them held out, stratified by label (unless
    it is data of its own)."""
    train, dev, given = splits(train, dev, validation)
    first = read_split(train, columns, "training data")
    table = Labels.from_values(first.labels, labels if labels is not None else first.class_names)
    column = (columns or Columns()).label

    def rows_of(split) -> list[Row]:
        return list(zip(table.ids(split.labels, split.source, column), split.texts))

    train_rows = rows_of(first)
    random.Random(seed).shuffle(train_rows)
    validation_rows: list[Row] = []
    if given is not None:
        validation_rows = rows_of(read_split(given, columns, "validation data"))
    elif validation is not None:
        train_rows, validation_rows = stratified_split(train_rows, validation, seed=seed)
    dev_rows = [] if dev is None else rows_of(read_split(dev, columns, "evaluation data"))
    return table, (train_rows, validation_rows, dev_rows)


def _batches(tokenizer: Any, rows: list[Row], batch_size: int, max_length: int) -> list[Batch]:
    """``rows`` tokenised in batches of ``batch_size``, each padded to its own longest text."""
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        texts = [t for _, t in chunk]
        pairs = list(zip(*texts)) if texts and isinstance(texts[0], tuple) else [texts]
        enc = tokenizer(*pairs, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out.append({**enc, "labels": torch.tensor([label for label, _ in chunk])})
    return out


def _check_classes(model: Any, table: Labels, rows: list[Row]) -> None:
    """The model must have an output for every class the data has."""
    n_labels = getattr(getattr(model, "config", None), "num_labels", None)
    if n_labels is None:
        return
    if table.names is not None and len(table.names) > n_labels:
        raise ValueError(
            f"the data has {len(table.names)} classes {list(table.names)} but the model has {n_labels} "
            f"labels; load it with num_labels={len(table.names)}"
        )
    seen = max((label for label, _ in rows), default=0)
    if seen >= n_labels and seen == n_labels and min(label for label, _ in rows) == 1:
        raise ValueError(
            f"the data's labels run from 1 to {seen}, but class numbers count from 0 (the model's {n_labels} "
            f"classes are 0 to {n_labels - 1}): renumber the labels 0 to {seen - 1}, or write class names"
        )
    if seen >= n_labels:
        raise ValueError(
            f"the data has label {seen} but the model has {n_labels} labels; load it with num_labels={seen + 1}"
        )
    classes = len(table.names) if table.names is not None else seen + 1
    if classes < n_labels:
        found = list(table.names) if table.names is not None else sorted({label for label, _ in rows})
        warnings.warn(
            f"the model has {n_labels} labels (num_labels={n_labels}, --num-labels) but the data has {classes} "
            f"classes (labels seen: {found}): the other outputs are never a right answer; load it with "
            f"num_labels={classes} (--num-labels {classes})",
            stacklevel=4,
        )


def classification_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Cross-entropy of ``model(**inputs).logits`` against ``batch["labels"]``."""
    inputs, labels = on_device(model, batch)
    return F.cross_entropy(model(**inputs).logits, labels)


def predictions(model: nn.Module, batches: list[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted, true) labels over ``batches``, in eval mode and without gradients."""
    pred, true = [], []
    with inference(model):
        for batch in batches:
            inputs, labels = on_device(model, batch)
            pred.append(model(**inputs).logits.argmax(-1).cpu())
            true.append(labels.cpu())
    return torch.cat(pred), torch.cat(true)


def accuracy(model: nn.Module, batches: list[Batch]) -> float:
    """Fraction of examples whose arg-max logit is the label."""
    pred, true = predictions(model, batches)
    return (pred == true).double().mean().item()


def mcc(model: nn.Module, batches: list[Batch]) -> float:
    """Matthews correlation of the arg-max predictions (multi-class form; 0 when undefined)."""
    return matthews(*predictions(model, batches))


def matthews(pred: torch.Tensor, true: torch.Tensor) -> float:
    """Matthews correlation coefficient from label vectors (Gorodkin's K-class form).

    >>> matthews(torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 0, 0]))
    0.5773502691896258
    """
    k = int(max(pred.max(), true.max())) + 1
    cm = torch.zeros(k, k, dtype=torch.float64)
    cm.index_put_((true.long(), pred.long()), torch.ones(len(true), dtype=torch.float64), accumulate=True)
    s, c = cm.sum(), cm.trace()
    p, t = cm.sum(0), cm.sum(1)  # predicted, true counts per class
    denom = math.sqrt((s * s - p @ p).item() * (s * s - t @ t).item())
    return 0.0 if denom == 0 else ((c * s - p @ t).item() / denom)


METRICS: dict[str, Callable[[nn.Module, list[Batch]], float]] = {"accuracy": accuracy, "mcc": mcc}


@dataclass(frozen=True)
class ClassMetric:
    """A classification metric (``fn``: `accuracy`, `mcc`) that first checks that the model's
    trained weights decode class ids as the task's ``labels`` do (`peftplan.backends.labels`):
    an artifact trained with other ids would score every prediction as the wrong class."""

    fn: Callable[[nn.Module, list[Batch]], float]
    labels: tuple[str, ...] | None = None

    def __call__(self, model: nn.Module, batches: list[Batch]) -> float:
        check_model_labels(model, self.labels)
        return self.fn(model, batches)


def on_device(model: nn.Module, batch: Batch) -> tuple[Batch, torch.Tensor]:
    """A labelled batch's (inputs, labels), moved to the device of ``model``'s parameters."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    return inputs, batch["labels"].to(device)

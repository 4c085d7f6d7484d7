"""`Task`: what scoring and evaluating a plan needs — batches, a loss, a metric, a step budget.
Its builders from data live beside it: `classification` (`Task.for_sequence_classification`,
with the classification loss and metrics) and `causal_lm` (`Task.for_causal_lm`).

    >>> from datasets import Dataset
    >>> data = Dataset.from_list([{"text": "a good film", "label": 1}, {"text": "a bad film", "label": 0}] * 8)
    >>> task = Task.for_sequence_classification(tiny_bert(), char_tokenizer(), data, batch_size=4)
    >>> len(task.train_batches), len(task.validation_batches), task.name, task.metric_name
    (4, 1, 'dataset', 'accuracy')
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn as nn

from ...ir.inputs import batch_shape
from . import answers, causal_lm, classification
from .classification import (  # the classification loss and metrics, importable from here as before
    METRICS,
    Batch,
    ClassMetric,
    accuracy,
    classification_loss,
    matthews,
    mcc,
    on_device,
    predictions,
)
from .data import Labels, stratified_split, validation_count
from .device import resolve

__all__ = [
    "METRICS",
    "Batch",
    "ClassMetric",
    "Task",
    "accuracy",
    "classification_loss",
    "matthews",
    "mcc",
    "on_device",
    "predictions",
    "stratified_split",
]


@dataclass
class Task:
    """Training, validation and evaluation batches plus how to score a model on them.

    ``loss(model, batch)`` returns a scalar tensor with an autograd graph;
    ``metric(model, batches)`` returns a float where higher is better; how long a run trains
    is its `Recipe`'s business (one pass over ``train_batches`` by default). A search scores candidates on
    ``validation_batches`` (carved from the training data); ``eval_batches`` are for the final
    report only.
    """

    train_batches: list[Batch]
    eval_batches: list[Batch]
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    metric: Callable[[nn.Module, list[Batch]], float]
    name: str = "task"
    validation_batches: list[Batch] = field(default_factory=list)
    labels: tuple[str, ...] | None = None  # class names by id, when the data named its classes
    kind: str = "classification"  # or "causal-lm" (`for_causal_lm`): what the metric means
    weight: Callable[[Batch], int] | None = None  # what a batch's mean loss is over (None: its examples)

    def with_validation(self, share: float | int, seed: int = 0) -> Task:
        """A copy whose validation batches are ``share`` of the training batches (a fraction in
        (0, 1), or a count), drawn with ``seed``; the rest stay training batches. For tasks
        built from batches; `for_sequence_classification` carves examples, stratified by label.

        >>> t = Task([{"x": i} for i in range(10)], [], None, None).with_validation(0.2, seed=1)
        >>> len(t.train_batches), len(t.validation_batches)
        (8, 2)
        """
        n = len(self.train_batches)
        k = validation_count(share, n, "training batches")
        picked = set(random.Random(seed).sample(range(n), k))
        return replace(
            self,
            train_batches=[b for i, b in enumerate(self.train_batches) if i not in picked],
            validation_batches=[b for i, b in enumerate(self.train_batches) if i in picked],
        )

    def to(self, device: str | torch.device) -> Task:
        """A copy whose batches live on ``device`` (moved once here rather than at every step).

        >>> Task([{"x": torch.ones(1)}], [], None, None).to("cpu").train_batches[0]["x"].device
        device(type='cpu')
        """
        device = resolve(device)

        def moved(batches: list[Batch]) -> list[Batch]:
            return [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in batches]

        return replace(
            self,
            train_batches=moved(self.train_batches),
            eval_batches=moved(self.eval_batches),
            validation_batches=moved(self.validation_batches),
        )

    def batch_shape(self) -> tuple[int, int]:
        """(batch, length) of the largest training batch: what training memory is costed at.

        >>> Task([{"input_ids": torch.zeros(8, 20)}, {"input_ids": torch.zeros(3, 40)}], [], None, None).batch_shape()
        (8, 20)
        """
        if not self.train_batches:
            raise ValueError(f"task {self.name!r} has no training batches")
        shapes = [batch_shape((), {k: v for k, v in b.items() if k != "labels"}) for b in self.train_batches]
        return max(shapes, key=lambda s: s[0] * s[1])

    def batch_size(self) -> int:
        """Examples in the first training batch (the others have as many, but the last)."""
        if not self.train_batches:
            raise ValueError(f"task {self.name!r} has no training batches")
        return _examples(self.train_batches[0])

    def proportion_of(self) -> int | None:
        """How many validation examples the metric is a share of (accuracy, choice accuracy,
        exact match: the n of its binomial standard error), or None for another metric (MCC,
        minus the loss per token).

        >>> Task([], [], None, accuracy, validation_batches=[{"labels": torch.zeros(8)}] * 2).proportion_of()
        16
        """
        if self.metric_name not in PROPORTIONS or not self.validation_batches:
            return None
        return sum(_examples(b) for b in self.validation_batches)

    def calibration(self, n: int) -> list[Batch]:
        """The first ``n`` training batches (all of them when there are fewer).

        >>> Task([{"x": 1}, {"x": 2}], [], None, None).calibration(1)
        [{'x': 1}]
        """
        if n < 1:
            raise ValueError(f"calibration needs at least one batch, got n={n}")
        if not self.train_batches:
            raise ValueError(f"task {self.name!r} has no training batches to calibrate on")
        return self.train_batches[:n]

    def provenance(self) -> dict[str, Any]:
        """What a plan records of the task beyond its name: the class names by id when the
        labels were names (``{"labels": ["neg", "pos"]}``), else nothing.

        >>> Task([], [], None, None, labels=("neg", "pos")).provenance()
        {'labels': ['neg', 'pos']}
        """
        return {**Labels(self.labels).provenance(), **({"kind": self.kind} if self.kind != "classification" else {})}

    @property
    def metric_name(self) -> str:
        """What the metric is, for tables and plot axes ("accuracy", "MCC", "minus loss per token").

        >>> Task([], [], None, mcc).metric_name
        'MCC'
        """
        if self.kind == "causal-lm":
            if self.metric is answers.choice_accuracy:
                return "choice accuracy"
            return "exact match" if isinstance(self.metric, answers.ExactMatch) else "minus loss per token"
        return {mcc: "MCC", accuracy: "accuracy"}.get(getattr(self.metric, "fn", self.metric), "metric")

    for_sequence_classification = classmethod(classification.for_sequence_classification)
    for_causal_lm = classmethod(causal_lm.for_causal_lm)


PROPORTIONS = ("accuracy", "choice accuracy", "exact match")  # metrics that are a share of the examples


def _examples(batch: Batch) -> int:
    return int(batch["labels"].shape[0]) if "labels" in batch else batch_shape((), dict(batch))[0]

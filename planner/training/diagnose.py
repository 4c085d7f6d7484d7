"""Results that are not results: a classifier's metric at the task's chance level, or
predictions that collapse to one class.

Chance is defined from the data scored on: for accuracy, the share of the most frequent label
among those examples (what always answering that class scores); for MCC, 0. A metric is at
chance when it is no more than two standard errors above it (the binomial error of a share
measured on n examples, sqrt(p (1 - p) / n) for accuracy; 1 / sqrt(n) for MCC), so on 1,000
balanced examples accuracy up to 0.53 is chance. Predictions collapse when one class takes at
least 99% of them while the labels hold it below that share.

    >>> labels = torch.tensor([0] * 50 + [1] * 50)
    >>> print(diagnose("validation", "accuracy", 0.51, labels))
    warning: validation accuracy 0.5100 is at chance level: always answering the most frequent class scores 0.5000 (50 of 100 labels), and 0.5100 is within 2 standard errors (0.1000) of it. The model has learnt (next to) nothing: usual causes are too few training steps (--steps), a learning rate too low or too high (--lr; LoRA-like methods train well at about 1e-4 to 5e-3), or too little data.
    >>> diagnose("validation", "accuracy", 0.9, labels, predicted=labels) is None
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .task import Task, accuracy, classification_loss, mcc, predictions

CAUSES = (
    "The model has learnt (next to) nothing: usual causes are too few training steps (--steps), a learning rate too "
    "low or too high (--lr; LoRA-like methods train well at about 1e-4 to 5e-3), or too little data."
)
COLLAPSED = 0.99  # one class taking this share of the predictions is a collapse


def diagnose(
    split: str,
    metric_name: str,
    metric: float,
    labels: torch.Tensor,
    predicted: torch.Tensor | None = None,
    names: Sequence[str] | None = None,
) -> str | None:
    """A warning when ``metric`` (accuracy or MCC over examples with ``labels``) is at chance or
    ``predicted`` collapses to one class; None when the result looks like learning."""
    n = len(labels)
    if n == 0:
        return None
    problems = []
    counts = torch.bincount(labels.long())
    if metric_name in ("accuracy", "MCC"):
        chance = counts.max().item() / n if metric_name == "accuracy" else 0.0
        error = math.sqrt(chance * (1 - chance) / n) if metric_name == "accuracy" else 1 / math.sqrt(n)
        if metric <= chance + 2 * error:
            what = (
                f"always answering the most frequent class scores {chance:.4f} ({counts.max().item()} of {n} labels)"
                if metric_name == "accuracy"
                else "a guess scores 0"
            )
            problems.append(
                f"{split} {metric_name} {metric:.4f} is at chance level: {what}, and {metric:.4f} is within "
                f"2 standard errors ({2 * error:.4f}) of it"
            )
    if predicted is not None and len(predicted) == n:
        top = torch.bincount(predicted.long())
        cls = int(top.argmax())
        share = top[cls].item() / n
        label_share = counts[cls].item() / n if cls < len(counts) else 0.0
        if share >= COLLAPSED and label_share < COLLAPSED:
            name = f"{names[cls]!r}" if names is not None and cls < len(names) else str(cls)
            problems.append(
                f"the predictions collapse to one class: {name} for {share:.0%} of the {n} {split} examples, "
                f"whose labels hold it {label_share:.0%} of the time"
            )
    return f"warning: {'; '.join(problems)}. {CAUSES}" if problems else None


def labels_of(batches: list[dict]) -> torch.Tensor:
    """Every example's label in ``batches`` (a classification task's), in order."""
    return torch.cat([b["labels"].reshape(-1).cpu() for b in batches]) if batches else torch.zeros(0, dtype=torch.long)


def classifies(task: Task) -> bool:
    """Whether ``task`` is peftplan's classification by accuracy or MCC: the tasks chance is defined for."""
    return (
        task.kind == "classification"
        and task.loss is classification_loss
        and getattr(task.metric, "fn", task.metric) in (accuracy, mcc)
    )


def diagnose_model(
    model: torch.nn.Module, task: Task, split: str, batches: list[dict], metric: float, scored: Any = None
) -> str | None:
    """`diagnose` for a trained classifier: its ``metric`` on ``batches`` and its predictions
    there (those of ``scored``, the `Scores` of a pass that kept them, else a pass of its own)."""
    if not classifies(task) or not batches:
        return None
    kept = scored is not None and scored.predicted is not None
    predicted, true = (scored.predicted, scored.true) if kept else predictions(model, batches)
    return diagnose(split, task.metric_name, metric, true, predicted, task.labels)


def diagnose_metric(task: Task, metric: float | None, split: str = "validation") -> str | None:
    """`diagnose` for a metric alone (a search's best, scored on ``task``'s validation batches)."""
    if metric is None or not classifies(task) or not task.validation_batches:
        return None
    return diagnose(split, task.metric_name, metric, labels_of(task.validation_batches))

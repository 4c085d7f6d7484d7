"""The class names a model's trained weights decode to, checked against a task's: a classifier
trained with ``('negative', 'positive')`` predicts id 0 for a negative review, and a task whose
ids run ``('positive', 'negative')`` would read every one of its predictions as the wrong class.

A model's trained mapping is its applied plan's ``provenance["labels"]`` once its weights are
trained — restored by `load` from an artifact, or trained by `train`, which records the task's
mapping and its recipe there (what `save` then writes) — else the ``id2label`` of a Hugging
Face model fine-tuned with named classes. A plan fresh from `apply` has untrained adapters:
the mapping of the task it was searched on does not bind the task it is trained on.

    >>> check_labels(("negative", "positive"), ("positive", "negative"), "the artifact")
    Traceback (most recent call last):
    ...
    peftplan.backends.base.PlanError: the artifact was trained with the classes ['negative', 'positive'] (ids 0, 1, …), the task names them ['positive', 'negative']: every prediction would be read as the wrong class. Build the task with labels=['negative', 'positive'] (the order the weights were trained in), or train on this task from the plan instead
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch.nn as nn

from .base import PlanError
from .inspection import PLAN_ATTR, UNDO_ATTR


def check_labels(trained: Sequence[str] | None, task: Sequence[str] | None, what: str) -> None:
    """`PlanError` when both mappings are known and differ; ``what`` names the trained side."""
    if trained is None or task is None or tuple(trained) == tuple(task):
        return
    trained, task = [str(n) for n in trained], [str(n) for n in task]
    fix = (
        (
            f"Build the task with labels={trained!r} (the order the weights were trained in), or train on this task from "
            "the plan instead"
        )
        if sorted(trained) == sorted(task)
        else "Train on this task from the plan instead (the weights were trained for other classes)"
    )
    raise PlanError(
        f"{what} was trained with the classes {trained} (ids 0, 1, …), the task names them {task}: every "
        f"prediction would be read as the wrong class. {fix}"
    )


def trained_labels(model: nn.Module) -> tuple[tuple[str, ...] | None, str]:
    """(the class names by id ``model``'s weights were trained with, or None when unknown; what
    to call their source in an error).

    >>> trained_labels(nn.Linear(2, 2))
    (None, 'the model')
    """
    undo = getattr(model, UNDO_ATTR, None)
    if undo is not None and undo.trained:
        names = getattr(model, PLAN_ATTR).provenance.get("labels")
        if names is not None:
            return tuple(str(n) for n in names), "the model's adapters (its artifact or last training run)"
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    names = tuple(str(id2label[i]) for i in sorted(id2label)) if all(isinstance(i, int) for i in id2label) else ()
    if names and not all(re.fullmatch(f"LABEL_{i}", n) for i, n in enumerate(names)):  # not transformers' placeholders
        return names, f"{type(model).__name__} (its config's id2label)"
    return None, "the model"


def check_model_labels(model: nn.Module, task_labels: Sequence[str] | None) -> None:
    """`check_labels` of ``model``'s trained mapping against a task's class names."""
    names, what = trained_labels(model)
    check_labels(names, task_labels, what)


def record_training(model: nn.Module, provenance: dict[str, Any], recipe: Any) -> None:
    """After training ``model`` on a task: its applied plan (a copy; the caller's plan object is
    left alone) records the task's ``provenance`` (class names, kind) in place of the search's,
    the task's name as ``trained_on``, and the ``recipe`` it was trained by; its weights count as
    trained from now on. A model without a plan applied is left as it is."""
    undo = getattr(model, UNDO_ATTR, None)
    if undo is None:
        return
    plan = getattr(model, PLAN_ATTR)
    kept = {k: v for k, v in plan.provenance.items() if k not in ("labels", "kind")}
    setattr(model, PLAN_ATTR, replace(plan, provenance={**kept, **provenance}, recipe=recipe))
    undo.trained = True

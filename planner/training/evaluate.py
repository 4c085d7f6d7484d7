"""`evaluate`: one trial — a plan on a fresh copy of the base model, trained by a `Recipe` at a
`Fidelity`, scored on the task's validation batches (carved from its training data: a search
never scores on the evaluation split it is reported on). A trial that diverges, runs out of
memory or raises comes back as failed with its reason; it never takes the search down.

    >>> from peftplan import Plan
    >>> plan = Plan(sites={"bert.encoder.layer.0.attention.self.query": {"method": "lora", "rank": 2, "alpha": 4}})
    >>> result = evaluate(tiny_bert(), plan, tiny_task(), Fidelity(steps=5), recipe=Recipe(lr=1e-3, steps=50))
    >>> 0 <= result.metric <= 1, result.params, result.failed  # rank 2 on a 32×32 projection: 2 * (32 + 32)
    (True, 128, None)
"""

from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...backends import apply, aux_loss, count_trainable
from ...backends.labels import check_model_labels
from ...plan import Plan
from ...recipe import Recipe
from ..proxy.scores import plan_gradients
from .answers import choice_accuracy, choice_accuracy_and_loss
from .classification import accuracy, classification_loss, matthews, mcc, on_device
from .device import autocast, inference, release, resolve
from .lm import causal_lm_loss, negative_token_loss, predicted_tokens
from .task import Task
from .train import train


@dataclass(frozen=True)
class Fidelity:
    """How much a trial trains: the recipe compressed to ``steps`` optimizer steps, or to
    ``share`` of its own steps (neither: the recipe's full length), over the first
    ``train_batches`` training batches (all when None), scored on the first ``eval_batches``
    validation batches (all when None).

    >>> Fidelity(share=0.1).recipe(Recipe(lr=1e-3, steps=200)).steps
    20
    >>> Fidelity(steps=0)
    Traceback (most recent call last):
    ...
    ValueError: Fidelity(steps=0): a trial trains at least one step (None: the recipe's full length)
    """

    steps: int | None = None
    train_batches: int | None = None
    eval_batches: int | None = None
    share: float | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "train_batches", "eval_batches"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                what = (
                    "trains at least one step (None: the recipe's full length)"
                    if name == "steps"
                    else "uses at least one batch (None: all of them)"
                )
                raise ValueError(f"Fidelity({name}={v!r}): a trial {what}")
        if self.share is not None:
            if isinstance(self.share, bool) or not isinstance(self.share, (int, float)) or not 0 < self.share <= 1:
                raise ValueError(f"Fidelity(share={self.share!r}): a share of the recipe's steps lies in (0, 1]")
            if self.steps is not None:
                raise ValueError("Fidelity: give steps or share, not both")

    def recipe(self, recipe: Recipe, batches_per_epoch: int | None = None) -> Recipe:
        """``recipe`` at this fidelity: the same shape over fewer steps (``batches_per_epoch``:
        the training batches, needed for a share of a recipe counted in epochs)."""
        if self.share is not None:
            if recipe.steps is None and batches_per_epoch is None:
                raise ValueError("Fidelity(share=…) of a recipe counted in epochs needs batches_per_epoch")
            return recipe.with_steps(max(1, round(self.share * recipe.total_steps(batches_per_epoch or 1))))
        return recipe if self.steps is None else recipe.with_steps(self.steps)

    @classmethod
    def from_text(cls, text: str) -> Fidelity | None:
        """The fidelity ``str(fidelity)`` wrote (a study stores that text); None for other text.

        >>> Fidelity.from_text(str(Fidelity(share=0.05, train_batches=4)))
        Fidelity(steps=None, train_batches=4, eval_batches=None, share=0.05)
        >>> Fidelity.from_text("30 steps").steps, Fidelity.from_text("the full recipe")
        (30, Fidelity(steps=None, train_batches=None, eval_batches=None, share=None))
        """
        found = re.fullmatch(
            r"(?:(\d+(?:\.\d+)?)% of the recipe|the full recipe|(\d+) steps)(?: on (\d+) batches)?", text
        )
        if found is None:
            return None
        share, steps, batches = found.groups()
        return cls(
            steps=int(steps) if steps else None,
            train_batches=int(batches) if batches else None,
            share=float(share) / 100 if share else None,
        )

    def __str__(self) -> str:
        if self.share is not None:
            length = f"{self.share:.0%} of the recipe"
        else:
            length = "the full recipe" if self.steps is None else f"{self.steps} steps"
        return length + (f" on {self.train_batches} batches" if self.train_batches else "")


@dataclass
class Evaluation:
    """A trial's outcome: the validation ``metric`` (higher is better) and mean validation
    ``loss`` (None when failed), trainable params, seconds, the failure reason, training losses,
    and of the seconds those spent training (None where the evaluator does not say)."""

    metric: float | None
    params: int
    seconds: float
    failed: str | None = None
    losses: list[float] = field(default_factory=list, repr=False)
    loss: float | None = None
    train_seconds: float | None = None

    @property
    def ok(self) -> bool:
        return self.failed is None


def evaluate(
    base: nn.Module,
    plan: Plan,
    task: Task,
    fidelity: Fidelity,
    *,
    recipe: Recipe | None = None,
    seed: int = 0,
    aux_weight: float = 0.01,
    device: str | torch.device | None = None,
    bf16: bool = False,
    checkpointing: bool = False,
) -> Evaluation:
    """Apply ``plan`` to a copy of ``base`` (left untouched), train by ``recipe`` (default
    `Recipe()`) at ``fidelity`` on ``device`` (None: CUDA when available, as `train`), with
    ``bf16`` autocast or not and ``checkpointing`` or not (`train`), score on the validation
    batches.

    ``aux_weight`` scales auxiliary losses of the plan's sites (MoE-LoRA load balancing)."""
    _check_validation(task)
    recipe = recipe or Recipe()
    start = time.perf_counter()
    params = int(plan.objectives.get("params", 0))
    losses: list[float] = []
    device = resolve(device, base)  # a device this machine lacks fails the search, not each trial
    model = None
    try:
        gradients = plan_gradients(base, plan, task, seed=seed)
        model = apply(copy.deepcopy(base), plan, gradients=gradients)  # train() moves it to the device
        params = count_trainable(model)
        sub, validation = _at_fidelity(task, fidelity, aux_weight)
        run = train(
            model,
            sub,
            fidelity.recipe(recipe, len(task.train_batches)),
            seed=seed,
            device=device,
            bf16=bf16,
            checkpointing=checkpointing,
        )
        losses = run.losses
        with autocast(device, bf16):
            metric, loss = metric_and_loss(model, task, validation)
    except Exception as e:  # any failing plan is a failed trial, recorded with its reason
        return failure(e, params, start, losses)
    finally:
        del model
        release(device)
    if metric != metric:  # NaN metric: the model produced garbage
        return Evaluation(None, params, time.perf_counter() - start, "metric is NaN", losses)
    return Evaluation(metric, params, time.perf_counter() - start, None, losses, loss, run.seconds)


def _check_validation(task: Task) -> None:
    if not task.validation_batches:
        raise ValueError(
            f"task {task.name!r} has no validation batches: a search scores candidates on a validation "
            "split carved from the training data, never on the evaluation split; build the task with "
            "validation=0.2 (or task.with_validation(0.2))"
        )


def _at_fidelity(task: Task, fidelity: Fidelity, aux_weight: float) -> tuple[Task, list]:
    """The task a trial trains on (``fidelity``'s share of the training batches, the sites' auxiliary
    losses added to its loss) and the validation batches it is scored on."""
    validation = task.validation_batches[: fidelity.eval_batches] if fidelity.eval_batches else task.validation_batches
    train_batches = task.train_batches[: fidelity.train_batches] if fidelity.train_batches else task.train_batches
    sub = replace(task, train_batches=train_batches, loss=lambda m, b: task.loss(m, b) + aux_weight * aux_loss(m))
    return sub, validation


def failure(e: BaseException, params: int, start: float, losses: list[float] | None = None) -> Evaluation:
    """A failed trial's `Evaluation`: the exception on one line (out of memory said first)."""
    reason = f"{type(e).__name__}: {e}"
    if isinstance(e, MemoryError) or "out of memory" in str(e).lower():
        reason = f"out of memory: {e}"
    reason = " ".join(line.strip() for line in reason.splitlines())[:500]
    return Evaluation(None, params, time.perf_counter() - start, reason, losses or [])


@dataclass(frozen=True)
class Scores:
    """What one scoring pass over a split gives: the metric, the loss and, for a classifier
    scored by peftplan's own pass, its ``predicted`` and ``true`` classes (else None)."""

    metric: float
    loss: float
    predicted: torch.Tensor | None = None
    true: torch.Tensor | None = None


def metric_and_loss(model: nn.Module, task: Task, batches: list) -> tuple[float, float]:
    """(``task.metric``, `validation_loss`) over ``batches`` (`scores`)."""
    scored = scores(model, task, batches)
    return scored.metric, scored.loss


def scores(model: nn.Module, task: Task, batches: list) -> Scores:
    """``task.metric`` and `validation_loss` over ``batches``: one forward pass per batch for
    peftplan's own tasks (classification by accuracy or Matthews correlation with
    cross-entropy, its predictions kept; a causal LM, whose metric is minus its token loss or
    the accuracy of its likeliest answers), a pass for each with any other metric or loss."""
    fn = getattr(task.metric, "fn", task.metric)  # a `ClassMetric`'s own
    if task.loss is classification_loss and fn in (accuracy, mcc) and task.weight is None:
        check_model_labels(model, getattr(task.metric, "labels", None))
        pred, true, total = [], [], 0.0
        with inference(model):
            for batch in batches:
                inputs, labels = on_device(model, batch)
                logits = model(**inputs).logits
                total += float(F.cross_entropy(logits, labels)) * len(labels)  # as classification_loss, by examples
                pred.append(logits.argmax(-1).cpu())
                true.append(labels.cpu())
        pred, true = torch.cat(pred), torch.cat(true)
        metric = (pred == true).double().mean().item() if fn is accuracy else matthews(pred, true)
        return Scores(float(metric), total / len(true), pred, true)
    if task.loss is causal_lm_loss and task.metric is negative_token_loss and task.weight is predicted_tokens:
        metric = float(negative_token_loss(model, batches))
        return Scores(metric, -metric)
    if task.loss is causal_lm_loss and task.metric is choice_accuracy and task.weight is predicted_tokens:
        return Scores(*choice_accuracy_and_loss(model, batches))
    return Scores(float(task.metric(model, batches)), validation_loss(model, task, batches))


def validation_loss(model: nn.Module, task: Task, batches: list) -> float:
    """Mean of ``task.loss`` over ``batches``, weighted by examples (or by ``task.weight``: a causal
    LM's predicted tokens), in eval mode without gradients."""
    total = n = 0.0
    with inference(model):
        for batch in batches:
            k = task.weight(batch) if task.weight is not None else len(next(iter(batch.values())))
            total += float(task.loss(model, batch)) * k
            n += k
    return total / n if n else float("nan")

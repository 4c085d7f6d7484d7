"""`UserLoop`: a user's own training loop as a search's evaluator. Each trial hands the user
function a fresh copy of the base model with the trial's plan applied (base frozen, adapters
trainable, initialised after ``torch.manual_seed(seed)``) and its `Fidelity`, resolved to the optimizer ``steps`` the trial trains; a function
that also takes ``recipe`` gets the trial's `Recipe` at that length (its learning rate is the
one the search chose for the trial). It returns the validation metric (higher is better), or a
dict with ``"metric"`` and optionally ``"loss"``. A function that raises fails its trial, with
the reason recorded, like a diverging run of peftplan's own trainer.

    >>> from peftplan.planner import search
    >>> def my_loop(model, fidelity, recipe):
    ...     ...  # train model for fidelity.steps steps at recipe.lr, then score it
    ...     return {"metric": 0.9, "loss": 0.3}
    >>> plan = search(tiny_bert(), "5%", evaluate=my_loop, trials=4,
    ...               calibration=tiny_task().train_batches[:2], progress=False)
    >>> plan.objectives["metric"]
    0.9

A loop needs no peftplan `Task`: the search scores sites from the weights alone (data-free,
and says so once), or by grad² on ``calibration=`` batches of the user's own (dicts the model
takes as keywords, labels included, so that its output has a ``loss``: a Hugging Face
model's batches, a DataLoader of them). Without a task the search knows no epoch: a recipe
counted in steps reaches the function as steps; one counted in epochs (the default: one)
as ``fidelity.share`` of a full run and ``recipe.epochs`` scaled to it, ``fidelity.steps`` None.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn as nn

from ...backends import apply, count_trainable
from ...plan import Plan
from ...recipe import Recipe
from .evaluate import Evaluation, Fidelity, failure
from .task import Task

OBJECTIVES = ("metric", "loss")  # what a user function may report: the costs come from the plan


@dataclass(frozen=True)
class UserLoop:
    """The `Evaluator` (``evaluator(base, plan, task, fidelity, *, recipe, seed)``) around
    ``fn(model, fidelity[, recipe])``; see the module docstring.

    >>> UserLoop(lambda model, fidelity: 1.0).takes_recipe, UserLoop(lambda m, f, recipe: 1.0).takes_recipe
    (False, True)
    """

    fn: Callable[..., float | Mapping[str, float]]

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError(f"evaluate= takes a function fn(model, fidelity) -> float, got {type(self.fn).__name__}")

    @property
    def takes_recipe(self) -> bool:
        """Whether ``fn`` takes the trial's recipe (a ``recipe`` parameter, or ``**kwargs``)."""
        try:
            parameters = inspect.signature(self.fn).parameters.values()
        except (TypeError, ValueError):  # a builtin without a signature: call it plainly
            return False
        return any(p.name == "recipe" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)

    def __call__(
        self,
        base: nn.Module,
        plan: Plan,
        task: Task,
        fidelity: Fidelity,
        *,
        recipe: Recipe | None = None,
        seed: int = 0,
    ) -> Evaluation:
        start = time.perf_counter()
        params = int(plan.objectives.get("params", 0))
        try:
            torch.manual_seed(seed)  # the adapters' initialisation: a trial is reproducible from its plan and seed
            model = apply(copy.deepcopy(base), plan)
            params = count_trainable(model)
            at, run = trial_length(fidelity, recipe or Recipe(), len(task.train_batches))
            planned = {id(p) for p in model.parameters() if p.requires_grad}
            out = self.fn(model, at, recipe=run) if self.takes_recipe else self.fn(model, at)
            check_trainable_kept(model, planned, params)
            metric, loss = objectives(out)
        except Exception as e:  # the user's loop failing fails its trial only
            return failure(e, params, start)
        if not math.isfinite(metric):
            return Evaluation(None, params, time.perf_counter() - start, f"evaluate returned metric {metric}")
        return Evaluation(metric, params, time.perf_counter() - start, None, [], loss)


def trial_length(fidelity: Fidelity, recipe: Recipe, batches: int) -> tuple[Fidelity, Recipe]:
    """The fidelity and recipe a user function gets: resolved to optimizer steps, or, where
    no batches count an epoch and the recipe counts epochs, a share of the user's own epochs.

    >>> trial_length(Fidelity(share=0.1), Recipe(steps=200), 0)[0].steps
    20
    >>> at, run = trial_length(Fidelity(share=0.1), Recipe(epochs=2), 0)
    >>> at.steps, at.share, run.epochs
    (None, 0.1, 0.2)
    """
    if batches or recipe.steps is not None or fidelity.steps is not None:
        run = fidelity.recipe(recipe, batches or None)
        steps = run.total_steps(max(1, batches))
        return replace(fidelity, steps=steps, share=None), run.with_steps(steps)
    share = 1.0 if fidelity.share is None else fidelity.share
    return replace(fidelity, share=share), replace(recipe, epochs=(recipe.epochs or 1.0) * share)


def objectives(out: Any) -> tuple[float, float | None]:
    """(metric, loss) from what a user function returned: a number or a dict of ``OBJECTIVES``.

    >>> objectives(0.8), objectives({"metric": 0.8, "loss": 0.4})
    ((0.8, None), (0.8, 0.4))
    >>> objectives({"accuracy": 0.8})
    Traceback (most recent call last):
    ...
    ValueError: evaluate returned {'accuracy': 0.8}: return the metric (higher is better) or a dict with 'metric' and optionally 'loss'; the params, memory and latency objectives come from the plan
    """
    if isinstance(out, Mapping):
        if "metric" not in out or set(out) - set(OBJECTIVES):
            raise ValueError(
                f"evaluate returned {dict(out)!r}: return the metric (higher is better) or a dict with "
                "'metric' and optionally 'loss'; the params, memory and latency objectives come from the plan"
            )
        loss = out.get("loss")
        return _number(out["metric"], "'metric'"), None if loss is None else _number(loss, "'loss'")
    return _number(out, "the metric"), None


def _number(value: Any, what: str) -> float:
    """One number from what a user function returned (a float, an int, a one-element tensor or
    array); anything else is an error saying what came back.

    >>> _number(torch.tensor([0.5, 0.6]), "the metric")
    Traceback (most recent call last):
    ...
    ValueError: evaluate returned Tensor of shape (2,) as the metric: return one number (higher is better), e.g. value.item() or value.mean().item()
    """
    shape = tuple(getattr(value, "shape", ()))
    if not isinstance(value, bool) and math.prod(shape) == 1 and hasattr(value, "__float__"):
        return float(value)
    if shape:
        raise ValueError(
            f"evaluate returned {type(value).__name__} of shape {shape} as {what}: return one number (higher "
            "is better), e.g. value.item() or value.mean().item()"
        )
    raise ValueError(
        f"evaluate returned {type(value).__name__} {str(value)[:80]!r} as {what}: return the metric (a "
        "number, higher is better) or a dict with 'metric' and optionally 'loss'"
    )


def check_trainable_kept(model: nn.Module, planned: set[int], params: int) -> None:
    """A user function must train the parameters the plan made trainable and no others: one
    that unfreezes the base would train weights the plan's cost (``params``) does not count."""
    added = [(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad and id(p) not in planned]
    if added:
        raise ValueError(
            f"evaluate made {sum(k for _, k in added):,} more parameters trainable than the plan's {params:,} "
            f"({', '.join(n for n, _ in added[:3])}{', …' if len(added) > 3 else ''}): the trial would train "
            "weights its plan does not count; leave requires_grad as the plan set it (only its adapters "
            "train)"
        )


def own_loop_options(
    evaluate: Callable[..., Any], task: Task | None, study_options: dict[str, Any], model: nn.Module
) -> tuple[Task, dict[str, Any]]:
    """The task and study options of ``search(..., evaluate=fn)``: ``fn`` wrapped as a
    `UserLoop`; the task and recipe ``fn`` brings (``fn.task``, a `Task` or a function of the
    model returning one, and ``fn.recipe``, as `peftplan.integrations.transformers.TrainerLoop`
    does) when none are given, else a task without batches (data-free site scores, said once);
    and no learning-rate search when ``fn`` does not take the recipe (it could not use the rate)."""
    if "evaluator" in study_options:
        raise TypeError(
            "give evaluate= (a function of the model) or evaluator= (peftplan's evaluator protocol), not both"
        )
    loop = UserLoop(evaluate)
    brought = getattr(evaluate, "task", None) if task is None else task
    task = brought(model) if callable(brought) and not isinstance(brought, Task) else brought
    if task is None:
        warnings.warn(
            "evaluate= without a task: sites are scored from their weights alone (data-free); pass "
            "calibration=<a few of your training batches> to score them by gradient sensitivity",
            stacklevel=3,
        )
        task = Task([], [], model_loss, None, name="own-loop")
    options = {**study_options, "evaluator": loop}
    if options.get("recipe") is None and getattr(evaluate, "recipe", None) is not None:
        options["recipe"] = evaluate.recipe
    if not loop.takes_recipe:
        options.setdefault("lr_range", None)
    return task, options


def calibration_task(batches: Iterable[Mapping[str, Any]], n: int) -> Task:
    """A task of the first ``n`` of the user's own ``batches`` (a list, a generator, a
    DataLoader; read no further), each a dict the model takes as keywords, its loss the
    model's own (``model(**batch).loss``): what site scores and memory costs are made from.

    >>> calibration_task(iter([{"x": torch.ones(2)}] * 9), 4).train_batches.__len__()
    4
    """
    if isinstance(batches, Task):
        raise TypeError("calibration= takes your own batches; a peftplan Task goes to task=")
    taken = list(itertools.islice(iter(batches), n))
    if not taken:
        raise ValueError(
            "calibration= gave no batches: pass a few training batches (dicts the model takes as keywords)"
        )
    wrong = next((type(b).__name__ for b in taken if not isinstance(b, Mapping)), None)
    if wrong:
        raise TypeError(
            f"calibration= yields {wrong}s: give batches as dicts of tensors the model takes as keywords, labels "
            "included so that its output has a loss (a Hugging Face model's batches), or pass task="
        )
    return Task([dict(b) for b in taken], [], model_loss, None, name="calibration")


def model_loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """The model's own loss on a batch of keyword inputs (moved to the model's device): a
    Hugging Face model's ``model(**batch).loss``, which needs the batch's labels.

    >>> class Fit(nn.Module):  # a model that, like Hugging Face's, returns its loss given labels
    ...     def __init__(self): super().__init__(); self.w = nn.Parameter(torch.ones(1))
    ...     def forward(self, x, labels): return type("Out", (), {"loss": ((self.w * x - labels) ** 2).mean()})
    >>> model_loss(Fit(), {"x": torch.ones(2), "labels": torch.zeros(2)}).item()
    1.0
    """
    device = next(model.parameters()).device
    out = model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    loss = getattr(out, "loss", None)
    if loss is None:
        raise ValueError(
            f"{type(model).__name__} gave no loss for a batch with keys {sorted(batch)}: include its labels "
            "(a Hugging Face model computes its loss from batch['labels'])"
        )
    return loss

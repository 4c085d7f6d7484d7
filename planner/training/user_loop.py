"""`UserLoop`: a user's own training loop as a search's evaluator. Each trial hands the user
function a fresh copy of the base model with the trial's plan applied (base frozen, adapters
trainable, initialised after ``torch.manual_seed(seed)``) and its `Fidelity`, resolved to the optimizer ``steps`` the trial trains; a function
that also takes ``recipe`` gets the trial's `Recipe` at that length (its learning rate is the
one the search chose for the trial). It returns the validation metric (higher is better), or a
dict with ``"metric"`` and optionally ``"loss"``. A function that raises fails its trial, with
the reason recorded, like a diverging run of peftplan's own trainer.

    >>> def my_loop(model, fidelity, recipe):
    ...     ...  # train model for fidelity.steps steps at recipe.lr, then score it
    ...     return {"metric": 0.9, "loss": 0.3}
    >>> plan = search(model, "0.5%", task, evaluate=my_loop, trials=8)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import inspect
import math
import time
from collections.abc import Callable, Mapping
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

    def __call__(self, base: nn.Module, plan: Plan, task: Task, fidelity: Fidelity, *, recipe: Recipe | None = None,
                 seed: int = 0) -> Evaluation:  # fmt: skip
        start = time.perf_counter()
        params = int(plan.objectives.get("params", 0))
        try:
            torch.manual_seed(seed)  # the adapters' initialisation: a trial is reproducible from its plan and seed
            model = apply(copy.deepcopy(base), plan)
            params = count_trainable(model)
            run = fidelity.recipe(recipe or Recipe(), len(task.train_batches) or None)
            steps = run.total_steps(max(1, len(task.train_batches)))
            at = replace(fidelity, steps=steps, share=None)
            out = self.fn(model, at, recipe=run.with_steps(steps)) if self.takes_recipe else self.fn(model, at)
            metric, loss = objectives(out)
        except Exception as e:  # the user's loop failing fails its trial only
            return failure(e, params, start)
        if not math.isfinite(metric):
            return Evaluation(None, params, time.perf_counter() - start, f"evaluate returned metric {metric}")
        return Evaluation(metric, params, time.perf_counter() - start, None, [], loss)


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
            raise ValueError(f"evaluate returned {dict(out)!r}: return the metric (higher is better) or a dict with "
                             "'metric' and optionally 'loss'; the params, memory and latency objectives come from the plan")  # fmt: skip
        loss = out.get("loss")
        return float(out["metric"]), None if loss is None else float(loss)
    if isinstance(out, bool) or not isinstance(out, (int, float)) and not hasattr(out, "__float__"):
        raise ValueError(f"evaluate returned {type(out).__name__} {out!r}: return the metric (a number, higher is better) "
                         "or a dict with 'metric' and optionally 'loss'")  # fmt: skip
    return float(out), None


def own_loop_options(evaluate: Callable[..., Any], task: Task | None, study_options: dict[str, Any]) -> tuple[Task, dict[str, Any]]:
    """The task and study options of ``search(..., evaluate=fn)``: ``fn`` wrapped as a
    `UserLoop`; the task and recipe ``fn`` brings (``fn.task``, ``fn.recipe``, as
    `peftplan.integrations.transformers.TrainerLoop` does) when none are given; and no
    learning-rate search when ``fn`` does not take the recipe (it could not use the rate)."""
    if "evaluator" in study_options:
        raise TypeError("give evaluate= (a function of the model) or evaluator= (peftplan's evaluator protocol), not both")
    loop = UserLoop(evaluate)
    task = task if task is not None else getattr(evaluate, "task", None)
    if task is None:
        raise ValueError("evaluate= trains and scores plans your way, but the search still needs a task: its training "
                         "batches give the proxy's site scores and the memory costs (validation batches are not needed); "
                         "pass task=...")  # fmt: skip
    options = {**study_options, "evaluator": loop}
    if options.get("recipe") is None and getattr(evaluate, "recipe", None) is not None:
        options["recipe"] = evaluate.recipe
    if not loop.takes_recipe:
        options.setdefault("lr_range", None)
    return task, options

"""`evaluate`: one trial — a plan on a fresh copy of the base model, trained at a fidelity,
scored on the task's dev batches. A trial that diverges, runs out of memory or raises comes
back as failed with its reason; it never takes the search down.

    >>> result = evaluate(base, plan, task, Fidelity(steps=50, train_batches=20))  # doctest: +SKIP
    >>> result.metric, result.params, result.failed  # doctest: +SKIP
    (0.84, 74114, None)
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace

import torch.nn as nn

from ...backends import apply, aux_loss, count_trainable
from ...plan import Plan
from .task import Task
from .train import train


@dataclass(frozen=True)
class Fidelity:
    """How much a trial trains: ``steps`` optimizer steps over the first ``train_batches``
    training batches (all when None), scored on the first ``eval_batches`` dev batches."""

    steps: int
    train_batches: int | None = None
    eval_batches: int | None = None

    def __str__(self) -> str:
        return f"{self.steps} steps" + (f" on {self.train_batches} batches" if self.train_batches else "")


@dataclass
class Evaluation:
    metric: float | None
    params: int
    seconds: float
    failed: str | None = None
    losses: list[float] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        return self.failed is None


def evaluate(base: nn.Module, plan: Plan, task: Task, fidelity: Fidelity, *, lr: float = 1e-3,
             seed: int = 0, aux_weight: float = 0.01) -> Evaluation:
    """Apply ``plan`` to a copy of ``base`` (left untouched), train at ``fidelity``, score.

    ``aux_weight`` scales auxiliary losses of the plan's sites (MoE-LoRA load balancing)."""
    start = time.perf_counter()
    params = int(plan.objectives.get("params", 0))
    losses: list[float] = []
    try:
        model = apply(copy.deepcopy(base), plan)
        params = count_trainable(model)
        sub = replace(
            task,
            train_batches=task.train_batches[: fidelity.train_batches] if fidelity.train_batches else task.train_batches,
            eval_batches=task.eval_batches[: fidelity.eval_batches] if fidelity.eval_batches else task.eval_batches,
            loss=lambda m, b: task.loss(m, b) + aux_weight * aux_loss(m),
        )
        run = train(model, sub, steps=fidelity.steps, lr=lr, seed=seed)
        losses = run.losses
        metric = float(task.metric(model, sub.eval_batches))
    except MemoryError as e:
        return Evaluation(None, params, time.perf_counter() - start, f"out of memory: {e}", losses)
    except Exception as e:  # any failing plan is a failed trial, recorded with its reason
        reason = f"{type(e).__name__}: {e}"
        if "out of memory" in str(e).lower():
            reason = f"out of memory: {e}"
        reason = " ".join(line.strip() for line in reason.splitlines())[:500]
        return Evaluation(None, params, time.perf_counter() - start, reason, losses)
    if metric != metric:  # NaN metric: the model produced garbage
        return Evaluation(None, params, time.perf_counter() - start, "metric is NaN", losses)
    return Evaluation(metric, params, time.perf_counter() - start, None, losses)

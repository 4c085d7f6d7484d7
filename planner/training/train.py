"""`train`: a plain AdamW loop over a `Task`'s batches, for demos, benchmarks and trials.

Only parameters with ``requires_grad`` are optimised (after `peftplan.apply`, the adapters
and any fully-trained head). The batch order comes from ``seed``, so two models trained with
the same seed see the same data in the same order.

    >>> result = train(model, task, steps=100, lr=1e-3, seed=0)  # doctest: +SKIP
    >>> result.seconds, result.losses[-1]  # doctest: +SKIP
    (41.2, 0.31)
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .progress import ProgressLine
from .task import Task


@dataclass
class TrainResult:
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)


def train(model: nn.Module, task: Task, *, steps: int | None = None, lr: float = 1e-3, weight_decay: float = 0.0,
          seed: int = 0, progress: bool = False, description: str = "training") -> TrainResult:
    """Train ``model`` in place for ``steps`` optimizer steps (default ``task.steps``)."""
    steps = task.steps if steps is None else steps
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameter: apply a plan first (peftplan.apply)")
    if not task.train_batches:
        raise ValueError(f"task {task.name!r} has no training batches")
    torch.manual_seed(seed)
    order = random.Random(seed)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    was_training = model.training
    model.train()
    losses: list[float] = []
    batches: list = []
    start = time.perf_counter()
    bar = ProgressLine(progress, description, steps, fields={"loss": float("nan")}, text="loss {loss:.3f}", transient=True)
    try:
        for _ in range(steps):
            if not batches:
                batches = list(task.train_batches)
                order.shuffle(batches)
            loss = task.loss(model, batches.pop())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training diverged: loss is {loss.item()} at step {len(losses) + 1}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.update(advance=1, loss=losses[-1])
    finally:
        bar.close()
        model.train(was_training)
    return TrainResult(steps, time.perf_counter() - start, losses)

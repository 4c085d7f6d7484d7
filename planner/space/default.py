"""`default_space`: the space a task search runs when given none — an `AllocatorSpace` over
the proxy's sites and scores, with the hand-written placements and the activation scores as
priors (so its seed plans are what a user would write and the one-shot allocations), and the
learning rate as a knob."""

from __future__ import annotations

from collections.abc import Iterable

import torch.nn as nn

from ...backends.base import DEFAULT_METHODS
from ...ir import lower
from ...ir.site import SiteGraph
from ..budget import Budget
from ..proxy.options import ProxyOptions
from ..training.task import Task
from .allocator import AllocatorSpace


def default_space(model: nn.Module, budget: Budget | int | str, task: Task, *, seed: int = 0,
                  objectives: Iterable[str] = ("metric", "params"), methods: Iterable[str] = DEFAULT_METHODS,
                  proxy: ProxyOptions | None = None, graph: SiteGraph | None = None,
                  lr: tuple[float, float] | None = None) -> AllocatorSpace:  # fmt: skip
    """An `AllocatorSpace` over the sites ``search(strategy="proxy")`` tunes, with the same
    scores, roles, rank cap and fully trained sites (all from ``proxy``), so
    ``space.proxy_params(1.0)`` is the proxy plan; `ProxyOptions.priors` as further score
    vectors (`AllocatorSpace.seeds` starts from them); ``lr``: the learning-rate range searched
    (None: the recipe's rate). Training memory is costed at ``task``'s largest training batch;
    a task without batches (a loop of the user's own) has none, so it cannot limit memory.

    >>> space = default_space(model, "1%", task, methods=("lora", "ia3"))  # doctest: +SKIP
    """
    options, objectives = proxy or ProxyOptions(), tuple(objectives)
    graph = lower(model) if graph is None else graph
    if not task.train_batches and ("memory" in objectives or Budget.coerce(budget).memory is not None):
        raise ValueError("training memory depends on the training batch, and this search has none: pass "
                         "calibration=<a few of your training batches> (or a task), or drop the memory limit and objective")  # fmt: skip
    scores, _ = options.site_scores(model, graph, task, seed=seed, progress=False)
    return AllocatorSpace(graph, scores, budget, methods=tuple(methods), roles=options.roles, max_rank=options.max_rank,
                          objectives=objectives, train_modules=options.full_sites(graph),
                          batch_shape=task.batch_shape() if task.train_batches else None,
                          priors=options.priors(model, graph, task), lr=lr)  # fmt: skip

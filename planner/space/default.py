"""`default_space`: the space a search runs when given none — an `AllocatorSpace` over the
proxy's sites and scores, with the hand-written placements and the activation scores as
priors (so its seed plans are what a user would write and the one-shot allocations), and the
learning rate as a knob. The proxy plan is one point of it: ``space.proxy_params(1.0)``."""

from __future__ import annotations

from collections.abc import Iterable

import torch.nn as nn

from ...backends.base import DEFAULT_METHODS
from ...ir import lower
from ...ir.site import SiteGraph
from ..budget import Budget
from ..proxy.options import ProxyOptions
from ..proxy.scores import Scored, score_sites
from ..training.task import Task
from .allocator import AllocatorSpace


def default_space(
    model: nn.Module,
    budget: Budget | int | str,
    task: Task | None,
    *,
    seed: int = 0,
    objectives: Iterable[str] = ("metric", "params"),
    methods: Iterable[str] = DEFAULT_METHODS,
    proxy: ProxyOptions | None = None,
    graph: SiteGraph | None = None,
    lr: tuple[float, float] | None = None,
    scored: Scored | None = None,
) -> AllocatorSpace:
    """An `AllocatorSpace` over the sites ``search(strategy="proxy")`` tunes, with the same
    scores, roles, rank cap and fully trained sites (all from ``proxy``), so
    ``space.proxy_params(1.0)`` is the proxy plan; the priors of `score_sites` as further score
    vectors (`AllocatorSpace.seeds` starts from them), all read in one pass over the task's
    calibration batches (or ``scored``, the sites' scores when already at hand); ``lr``: the
    learning-rate range searched (None: the recipe's rate). Training memory is costed at
    ``task``'s largest training batch; without a task or one without batches (a loop of the
    user's own) there is none, so it cannot limit memory.

    >>> space = default_space(tiny_bert(), "5%", tiny_task(), methods=("lora", "ia3"))
    >>> space.methods, space.objectives
    (('lora', 'ia3'), {'metric': 'max', 'params': 'min'})
    """
    options, objectives, budget = proxy or ProxyOptions(), tuple(objectives), Budget.coerce(budget)
    graph = lower(model) if graph is None else graph
    batches = task is not None and bool(task.train_batches)
    if not batches and ("memory" in objectives or budget.memory is not None):
        raise ValueError(
            "training memory depends on the training batch, and this search has none: pass "
            "calibration=<a few of your training batches> (or a task), or drop the memory limit and objective"
        )
    if scored is None:
        scored = score_sites(model, graph, task, options, seed=seed, progress=False, priors=True)
    return AllocatorSpace(
        graph,
        scored.scores,
        budget,
        methods=tuple(methods),
        roles=options.roles,
        max_rank=options.max_rank,
        objectives=objectives,
        train_modules=options.full_sites(graph),
        batch_shape=task.batch_shape() if batches else None,
        priors=scored.priors,
        lr=lr,
    )

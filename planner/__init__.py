"""peftplan.planner — what SHOULD be tuned (`SiteGraph` + budget + task → `Plan`).

The names that need optuna (spaces, samplers, studies) load on first use, so that
``import peftplan`` stays light.
"""

import importlib
from typing import Any

from ..plan import Plan
from .budget import Budget, BudgetError
from .cost import PlanCost, plan_cost, train_memory_estimate
from .front import FrontPoint, ParetoFront
from .proxy import allocate, alpha_scores, eligible_sites, grad2_scores, hill_alpha, rank_grid
from .search import search
from .strategies import STRATEGIES, make_sampler
from .training import Evaluation, Fidelity, Task, evaluate, train

_HEAVY = {  # name -> submodule (they import optuna)
    "AllocatorSpace": ".space",
    "GroupedSpace": ".space",
    "Space": ".space",
    "default_space": ".space",
    "run_search": ".study",
    "run_worker": ".study",
    "study_front": ".study",
}


def __getattr__(name: str) -> Any:
    if name in _HEAVY:
        return getattr(importlib.import_module(_HEAVY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "STRATEGIES",
    "AllocatorSpace",
    "Budget",
    "BudgetError",
    "Evaluation",
    "Fidelity",
    "FrontPoint",
    "GroupedSpace",
    "ParetoFront",
    "Plan",
    "PlanCost",
    "Space",
    "Task",
    "allocate",
    "alpha_scores",
    "default_space",
    "eligible_sites",
    "evaluate",
    "grad2_scores",
    "hill_alpha",
    "make_sampler",
    "plan_cost",
    "rank_grid",
    "run_search",
    "run_worker",
    "search",
    "study_front",
    "train",
    "train_memory_estimate",
]

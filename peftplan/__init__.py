"""peftplan — a compiler for parameter-efficient fine-tuning.

model ──lower──▶ SiteGraph ──search──▶ Plan ──apply──▶ tuned model
"""

from peftplan.backends import (
    apply,
    aux_loss,
    export_merged,
    export_peft,
    import_peft,
    load,
    merge,
    remove,
    save,
    to_peft,
    unmerge,
)
from peftplan.backends.base import Method, PlanError, get_method, methods, register
from peftplan.ir import Site, SiteGraph, lower
from peftplan.plan import Plan
from peftplan.planner import (
    Budget,
    BudgetError,
    Fidelity,
    ParetoFront,
    Task,
    plan_cost,
    search,
    train,
)
from peftplan.recipe import Recipe
from peftplan.version import __version__

__all__ = [
    "Budget",
    "BudgetError",
    "Fidelity",
    "Method",
    "ParetoFront",
    "Plan",
    "PlanError",
    "Site",
    "SiteGraph",
    "Recipe",
    "Task",
    "__version__",
    "apply",
    "aux_loss",
    "export_merged",
    "export_peft",
    "get_method",
    "import_peft",
    "load",
    "lower",
    "merge",
    "methods",
    "plan_cost",
    "register",
    "remove",
    "save",
    "search",
    "to_peft",
    "train",
    "unmerge",
]

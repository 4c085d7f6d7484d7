"""peftplan — a compiler for parameter-efficient fine-tuning.

    model ──lower──▶ SiteGraph ──search──▶ Plan ──apply──▶ tuned model
"""

__version__ = "0.1.0"

from peftplan.backends import (  # noqa: E402
    apply,
    aux_loss,
    export_peft,
    import_peft,
    load,
    merge,
    remove,
    save,
    unmerge,
)
from peftplan.backends.base import Method, PlanError, get_method, methods, register  # noqa: E402
from peftplan.ir import Site, SiteGraph, lower  # noqa: E402
from peftplan.planner import (  # noqa: E402
    Budget,
    BudgetError,
    Fidelity,
    ParetoFront,
    Plan,
    Task,
    plan_cost,
    search,
    train,
)

__all__ = [
    "Budget", "BudgetError", "Fidelity", "Method", "ParetoFront", "Plan", "PlanError", "Site", "SiteGraph",
    "Task", "apply", "aux_loss", "export_peft", "get_method", "import_peft", "load", "lower", "merge", "methods",
    "plan_cost", "register", "remove", "save", "search", "train", "unmerge",
]  # fmt: skip

"""peftplan — a compiler for parameter-efficient fine-tuning.

    model ──lower──▶ SiteGraph ──search──▶ Plan ──apply──▶ tuned model
"""

__version__ = "0.1.0"

from peftplan.backends import apply, export_peft, import_peft, load, merge, remove, save, unmerge  # noqa: E402
from peftplan.backends.base import Method, PlanError, get_method, methods, register  # noqa: E402
from peftplan.ir import Site, SiteGraph, lower  # noqa: E402
from peftplan.planner import Budget, BudgetError, Plan, Task, search  # noqa: E402

__all__ = [
    "Budget", "BudgetError", "Method", "Plan", "PlanError", "Site", "SiteGraph", "Task",
    "apply", "export_peft", "get_method", "import_peft", "load", "lower", "merge", "methods", "register", "remove", "save",
    "search", "unmerge",
]  # fmt: skip

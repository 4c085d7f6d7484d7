"""peftplan.planner — what SHOULD be tuned (`SiteGraph` + budget + task → `Plan`)."""

from peftplan.planner.allocate import allocate, eligible_sites, rank_grid
from peftplan.planner.budget import Budget, BudgetError
from peftplan.planner.plan import Plan
from peftplan.planner.scores import alpha_scores, grad2_scores, hill_alpha
from peftplan.planner.search import search
from peftplan.planner.task import Task

__all__ = [
    "Budget", "BudgetError", "Plan", "Task", "allocate", "alpha_scores", "eligible_sites",
    "grad2_scores", "hill_alpha", "rank_grid", "search",
]  # fmt: skip

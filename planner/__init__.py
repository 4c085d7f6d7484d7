"""peftplan.planner — what SHOULD be tuned (`SiteGraph` + budget + task → `Plan`)."""

from peftplan.planner.allocate import allocate, eligible_sites, rank_grid
from peftplan.planner.budget import Budget, BudgetError
from peftplan.planner.cost import PlanCost, plan_cost, train_memory_estimate
from peftplan.planner.evaluate import Evaluation, Fidelity, evaluate
from peftplan.planner.front import FrontPoint, ParetoFront
from peftplan.planner.plan import Plan
from peftplan.planner.retarget import retarget
from peftplan.planner.scores import alpha_scores, grad2_scores, hill_alpha
from peftplan.planner.search import search
from peftplan.planner.space import AllocatorSpace, GroupedSpace, Space
from peftplan.planner.strategies import STRATEGIES, make_sampler
from peftplan.planner.study import run_search, run_worker, study_front
from peftplan.planner.task import Task
from peftplan.planner.train import train

__all__ = [
    "STRATEGIES", "AllocatorSpace", "Budget", "BudgetError", "Evaluation", "Fidelity", "FrontPoint",
    "GroupedSpace", "ParetoFront", "Plan", "PlanCost", "Space", "Task", "allocate", "alpha_scores",
    "eligible_sites", "evaluate", "grad2_scores", "hill_alpha", "make_sampler", "plan_cost", "rank_grid",
    "retarget", "run_search", "run_worker", "search", "study_front", "train", "train_memory_estimate",
]  # fmt: skip

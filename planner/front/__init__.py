"""Pareto fronts of plans: `ParetoFront` (hypervolume, knee, best within limits, export) and its plots."""

from .pareto import FrontPoint, ParetoFront

__all__ = ["FrontPoint", "ParetoFront"]

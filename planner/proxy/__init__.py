"""The proxy: site scores without training (weights, grad²) and `allocate`, which turns scores
and a budget into LoRA ranks."""

from .allocate import allocate, eligible_sites, rank_grid
from .scores import alpha_scores, grad2_scores, hill_alpha

__all__ = ["allocate", "alpha_scores", "eligible_sites", "grad2_scores", "hill_alpha", "rank_grid"]

"""The proxy: site scores without training (weights, grad², input activations) and
`allocate`, which turns scores and a budget into LoRA ranks."""

from .allocate import allocate, eligible_sites, rank_grid
from .scores import activation_scores, alpha_scores, grad2_scores, hill_alpha

__all__ = ["activation_scores", "allocate", "alpha_scores", "eligible_sites", "grad2_scores", "hill_alpha", "rank_grid"]

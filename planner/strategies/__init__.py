"""Search strategies: the table of `Strategy` entries by name, and the samplers they make."""

from .table import (
    DEFAULT,
    POPULATION,
    STRATEGIES,
    WARMUP,
    Strategy,
    enqueue_seeds,
    get_strategy,
    make_sampler,
    seeded,
)

__all__ = [
    "DEFAULT",
    "POPULATION",
    "STRATEGIES",
    "WARMUP",
    "Strategy",
    "enqueue_seeds",
    "get_strategy",
    "make_sampler",
    "seeded",
]

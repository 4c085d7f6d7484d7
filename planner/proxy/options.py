"""`ProxyOptions`: how the proxy chooses sites, scores them and sizes ranks — frozen settings,
one object for ``search(strategy="proxy")`` and for the default space of a task search, whose
seed plans are therefore the proxy's plans (`peftplan.planner.proxy.scores.score_sites` scores
by them).

    >>> ProxyOptions(roles=["attn"], max_rank=16).to_dict()["roles"]
    ['attn']
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ...backends.base import RANK_UNIT
from ...ir.modules import HEAD_NAMES
from ...ir.site import SiteGraph
from .allocate import eligible_sites


def heads(graph: SiteGraph) -> list[str]:
    """The sites of a new classification head (``classifier…``, ``score…`` at the top level):
    trained fully by default in every path, since a fresh head learns nothing otherwise.

    >>> import torch.nn as nn, peftplan as pp
    >>> class Clf(nn.Module):
    ...     def __init__(self):
    ...         super().__init__(); self.body, self.classifier = nn.Linear(4, 4), nn.Linear(4, 2)
    ...     def forward(self, x): return self.classifier(self.body(x))
    >>> heads(pp.lower(Clf()))
    ['classifier']
    """
    return [s.name for s in graph if s.name.split(".")[0] in HEAD_NAMES]


@dataclass(frozen=True)
class ProxyOptions:
    """``roles``: sites the proxy may tune (``"attn"`` matches every ``attn.*``); ``max_rank``:
    the largest LoRA rank; ``train_modules``: sites trained fully, paid from the budget first
    (None: the model's new classification head, `heads`); ``calibration_batches``: training
    batches the grad² sensitivity pass reads; ``sensitivity_power``: scores are grad² to this
    power (0.5: gradient norm; 1: Fisher mass; 0: every site alike)."""

    roles: tuple[str, ...] = ("attn", "mlp")
    max_rank: int = 64
    train_modules: tuple[str, ...] | None = None
    calibration_batches: int = 4
    sensitivity_power: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "roles", tuple(self.roles))
        if self.train_modules is not None:
            object.__setattr__(self, "train_modules", tuple(self.train_modules))
        if not self.roles:
            raise ValueError("roles is empty: name the site roles the proxy may tune, e.g. ('attn', 'mlp')")
        if isinstance(self.max_rank, bool) or not isinstance(self.max_rank, int) or self.max_rank < 1:
            raise ValueError(f"max_rank must be a positive int, got {self.max_rank!r}")
        if (
            isinstance(self.calibration_batches, bool)
            or not isinstance(self.calibration_batches, int)
            or self.calibration_batches < 1
        ):
            raise ValueError(f"calibration_batches must be a positive int, got {self.calibration_batches!r}")
        if not (math.isfinite(self.sensitivity_power) and self.sensitivity_power >= 0):
            raise ValueError(
                f"sensitivity_power must be finite and non-negative (0.5: gradient norm; 1: Fisher mass), "
                f"got {self.sensitivity_power}"
            )

    @classmethod
    def build(cls, **given: Any) -> ProxyOptions:
        """From keyword options, None meaning "the default"."""
        return cls(**{k: v for k, v in given.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["roles"] = list(self.roles)
        d["train_modules"] = None if self.train_modules is None else list(self.train_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> ProxyOptions:
        return cls(**(d or {}))

    def full_sites(self, graph: SiteGraph) -> list[str]:
        """The sites trained fully: ``train_modules``, or the new head when not given."""
        names = heads(graph) if self.train_modules is None else list(self.train_modules)
        missing = [n for n in names if n not in graph]
        if missing:
            raise ValueError(
                f"train_modules: no site named {missing[0]!r}; see graph.names() for the {len(graph)} sites"
            )
        return names

    def tuned_sites(self, graph: SiteGraph) -> list[str]:
        """The sites the proxy gives ranks to: eligible for LoRA, a role in ``roles``, not fully trained."""
        return [s.name for s in eligible_sites(graph, RANK_UNIT, self.roles, exclude=set(self.full_sites(graph)))]

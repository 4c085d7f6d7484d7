"""`ProxyOptions`: how the proxy chooses sites, scores them and sizes ranks — one object for
``search(strategy="proxy")`` and for the default space of a task search, whose seed plans are
therefore the proxy's plans.

    >>> ProxyOptions(roles=["attn"], max_rank=16).to_dict()["roles"]
    ['attn']
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch.nn as nn

from ...ir.site import SiteGraph
from ..training.task import Task
from .allocate import eligible_sites
from .scores import activation_scores, alpha_scores, grad2_scores

METHOD = "lora"  # the method the proxy allocates ranks of
QUERY_VALUE = ("attn.q", "attn.v", "attn.qkv")  # peft's default LoRA targets: query and value, or the fused qkv
HEAD_NAMES = ("classifier", "score")  # top-level modules HF classification models add, freshly initialised


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
        if isinstance(self.calibration_batches, bool) or not isinstance(self.calibration_batches, int) or self.calibration_batches < 1:
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
            raise ValueError(f"train_modules: no site named {missing[0]!r}; see graph.names() for the {len(graph)} sites")
        return names

    def tuned_sites(self, graph: SiteGraph) -> list[str]:
        """The sites the proxy gives ranks to: eligible for LoRA, a role in ``roles``, not fully trained."""
        return [s.name for s in eligible_sites(graph, METHOD, self.roles, exclude=set(self.full_sites(graph)))]

    def site_scores(self, model: nn.Module, graph: SiteGraph, task: Task | None, *, seed: int = 0,
                    progress: bool = True) -> tuple[dict[str, float], dict[str, Any]]:  # fmt: skip
        """Each tuned site's score, and how it was scored (for the plan's provenance): weight
        statistics without a task (or one without training batches: a loop of the user's own),
        grad² on ``calibration_batches`` to ``sensitivity_power`` with one."""
        names = self.tuned_sites(graph)
        if task is None or not task.train_batches:
            return alpha_scores(model, graph, names), {"scores": "hill-alpha"}
        mass = grad2_scores(model, graph, task, names, batches=self.calibration_batches, seed=seed, progress=progress)
        scoring = {"scores": "grad2", "calibration_batches": self.calibration_batches,
                   "sensitivity_power": self.sensitivity_power}  # fmt: skip
        return {n: m**self.sensitivity_power for n, m in mass.items()}, scoring


    def priors(self, model: nn.Module, graph: SiteGraph, task: Task | None) -> dict[str, dict[str, float]]:
        """Score vectors besides the proxy's for `AllocatorSpace` (``priors``): the placements
        users write by hand — ``"query-value"`` (1 on the query and value projections, when
        the model has them) and ``"uniform"`` (1 on every tuned site) — and, with a task's
        training batches, ``"activation"`` (`activation_scores` on ``calibration_batches``)."""
        names = self.tuned_sites(graph)
        out: dict[str, dict[str, float]] = {}
        qv = {n: 1.0 for n in names if graph[n].role in QUERY_VALUE}
        if qv:
            out["query-value"] = qv
        out["uniform"] = {n: 1.0 for n in names}
        if task is not None and task.train_batches:
            out["activation"] = activation_scores(model, graph, task, names, batches=self.calibration_batches)
        return out

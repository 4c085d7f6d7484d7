"""`Recipe`: how a plan is trained — learning rate, length, warm-up, schedule, weight decay,
clipping — shared by `train`, every trial of a search and the final run, and saved with the
plan (`Plan.recipe`) so that whoever applies it trains it the way it was found.

    >>> r = Recipe(lr=2e-3, epochs=3, warmup=0.1, schedule="cosine")
    >>> r.total_steps(batches_per_epoch=100), r.with_steps(30).total_steps(100)
    (300, 30)
    >>> [round(r.with_steps(10).lr_at(s), 6) for s in (0, 1, 5, 9)]
    [0.002, 0.002, 0.001174, 6e-05]
    >>> Recipe.from_dict(r.to_dict()) == r
    True

A trial at a fidelity trains the same recipe compressed to fewer steps (`with_steps`): the
same warm-up fraction and schedule shape, so short runs are shaped like the final one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

SCHEDULES = ("linear", "cosine", "constant")
MAX_LR = 10.0  # above it AdamW overflows or diverges at the first step: a typo (1e300, True), not a rate


def _real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class _Rule:
    holds: Any  # value -> bool
    says: str
    optional: bool = False


CHECKS = {  # each field: what it must be, said with the field's name
    "lr": _Rule(
        lambda v: _real(v) and 0 < v <= MAX_LR,
        f"the learning rate must be a positive number, at most {MAX_LR:g} (typically 1e-5 to 1e-2)",
    ),
    "steps": _Rule(
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
        "steps must be a positive int, or None",
        optional=True,
    ),
    "epochs": _Rule(lambda v: _real(v) and v > 0, "epochs must be a positive number, or None", optional=True),
    "warmup": _Rule(lambda v: _real(v) and 0 <= v < 1, "the warm-up is a share of the steps in [0, 1)"),
    "schedule": _Rule(lambda v: v in SCHEDULES, f"choose one of {list(SCHEDULES)}"),
    "weight_decay": _Rule(lambda v: _real(v) and v >= 0, "weight decay must be a non-negative number"),
    "clip": _Rule(
        lambda v: _real(v) and v > 0, "the gradient-norm limit must be a positive number, or None", optional=True
    ),
    "lr_ratio": _Rule(
        lambda v: _real(v) and 1 <= v <= 1e3,
        "LoRA+'s ratio of the B matrices' learning rate to the A matrices' is a number from 1 (plain LoRA) to 1000 "
        "(typically 2 to 16)",
    ),
    "batch_size": _Rule(
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
        "batch_size must be a positive int, or None",
        optional=True,
    ),
}


@dataclass(frozen=True)
class Recipe:
    """``lr``: AdamW's peak learning rate; length: ``steps`` optimizer steps, or ``epochs``
    passes over the training batches (one pass when neither is given); ``warmup``: the share
    of the steps the learning rate rises linearly over, from ``lr / (warmup steps)`` to ``lr``;
    ``schedule``: then ``linear`` decay to 0, ``cosine`` decay to 0, or ``constant``;
    ``weight_decay``: AdamW's (decoupled); ``clip``: the largest gradient norm (None: no
    clipping); ``batch_size``: the training batch size the recipe was made for (None: the
    task's), checked against the task's batches by `train`; ``lr_ratio``: LoRA+ (Hayou et al.
    2024), the learning rate of LoRA's B matrices (the up-projections of LoRA and DoRA sites) as
    a multiple of ``lr``, the rest at ``lr`` (1: plain LoRA; written to a plan only when not 1)."""

    lr: float = 1e-3
    steps: int | None = None
    epochs: float | None = None
    warmup: float = 0.06
    schedule: str = "linear"
    weight_decay: float = 0.0
    clip: float | None = 1.0
    batch_size: int | None = None
    lr_ratio: float = 1.0

    def __post_init__(self) -> None:
        for name, rule in CHECKS.items():
            value = getattr(self, name)
            if value is None and rule.optional:
                continue
            if not rule.holds(value):
                raise ValueError(f"Recipe({name}={value!r}): {rule.says}")
        if self.steps is not None and self.epochs is not None:
            raise ValueError("Recipe: give steps or epochs, not both")

    def total_steps(self, batches_per_epoch: int) -> int:
        """Optimizer steps of a run over ``batches_per_epoch`` training batches."""
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil((self.epochs or 1.0) * batches_per_epoch))

    def with_steps(self, steps: int) -> Recipe:
        """The same recipe compressed (or stretched) to ``steps`` optimizer steps."""
        return replace(self, steps=steps, epochs=None)

    def lr_at(self, step: int, total: int | None = None) -> float:
        """The learning rate of optimizer step ``step`` (0-based) of a ``total``-step run
        (default: ``steps``)."""
        total = self.steps if total is None else total
        if total is None:
            raise ValueError("lr_at needs the run's total steps: the recipe counts epochs")
        return self.lr * self.factor(step, total)

    def factor(self, step: int, total: int) -> float:
        """The learning rate of step ``step`` of ``total`` as a multiple of ``lr``."""
        warm = math.ceil(self.warmup * total)
        if step < warm:
            return (step + 1) / warm
        if self.schedule == "constant":
            return 1.0
        done = (step - warm) / max(1, total - warm)  # 0 at the first step after warm-up
        return 1.0 - done if self.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * done))

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict; ``lr_ratio`` only when not 1, so recipes without LoRA+ read as before."""
        d = asdict(self)
        if d["lr_ratio"] == 1.0:
            del d["lr_ratio"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Recipe:
        """Read a recipe dict, refusing unknown fields (a typo would otherwise train differently)."""
        d = dict(d or {})
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"recipe has unknown field(s) {unknown}; it takes {[f.name for f in fields(cls)]}")
        return cls(**d)

    def __str__(self) -> str:
        length = f"{self.steps} steps" if self.steps else f"{self.epochs or 1:g} epoch(s)"
        return f"lr {self.lr:g}, {length}, warm-up {self.warmup:.0%}, {self.schedule}"

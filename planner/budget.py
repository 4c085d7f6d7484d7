"""`Budget`: limits a plan must respect, written so they cannot be misread.

    >>> Budget(params=250_000).param_limit(total_params=22_000_000)
    250000
    >>> Budget(params="0.5%").param_limit(total_params=22_000_000)
    110000
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class BudgetError(ValueError):
    """A budget that is malformed or that no plan can meet; ``minimum`` is the smallest
    parameter limit that would be feasible, when known."""

    def __init__(self, message: str, minimum: int | None = None) -> None:
        super().__init__(message)
        self.minimum = minimum


@dataclass(frozen=True)
class Budget:
    """``params``: trainable parameters, an int count (``250_000``) or a percentage string of
    the base model's parameters (``"0.5%"``). A bare float is refused: ``0.005`` could mean
    0.5% or 0.005%."""

    params: int | str | None = None

    def __post_init__(self) -> None:
        p = self.params
        if p is None:
            return
        if isinstance(p, bool) or isinstance(p, float):
            raise BudgetError(
                f"Budget(params={p!r}) is ambiguous: write a count as an int (Budget(params=250_000)) "
                f"or a fraction as a percentage string (Budget(params='0.5%'))"
            )
        if isinstance(p, int):
            if p <= 0:
                raise BudgetError(f"Budget(params={p}) must be a positive count")
            return
        if isinstance(p, str):
            _percent(p)
            return
        raise BudgetError(f"Budget(params=…) takes an int or a string like '0.5%', got {type(p).__name__}")

    def param_limit(self, total_params: int) -> int | None:
        """The parameter limit as a count for a model of ``total_params`` parameters."""
        if self.params is None:
            return None
        if isinstance(self.params, int):
            return self.params
        return int(total_params * _percent(self.params) / 100)

    def to_dict(self) -> dict[str, Any]:
        return {"params": self.params}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Budget:
        return cls(**(d or {}))

    @classmethod
    def parse(cls, text: str) -> Budget:
        """CLI form: ``"1%"``, ``"0.5%"``, ``"250000"``, ``"250_000"`` or ``"250k"``/``"1.5M"``."""
        t = text.strip().replace("_", "").replace(",", "")
        if t.endswith("%"):
            return cls(params=t)
        mult = {"k": 1_000, "m": 1_000_000, "b": 1_000_000_000}.get(t[-1:].lower())
        try:
            n = float(t[:-1]) * mult if mult else int(t)
        except ValueError:
            raise BudgetError(f"cannot read budget {text!r}: use a count (250000, 250k, 1.5M) or a percentage (0.5%)") from None
        return cls(params=int(n))

    def __str__(self) -> str:
        return f"params≤{self.params:,}" if isinstance(self.params, int) else f"params≤{self.params}"


def _percent(text: str) -> float:
    t = text.strip()
    if not t.endswith("%"):
        raise BudgetError(f"Budget(params={text!r}): a fraction is written as a percentage, e.g. '0.5%'")
    try:
        v = float(t[:-1])
    except ValueError:
        raise BudgetError(f"Budget(params={text!r}): {t[:-1]!r} is not a number") from None
    if not 0 < v <= 100:
        raise BudgetError(f"Budget(params={text!r}): the percentage must be in (0, 100]")
    return v

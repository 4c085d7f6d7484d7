"""`Budget`: limits a plan must respect, written so they cannot be misread.

>>> Budget(params=250_000).param_limit(total_params=22_000_000)
250000
>>> Budget(params="0.5%").param_limit(total_params=22_000_000)
110000
>>> Budget(params="1%", memory="512MiB", latency="2%").limits(total_params=22_000_000)
{'params': 220000, 'memory': 536870912, 'latency': 0.02}
"""

from __future__ import annotations

import math
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
    memory: int | str | None = None  # training memory the plan adds: bytes, or "512MiB", "2GB"
    latency: str | None = (
        None  # predicted forward time added after merging, "2%" of the model's (PlanCost.latency_fraction)
    )
    adapter_bytes: int | str | None = None  # size of the saved adapters: bytes, or "10MiB"

    def __post_init__(self) -> None:
        for name in ("memory", "adapter_bytes"):
            if getattr(self, name) is not None:
                _bytes(name, getattr(self, name))
        if self.latency is not None:
            if not isinstance(self.latency, str):
                raise BudgetError(
                    f"Budget(latency={self.latency!r}): write the overhead as a percentage string, e.g. '2%'"
                )
            _percent(self.latency, field="latency", low_inclusive=True)
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

    def limits(self, total_params: int) -> dict[str, float]:
        """Every set limit as a number, by cost name: params (count), memory and adapter_bytes
        (bytes), latency (fraction of the model's predicted forward time)."""
        out: dict[str, float] = {}
        if self.params is not None:
            out["params"] = self.param_limit(total_params)
        if self.memory is not None:
            out["memory"] = _bytes("memory", self.memory)
        if self.latency is not None:
            out["latency"] = _percent(self.latency, field="latency", low_inclusive=True) / 100
        if self.adapter_bytes is not None:
            out["adapter_bytes"] = _bytes("adapter_bytes", self.adapter_bytes)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            k: v
            for k, v in {
                "params": self.params,
                "memory": self.memory,
                "latency": self.latency,
                "adapter_bytes": self.adapter_bytes,
            }.items()
            if v is not None
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Budget:
        return cls(**(d or {}))

    @classmethod
    def coerce(cls, budget: Budget | int | str) -> Budget:
        """A `Budget` from a `Budget`, an int count or a string such as ``"0.5%"`` or ``"250k"``.

        >>> Budget.coerce("250k")
        Budget(params=250000, memory=None, latency=None, adapter_bytes=None)
        """
        if isinstance(budget, Budget):
            return budget
        if isinstance(budget, str):
            return cls.parse(budget)
        return cls(params=budget)

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
            n = None
        if n is None or not math.isfinite(n) or n < 0:
            raise BudgetError(f"cannot read budget {text!r}: use a count (250000, 250k, 1.5M) or a percentage (0.5%)")
        return cls(params=int(n))

    def __str__(self) -> str:
        return ", ".join(f"{k}≤{v:,}" if isinstance(v, int) else f"{k}≤{v}" for k, v in self.to_dict().items())


def _percent(text: str, field: str = "params", low_inclusive: bool = False) -> float:
    t = text.strip()
    if not t.endswith("%"):
        raise BudgetError(f"Budget({field}={text!r}): a fraction is written as a percentage, e.g. '0.5%'")
    try:
        v = float(t[:-1])
    except ValueError:
        raise BudgetError(f"Budget({field}={text!r}): {t[:-1]!r} is not a number") from None
    if not (0 <= v if low_inclusive else 0 < v) or v > 100:
        raise BudgetError(f"Budget({field}={text!r}): the percentage must be in {'[' if low_inclusive else '('}0, 100]")
    return v


UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def _bytes(field: str, value: int | str) -> int:
    """Bytes from an int, a string of digits, or a string with a unit (``"512MiB"``, ``"2GB"``,
    ``"1.5 GiB"``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise BudgetError(f"Budget({field}={value}) must be a positive number of bytes")
        return value
    if isinstance(value, str):
        t = value.strip().lower().replace(" ", "")
        unit = next((u for u in sorted(UNITS, key=len, reverse=True) if t.endswith(u)), None)
        if unit is None and t.isdigit():  # a bare number of bytes, as a CLI passes it
            t, unit = t + "b", "b"
        try:
            n = float(t[: -len(unit)]) * UNITS[unit] if unit else None
        except ValueError:
            n = None
        if n is not None and n > 0:
            return int(n)
    raise BudgetError(
        f"Budget({field}={value!r}): give bytes as an int or a string with a unit, e.g. '512MiB' or '2GB'"
    )

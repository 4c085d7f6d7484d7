"""Warnings about tuned sites the model's forward never calls (T5's ``shared``, reached only
through its tied copies), whose adapters change nothing and get no gradient. `apply` lowers the
model to check hand-written entries with tied weights; a hook on the first forward checks them all.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch.nn as nn

from ..ir import lower
from ..plan import Plan
from .base import listing
from .inspection import UNDO_ATTR, applied_plan

CALLED_ATTR = "_peftplan_called"


def _mark_called(module: nn.Module, args: Any) -> None:
    module.__dict__[CALLED_ATTR] = True


def _warn_uncalled(model: nn.Module, args: Any, output: Any) -> None:
    """After the first forward: warn about tuned sites it never called (T5's ``shared``,
    reached only through its tied copies), whose adapters change nothing and get no gradient."""
    undo = getattr(model, UNDO_ATTR, None)
    if undo is None or not undo.watch:
        return
    for handle in undo.watch:
        handle.remove()
    undo.watch = []
    uncalled = [
        n
        for n in applied_plan(model).tuned()
        if not model.get_submodule(n).__dict__.pop(CALLED_ATTR, False) and n not in undo.said
    ]
    if uncalled:
        _warn(
            model,
            uncalled,
            f"peftplan: the model's first forward never called {len(uncalled)} tuned site(s); their "
            "adapters change nothing and get no gradient",
            stacklevel=3,
        )


def _uncalled_tied(model: nn.Module, plan: Plan, names: list[str]) -> list[str]:
    """Of the tuned sites whose weight is tied to another module (T5's ``shared``), those that
    lowering finds the forward never calls. Only entries written by hand (without the ``role``
    lowering gives) are checked: a plan made by lowering this model holds called sites alone, so
    applying it never lowers again."""
    suspects = [n for n in names if "role" not in plan.sites[n] and _tied(model, n)]
    if not suspects:
        return []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            called = {site.name for site in lower(model).sites}
    except Exception:  # a model lowering cannot trace: the first forward still checks
        return []
    return [n for n in suspects if n not in called]


def _warn(model: nn.Module, uncalled: list[str], head: str, stacklevel: int) -> None:
    notes = [
        f"{n} (its weight is tied to {_tied(model, n)[:5]}, which the forward calls instead)" if _tied(model, n) else n
        for n in uncalled
    ]
    warnings.warn(
        listing(head, notes) + "\nTune the modules the forward calls instead (peftplan.lower(model) lists them).",
        stacklevel=stacklevel,
    )


def _tied(model: nn.Module, name: str) -> list[str]:
    """The other modules holding ``name``'s weight (tied weights)."""
    module = model.get_submodule(name)
    weight = getattr(getattr(module, "base", module), "weight", None)
    return [
        n
        for n, m in model.named_modules()
        if n != name and not n.startswith(name + ".") and any(p is weight for p in m.parameters(recurse=False))
    ]

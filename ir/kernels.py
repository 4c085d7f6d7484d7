"""Count the tensor kernels a forward runs: the per-call work the latency model charges.

Every aten op that reaches the dispatcher counts, except views and aliases (``view``, ``t``,
``transpose``, ``_unsafe_view``…), which only relabel a tensor and launch nothing:

    >>> import torch, torch.nn as nn
    >>> count_kernels(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), ((torch.randn(2, 4),), {}))  # addmm, relu
    2
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["KernelCount", "count_kernels"]


class KernelCount(TorchDispatchMode):
    """Counts the kernels dispatched while active (``with KernelCount() as c: …; c.kernels``)."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.kernels += not (func.is_view or func is torch.ops.aten._unsafe_view.default)
        return func(*args, **(kwargs or {}))


def count_kernels(model: nn.Module, inputs: tuple[tuple, dict[str, Any]]) -> int:
    """Kernels one inference forward of ``model(*args, **kwargs)`` runs (no grad, as called)."""
    args, kwargs = inputs
    with torch.no_grad(), KernelCount() as count:
        model(*args, **kwargs)
    return count.kernels

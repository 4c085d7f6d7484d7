"""`Wrapper`: what every wrapping layer shares — the frozen original module as ``base``, its
``weight``/``bias`` for model code that reads them (dtype checks, weight tying), and the
``merged`` flag that `peftplan.backends.merge` and ``unmerge`` go by.

A merged site computes its delta inside the base weight, so its adapter gets no gradient:
a backward pass through a merged site in training mode raises `PlanError` ("unmerge first")
instead of training the rest of the model without it. Inference (``eval()`` or
``torch.no_grad()``) is unaffected.

    >>> import torch.nn as nn
    >>> fc = nn.Linear(4, 2)
    >>> w = Wrapper(fc)
    >>> w.weight is fc.weight, fc.weight.requires_grad, w.merged
    (True, False, False)
"""

from __future__ import annotations

import contextvars

import torch
import torch.nn as nn

from .base import PlanError

__all__ = ["Wrapper", "restoring"]

restoring = contextvars.ContextVar("restoring", default=False)
"""True while `peftplan.load` wraps sites whose tensors it is about to copy in from an
artifact: a wrapper need not compute a start of its own (a PiSSA start's SVD)."""


class Wrapper(nn.Module):
    """A frozen ``base`` module; subclasses add the trainable delta and ``forward``."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        weight = getattr(base, "weight", None)
        if isinstance(weight, torch.Tensor) and not weight.dtype.is_floating_point:
            raise PlanError(
                f"{type(base).__name__} has a {weight.dtype} weight; adapters need a floating-point base "
                "weight: apply the plan to the model before quantizing it"
            )
        self.base = base
        self.merged = False
        for p in base.parameters():
            p.requires_grad_(False)
        self.register_forward_hook(_guard_merged)

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (without the delta)."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)

    def check_state(self) -> None:
        """Raise `PlanError` when tensors loaded into this site break its invariants (a sparse
        site's indices, say); called by `peftplan.load`. Default: none to check."""
        return None

    def aux_loss(self) -> torch.Tensor | None:
        """This site's auxiliary loss from the last forward, for `peftplan.backends.aux_loss`
        to sum into training (a MoE-LoRA router's balance loss); None when it has none."""
        return None


def _guard_merged(module: Wrapper, args: tuple, output: object) -> object:
    """While merged and training with gradients on, pass the output through `_MergedGuard`."""
    if not (module.merged and module.training and torch.is_grad_enabled() and isinstance(output, torch.Tensor)):
        return None
    anchor = next((p for p in module.parameters() if p.requires_grad), None)
    if anchor is None:
        return None
    return _MergedGuard.apply(output, anchor, f"{type(module).__name__}({module.extra_repr()})")


class _MergedGuard(torch.autograd.Function):
    """The identity; its backward refuses, naming the merged site (``anchor`` is one of the
    site's trainable parameters, so that backward reaches it)."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, anchor: torch.Tensor, what: str) -> torch.Tensor:
        ctx.what = what
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> None:
        raise PlanError(
            f"a merged site ({ctx.what}) is being trained: while merged, its adapter gets no gradient. "
            "Call peftplan.unmerge(model) before training; merge only for inference"
        )

"""`Wrapper`: what every wrapping layer shares — the frozen original module as ``base``, its
``weight``/``bias`` for model code that reads them (dtype checks, weight tying), and the
``merged`` flag that `peftplan.backends.merge` and ``unmerge`` go by.

    >>> import torch.nn as nn
    >>> fc = nn.Linear(4, 2)
    >>> w = Wrapper(fc)
    >>> w.weight is fc.weight, fc.weight.requires_grad, w.merged
    (True, False, False)
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["Wrapper"]


class Wrapper(nn.Module):
    """A frozen ``base`` module; subclasses add the trainable delta and ``forward``."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.merged = False
        for p in base.parameters():
            p.requires_grad_(False)

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (without the delta)."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)

    def aux_loss(self) -> torch.Tensor | None:
        """This site's auxiliary loss from the last forward, for `peftplan.backends.aux_loss`
        to sum into training (a MoE-LoRA router's balance loss); None when it has none."""
        return None

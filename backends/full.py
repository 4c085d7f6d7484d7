"""``full``: train the module's own parameters in place (peft's ``modules_to_save``), for new
task heads and small sites where a low-rank delta saves nothing.

The module is not replaced, so there is nothing to merge and ``remove`` keeps the trained
weights (they are the module's own); ``save`` stores them with the adapters.

    >>> import torch.nn as nn
    >>> from peftplan.ir.modules import static_site
    >>> head = nn.Linear(32, 3)
    >>> FullTuning().param_count(static_site("head", head, "linear"))
    99
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from ..ir.site import Site
from .base import register
from .none import NoTuning


@register
class FullTuning(NoTuning):
    """Like ``none`` it adds no module and no work; unlike it, the site's own weights train."""

    name = "full"

    def param_count(self, site: Site, **hp: Any) -> int:
        return site.params

    def saved_activations(self, site: Site, tokens: int, **hp: Any) -> int:
        # the weight gradient needs the site's input; a norm also keeps its normalised input
        return tokens * site.in_features * site.calls * (2 if site.op == "norm" else 1)

    def train_memory(
        self, site: Site, tokens: int, *, param_bytes: int = 4, act_bytes: int = 4, optimizer_states: int = 2, **hp: Any
    ) -> int:
        # the weights exist already: only their gradients, optimizer states and inputs are new
        full = super().train_memory(
            site, tokens, param_bytes=param_bytes, act_bytes=act_bytes, optimizer_states=optimizer_states
        )
        return full - site.params * param_bytes

    def wrap(self, module: nn.Module, site: Site, **hp: Any) -> nn.Module:
        for p in module.parameters(recurse=False):
            p.requires_grad_(True)
        return module

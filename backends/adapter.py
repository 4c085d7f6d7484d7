"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2020) on linear sites: a small
``down → activation → up`` MLP whose ``up`` starts at zero, so the site is unchanged at init.

- ``placement="serial"`` (default) transforms the site's output: ``y + up(act(down(y)))``.
- ``placement="parallel"`` runs beside the site, from its input: ``y + up(act(down(x)))``.

The activation makes the delta nonlinear, so an adapter never folds into the weight.

    >>> import torch, torch.nn as nn
    >>> from peftplan.ir.modules import static_site
    >>> fc = nn.Linear(64, 32)
    >>> site = static_site("fc", fc, "linear")
    >>> Adapter().validate(site, bottleneck=8)
    {'bottleneck': 8, 'placement': 'serial', 'activation': 'relu'}
    >>> Adapter().param_count(site, bottleneck=8)  # down 32*8 + 8, up 8*32 + 32
    552
    >>> x = torch.randn(2, 64)
    >>> torch.equal(Adapter().wrap(fc, site, bottleneck=8)(x), fc(x))
    True
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ir.modules import module_features
from ..ir.site import Site
from .base import Method, PlanError, register
from .wrapper import Wrapper

__all__ = ["Adapter", "BottleneckAdapter"]

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}
PLACEMENTS = ("serial", "parallel")


@register
class Adapter(Method):
    """``bottleneck`` (required, positive int), ``placement`` ``"serial"`` | ``"parallel"``,
    ``activation`` one of ``relu`` (default), ``gelu``, ``silu``, ``tanh``."""

    name = "adapter"
    ops = frozenset({"linear"})
    band = "rank"  # sized by its bottleneck
    mergeable = False
    hyper = {"bottleneck": None, "placement": "serial", "activation": "relu"}
    example = {"bottleneck": 4}

    def check(self, site: Site, hp: dict[str, Any]) -> None:
        b = hp["bottleneck"]
        if not isinstance(b, int) or isinstance(b, bool) or b <= 0:
            raise PlanError(
                f"site {site.name!r}: adapter bottleneck must be a positive int, got {b!r}; e.g. bottleneck=16"
            )
        if hp["placement"] not in PLACEMENTS:
            raise PlanError(
                f"site {site.name!r}: adapter placement must be one of {list(PLACEMENTS)}, got {hp['placement']!r}"
            )
        if hp["activation"] not in ACTIVATIONS:
            raise PlanError(
                f"site {site.name!r}: adapter activation must be one of {sorted(ACTIVATIONS)}, got {hp['activation']!r}"
            )

    def can_merge(self, site: Site, **hp: Any) -> str | None:
        return "an adapter's activation is nonlinear, so its delta cannot fold into the weight"

    def param_count(self, site: Site, bottleneck: int, placement: str = "serial", activation: str = "relu") -> int:
        d = _adapter_in(site, placement)
        return d * bottleneck + bottleneck + bottleneck * site.out_features + site.out_features

    def sized(self, site: Site, rank: int, **choices: Any) -> dict[str, Any]:
        return {"bottleneck": rank}

    def fixed_params(self, site: Site, **choices: Any) -> int:
        # beyond LoRA's r·(in + out): both biases, and a serial adapter on a site that widens
        # (out > in) has a larger down projection; bounded at the largest rank, min(in, out)
        widening = max(0, site.out_features - site.in_features)
        return min(site.in_features, site.out_features) * (1 + widening) + site.out_features

    def extra_ops(self, site: Site, **hp: Any) -> int:
        return 4  # down, activation, up, the sum

    def overhead_flops(self, site: Site, bottleneck: int, placement: str = "serial", activation: str = "relu") -> int:
        # the two matmuls, counted as LoRA counts its own; bias, activation and sum are elementwise
        d = _adapter_in(site, placement)
        return 2 * site.tokens * bottleneck * (d + site.out_features) * site.calls

    def saved_activations(
        self, site: Site, tokens: int, bottleneck: int, placement: str = "serial", activation: str = "relu"
    ) -> int:
        # down keeps its input; the activation keeps its input or output, up keeps its input
        # (relu/tanh save the very tensor up saves; autograd lists it twice, and so do we).
        return tokens * (_adapter_in(site, placement) + 2 * bottleneck) * site.calls

    def wrap(
        self, module: nn.Module, site: Site, bottleneck: int, placement: str = "serial", activation: str = "relu"
    ) -> nn.Module:
        return BottleneckAdapter(module, bottleneck, placement, activation)


def _adapter_in(site: Site, placement: str) -> int:
    return site.out_features if placement == "serial" else site.in_features


class BottleneckAdapter(Wrapper):
    """A frozen linear ``base`` (``nn.Linear`` or HF ``Conv1D``) plus a bottleneck MLP.

    ``down`` keeps ``nn.Linear``'s default init; ``up`` is zero, so the output equals the
    base's until training moves it. Adapter weights take the base weight's device and dtype (no
    allocation on the meta device); the output keeps the base's dtype.
    """

    def __init__(self, base: nn.Module, bottleneck: int, placement: str = "serial", activation: str = "relu") -> None:
        if placement not in PLACEMENTS or activation not in ACTIVATIONS:
            raise ValueError(f"placement must be in {PLACEMENTS}, activation in {sorted(ACTIVATIONS)}")
        super().__init__(base)  # merged stays False: see `merge`
        self.placement = placement
        self.activation = activation
        n_in, n_out = module_features(base)
        w = base.weight
        kw = {"device": w.device, "dtype": w.dtype}
        self.down = nn.Linear(n_out if placement == "serial" else n_in, bottleneck, **kw)
        self.up = nn.Linear(bottleneck, n_out, **kw)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def merge(self) -> None:
        """Refused: the activation makes the delta nonlinear in the input."""
        raise RuntimeError("a bottleneck adapter cannot be merged: its activation is nonlinear")

    def unmerge(self) -> None:
        """Nothing to do: an adapter is never merged."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base(x, *args, **kwargs)  # (..., out)
        source = y if self.placement == "serial" else x  # (..., out) or (..., in)
        h = ACTIVATIONS[self.activation](self.down(source.to(self.down.weight.dtype)))  # (..., bottleneck)
        return y + self.up(h).to(y.dtype)  # (..., out)

    def extra_repr(self) -> str:
        return f"placement={self.placement!r}, activation={self.activation!r}"

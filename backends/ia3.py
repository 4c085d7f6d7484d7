"""(IA)³ (Liu et al., 2022): a learned vector that rescales a site's channels, starting at 1.

``placement="output"`` scales the output, ``base(x) * l`` (bias included, as peft does);
``placement="input"`` scales the input, ``base(x * l)``, which the paper uses for the MLP's
down-projection (peft's ``feedforward_modules``). The default ``"auto"`` picks ``"input"`` for
sites whose role is ``mlp.down`` and ``"output"`` elsewhere; `validate` returns the resolved
placement. At ``apply`` a site's role comes from its plan entry (plans written by the planner
carry it; without one the role is ``other``), so write the placement out when a hand-written
plan must not depend on roles. On linear layers and 2-D convolutions; mergeable.

    >>> import torch.nn as nn
    >>> from dataclasses import replace
    >>> from peftplan.ir.modules import static_site
    >>> down = replace(static_site("mlp.down_proj", nn.Linear(1536, 384), "linear"), role="mlp.down")
    >>> IA3().validate(down)
    {'placement': 'input'}
    >>> IA3().param_count(down), IA3().param_count(down, placement="output")
    (1536, 384)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..ir.modules import is_hf_conv1d, module_features
from ..ir.site import Site
from .base import Method, PlanError, register
from .ssf import ChannelWrapper, ScaleShift

__all__ = ["IA3", "InputScale"]

PLACEMENTS = ("auto", "output", "input")


@register
class IA3(Method):
    """``placement``: ``"output"``, ``"input"`` or ``"auto"`` (input on ``mlp.down``, else output)."""

    name = "ia3"
    ops = frozenset({"linear", "conv2d"})
    band = "vector"
    mergeable = True
    hyper = {"placement": "auto"}
    example = {"placement": "output"}

    def validate(self, site: Site, **hp: Any) -> dict[str, Any]:
        full = super().validate(site, **hp)
        return {**full, "placement": _resolve(site, full["placement"])}

    def check(self, site: Site, hp: dict[str, Any]) -> None:
        if hp["placement"] not in PLACEMENTS:
            raise PlanError(
                f"site {site.name!r}: ia3 placement must be one of {list(PLACEMENTS)}, got {hp['placement']!r}"
            )

    def param_count(self, site: Site, placement: str = "auto") -> int:
        return site.in_features if _resolve(site, placement) == "input" else site.out_features

    def overhead_flops(self, site: Site, placement: str = "auto") -> int:
        # one multiply per scaled element; a conv's input map is taken as large as its output
        # map (stride 1), as the other methods' costs do
        return site.tokens * self.param_count(site, placement) * site.calls

    def extra_ops(self, site: Site, **hp: Any) -> int:
        return 1  # one multiply, of the input or of the output

    def saved_activations(self, site: Site, tokens: int, placement: str = "auto") -> int:
        # the tensor that is scaled, for the vector's gradient
        return tokens * self.param_count(site, placement) * site.calls

    def wrap(self, module: nn.Module, site: Site, placement: str = "auto") -> nn.Module:
        if _resolve(site, placement) == "input":
            return InputScale(module)
        return ScaleShift(module, shift=False)


def _resolve(site: Site, placement: str) -> str:
    if placement == "auto":
        return "input" if site.role == "mlp.down" else "output"
    return placement


class InputScale(ChannelWrapper):
    """``base(x * scale)`` with ``scale`` per input channel (last dim of a linear layer's input,
    dim 1 of a convolution's), created on the base weight's device and dtype.

    >>> import torch
    >>> base = nn.Linear(4, 3)
    >>> layer = InputScale(base)
    >>> x = torch.randn(5, 4)
    >>> torch.equal(layer(x), base(x)), layer.scale.shape
    (True, torch.Size([4]))
    """

    def __init__(self, base: nn.Module) -> None:
        if not (isinstance(base, (nn.Linear, nn.Conv2d)) or is_hf_conv1d(base)):
            raise TypeError(f"InputScale tunes nn.Linear, HF Conv1D and nn.Conv2d, not {type(base).__name__}")
        super().__init__(base)
        self.scale = self._vector(module_features(base)[0], 1.0)
        self.channel = 1 if isinstance(base, nn.Conv2d) else -1

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.merged:
            return self.base(x, *args, **kwargs)
        shape = [1] * x.dim()
        shape[self.channel] = -1
        x = (x.to(self.scale.dtype) * self.scale.view(shape)).to(x.dtype)  # (..., in) or (N, in, H, W)
        return self.base(x, *args, **kwargs)  # (..., out) or (N, out, H', W')

    def _weight_scale(self) -> torch.Tensor:
        """``scale`` shaped to multiply ``base.weight`` along its input axis."""
        w, s = self.base.weight, self.scale
        if is_hf_conv1d(self.base):
            return s.view(-1, 1)  # weight (in, out)
        if isinstance(self.base, nn.Linear):
            return s.view(1, -1)  # weight (out, in)
        # weight (out, in/groups, kh, kw): filter o of group g reads input channels g*ipg ... g*ipg+ipg-1
        groups, ipg = self.base.groups, w.shape[1]
        s = s.view(groups, 1, ipg).expand(groups, w.shape[0] // groups, ipg)
        return s.reshape(w.shape[0], ipg, 1, 1)

    @torch.no_grad()
    def merge(self) -> None:
        """Scale the weight's input channels (the bias is untouched). Merging twice is a no-op."""
        if not self.merged:
            w = self.base.weight
            w.copy_(w * self._weight_scale())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Divide the scale out again (exact up to float rounding while no scale is 0)."""
        if self.merged:
            w = self.base.weight
            w.copy_(w / self._weight_scale())
            self.merged = False

    def extra_repr(self) -> str:
        return f"merged={self.merged}"

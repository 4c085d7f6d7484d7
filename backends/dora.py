"""DoRA (Liu et al., 2024): weight-decomposed LoRA. The tuned weight is a learned magnitude per
output channel times the direction of the LoRA-updated weight,

    W' = m * (W + s·B·A) / ||W + s·B·A||_c

where ``||·||_c`` is the norm of each output channel's weights (a row of an ``nn.Linear``
weight; a column of an HF ``Conv1D`` weight, stored (in, out); an output filter of a
convolution) and ``m`` starts at ``||W||_c``, so a freshly wrapped site computes what its base
computes. As in peft, and as the paper suggests (section 4.3), the norm is a constant for
autograd: it follows ``B·A`` in the forward but takes no gradient.

    >>> import torch.nn as nn
    >>> from peftplan.ir.modules import static_site
    >>> dora = DoRA()
    >>> site = static_site("fc", nn.Linear(384, 384), "linear")
    >>> dora.validate(site, rank=8)
    {'rank': 8, 'alpha': 16, 'dropout': 0.0, 'rslora': False}
    >>> dora.param_count(site, rank=8)  # LoRA's 8 * (384 + 384), plus one magnitude per output
    6528

Hyper-parameters are LoRA's (``rank``, ``alpha``, ``dropout``, ``rslora``) and the layers
extend LoRA's, so parameter shapes match peft's ``LoraConfig(use_dora=True)`` one to one:
``lora_A``, ``lora_B`` and ``magnitude`` (peft's ``lora_magnitude_vector``, shape (out,) here).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from ..ir.site import Site
from .base import register
from .lora import LoRA
from .lora_layers import LoRAConv2d, LoRALayer, LoRALinear

__all__ = ["DoRA", "DoRAConv2d", "DoRALinear"]

_HALF = (torch.float16, torch.bfloat16)


@register
class DoRA(LoRA):
    """LoRA's hyper-parameters and checks, on linear layers and (groups 1) 2-D convolutions."""

    name = "dora"
    ops = frozenset({"linear", "conv2d"})
    hyper = {k: v for k, v in LoRA.hyper.items() if k != "init"}  # LoRA's but its start (always B at zero)

    def param_count(self, site: Site, rank: int, **_: Any) -> int:
        return super().param_count(site, rank) + site.out_features  # + the magnitude vector

    def fixed_params(self, site: Site, **choices: Any) -> int:
        return site.out_features  # the magnitude vector

    def extra_ops(self, site: Site, **hp: Any) -> int:
        # LoRA's 4; B·A, its scaling, W + ΔW, the norm, magnitude / norm; then rescale and
        # combine (3), and taking the bias out of the base output when there is one
        return 13 + site.bias

    def overhead_flops(self, site: Site, rank: int, **_: Any) -> int:
        # LoRA's path, then once per call B·A and the norm of W + s·B·A (scale, add, square,
        # sum), and per position three element-wise ops to rescale and combine the outputs.
        weight = site.in_features * math.prod(site.kernel or (1,)) * site.out_features
        per_call = 2 * rank * weight + 4 * weight + 3 * site.tokens * site.out_features
        return super().overhead_flops(site, rank) + per_call * site.calls

    def saved_activations(self, site: Site, tokens: int, rank: int, dropout: float = 0.0, **_: Any) -> int:
        # LoRA's (input, rank-r projection, dropout mask), plus the base output without bias and
        # the adapter output (each scaled by m/||·||, whose gradient needs them), plus three
        # (out,) vectors: the norm, m/||·|| and m/||·|| - 1.
        lora = super().saved_activations(site, tokens, rank, dropout=dropout)
        return lora + (2 * tokens * site.out_features + 3 * site.out_features) * site.calls

    def wrap(
        self,
        module: nn.Module,
        site: Site,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        rslora: bool = False,
    ) -> nn.Module:
        alpha = 2 * rank if alpha is None else alpha
        if site.op == "conv2d":
            return DoRAConv2d(module, rank, alpha, dropout, rslora)
        return DoRALinear(module, rank, alpha, dropout, rslora)


class _DoRA(LoRALayer):
    """What both DoRA layers add to LoRA: the magnitude, the column norm and the merge logic.

    The subclass's LoRA ``__init__`` must run first (``lora_A``/``lora_B`` exist), then
    ``_init_magnitude``. ``_out_dim`` is the output-channel axis of ``base.weight``.
    """

    _out_dim = 0

    def _init_magnitude(self) -> None:
        # B is zero, so this is ||W||_c. Plain tensor ops: on the meta device it allocates
        # nothing and reads no data.
        self.magnitude = nn.Parameter(self.weight_norm())
        self._merged_norm: torch.Tensor | None = None  # the norm merge divided by; unmerge needs it

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """``||W + s·B·A||_c``, one per output channel, (out,), in the adapters' dtype."""
        a, b = self.lora_A, self.lora_B
        dtype = torch.float32 if a.device.type == "cpu" and a.dtype in _HALF else a.dtype
        w = self.base.weight.to(dtype) + self._delta(a.to(dtype), b.to(dtype))  # layout of base.weight
        return w.transpose(0, self._out_dim).flatten(1).norm(dim=1).to(a.dtype)  # (out,)

    def _along_out(self, v: torch.Tensor) -> torch.Tensor:
        """An (out,) vector shaped to broadcast over ``base.weight``."""
        shape = [1] * self.base.weight.dim()
        shape[self._out_dim] = -1
        return v.view(shape)

    @torch.no_grad()
    def merge(self) -> None:
        """``base.weight`` becomes ``m * (W + s·B·A) / ||W + s·B·A||_c``. Merging twice is a no-op."""
        if self.merged:
            return
        w = self.base.weight
        norm = self.weight_norm()
        factor = self._along_out(self.magnitude / norm)
        w.copy_(((w + self.delta_weight()) * factor).to(w.dtype))
        self._merged_norm = norm
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Recover ``W`` (up to float rounding) with the norm `merge` used: the merged weight's
        own norm is ``|m|`` and no longer tells it."""
        if not self.merged:
            return
        w = self.base.weight
        factor = self._along_out(self.magnitude / self._merged_norm.to(self.magnitude.device))
        w.copy_((w / factor - self.delta_weight()).to(w.dtype))
        self._merged_norm = None
        self.merged = False

    def _combine(self, y: torch.Tensor, base_y: torch.Tensor, lora: torch.Tensor, channel: int) -> torch.Tensor:
        """``y + (m/n - 1)·base_y + (m/n)·lora``, peft's arrangement of ``m/n·(W + s·B·A)·x + bias``;
        ``channel`` is the output-channel axis of ``y``."""
        shape = [1] * y.dim()
        shape[channel] = -1
        scale = (self.magnitude / self.weight_norm()).view(shape)  # the norm takes no gradient
        return y + ((scale - 1) * base_y + scale * lora).to(y.dtype)

    def _dropout_active(self) -> bool:
        return self.training and not isinstance(self.dropout, nn.Identity)


class DoRALinear(_DoRA, LoRALinear):
    """DoRA on ``nn.Linear`` or HF ``Conv1D``; ``magnitude`` is (out,).

    >>> import torch
    >>> base = nn.Linear(4, 3)
    >>> layer = DoRALinear(base, rank=2, alpha=4)
    >>> x = torch.randn(5, 4)
    >>> torch.allclose(layer(x), base(x)), layer.magnitude.shape
    (True, torch.Size([3]))
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False) -> None:
        super().__init__(base, rank, alpha, dropout, rslora)
        self._out_dim = 1 if self.fan_in_fan_out else 0
        self._init_magnitude()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base(x, *args, **kwargs)  # (..., out)
        if self.merged:
            return y
        x = x.to(self.lora_A.dtype)
        if self._dropout_active():  # as peft: the base term is recomputed on the dropped-out input
            x = self.dropout(x)
            w = self.base.weight.to(x.dtype)
            base_y = x @ w if self.fan_in_fan_out else x @ w.T  # (..., out), no bias
        else:
            base_y = y if self.bias is None else y - self.bias  # (..., out), no bias
        return self._combine(y, base_y.to(x.dtype), self._lora(x), channel=-1)  # (..., out)


class DoRAConv2d(_DoRA, LoRAConv2d):
    """DoRA on ``nn.Conv2d`` (groups 1); ``magnitude`` is (out,), one per output filter.

    >>> import torch
    >>> base = nn.Conv2d(3, 4, 3, padding=1)
    >>> x = torch.randn(2, 3, 5, 5)
    >>> torch.allclose(DoRAConv2d(base, rank=2, alpha=4)(x), base(x), atol=1e-6)
    True
    """

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False) -> None:
        super().__init__(base, rank, alpha, dropout, rslora)
        self._init_magnitude()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (N, out, H', W')
        if self.merged:
            return y
        x = x.to(self.lora_A.dtype)
        if self._dropout_active():
            x = self.dropout(x)
            base_y = self.base._conv_forward(x, self.base.weight.to(x.dtype), None)  # (N, out, H', W'), no bias
        else:
            base_y = y if self.bias is None else y - self.bias.view(1, -1, 1, 1)  # (N, out, H', W'), no bias
        return self._combine(y, base_y.to(x.dtype), self._lora(x), channel=1)  # (N, out, H', W')

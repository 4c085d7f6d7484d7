"""SSF (Lian et al., 2022): scale and shift the features, ``y' = y * scale + shift`` per output
channel, with ``scale`` starting at 1 and ``shift`` at 0 (a freshly wrapped site computes what
its base computes). On linear layers, 2-D convolutions (channels on dim 1), embeddings and
norms; no hyper-parameters.

    >>> import torch.nn as nn
    >>> from peftplan.ir.modules import static_site
    >>> site = static_site("fc", nn.Linear(384, 96), "linear")
    >>> SSF().param_count(site)  # one scale and one shift per output channel
    192

Merging folds the scale into the weight and the shift into the bias (an embedding takes both
into its table). A linear layer or convolution without a bias gets one while merged, and loses
it again on ``unmerge``: in-process outputs are exact, but a merged model saved with HF
``save_pretrained`` would carry a bias its architecture does not load, so unmerge (or
``remove``) before saving such a model. A norm merges only when it is a ``LayerNorm`` or
``GroupNorm`` with a bias: an RMSNorm has nowhere to put the shift, and look-alike norms may
use their weight differently (Gemma scales by ``1 + weight``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..ir.modules import is_hf_conv1d, module_features, module_op, static_site
from ..ir.site import Site
from .base import Method, get_method, register
from .wrapper import Wrapper

__all__ = ["SSF", "ChannelWrapper", "ScaleShift"]


@register
class SSF(Method):
    """Two vectors per site, ``scale`` and ``shift``, as long as the site's output channels."""

    name = "ssf"
    ops = frozenset({"linear", "conv2d", "embedding", "norm"})
    band = "vector"
    mergeable = True
    hyper: dict[str, Any] = {}
    example: dict[str, Any] = {}

    def can_merge(self, site: Site, **hp: Any) -> str | None:
        if (why := super().can_merge(site, **hp)) is not None:
            return why
        if site.op == "norm" and not site.affine_norm:
            return (
                f"ssf on a {site.module_type} cannot be merged: only a torch LayerNorm or GroupNorm with a bias "
                "can take the shift; keep it unmerged (cost: one multiply-add per output)"
            )
        return None

    def param_count(self, site: Site, **hp: Any) -> int:
        return 2 * site.out_features

    def overhead_flops(self, site: Site, **hp: Any) -> int:
        return 2 * site.tokens * site.out_features * site.calls  # a multiply and an add per output

    def extra_ops(self, site: Site, **hp: Any) -> int:
        return 2  # the scale's multiply, the shift's add

    def saved_activations(self, site: Site, tokens: int, **hp: Any) -> int:
        return tokens * site.out_features * site.calls  # the base output, for the scale's gradient

    def wrap(self, module: nn.Module, site: Site, **hp: Any) -> nn.Module:
        return ScaleShift(module)


class ChannelWrapper(Wrapper):
    """What the per-channel wrappers (`ScaleShift`, IA3's `InputScale`) share on top of
    `Wrapper`: trainable per-channel vectors."""

    def _vector(self, n: int, fill: float) -> nn.Parameter:
        """A trainable (n,) vector on the base weight's device and dtype."""
        w = self.base.weight
        return nn.Parameter(torch.full((n,), fill, device=w.device, dtype=w.dtype))


class ScaleShift(ChannelWrapper):
    """``base(x) * scale + shift`` along the output channels of ``base``; ``shift=False`` leaves
    the shift out (IA3's output scaling is this layer). Parameters are created on the base
    weight's device and dtype.

    >>> import torch
    >>> base = nn.Linear(4, 3)
    >>> layer = ScaleShift(base)
    >>> x = torch.randn(5, 4)
    >>> torch.equal(layer(x), base(x)), layer.scale.shape, layer.shift.shape
    (True, torch.Size([3]), torch.Size([3]))
    """

    def __init__(self, base: nn.Module, shift: bool = True) -> None:
        super().__init__(base)
        op = module_op(base)
        if op not in ("linear", "conv2d", "embedding", "norm"):
            raise TypeError(f"ScaleShift tunes linear, conv2d, embedding and norm modules, not {type(base).__name__}")
        self.op = op
        n = module_features(base)[1]
        self.scale = self._vector(n, 1.0)
        self.shift = self._vector(n, 0.0) if shift else None
        # channels of the output: (N, C, ...) for convolutions and GroupNorm, last dim otherwise
        self.channel = 1 if op == "conv2d" or isinstance(base, nn.GroupNorm) else -1
        # the output-channel axis of base.weight: an HF Conv1D stores (in, out), an embedding (vocab, dim)
        self._weight_out = 1 if is_hf_conv1d(base) or op == "embedding" else 0
        self._made_bias = False  # merge gave a bias-less base a bias, unmerge takes it away

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base(x, *args, **kwargs)  # (..., C) or (N, C, ...)
        if self.merged:
            return y
        out = y * _along(self.scale, y.dim(), self.channel)  # same shape as y
        if self.shift is not None:
            out = out + _along(self.shift, y.dim(), self.channel)
        return out.to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold scale (and shift) into the base's weight and bias. Merging twice is a no-op.
        Whether a shifted site can merge is `SSF.can_merge`'s to say (a scale alone always can)."""
        if self.merged:
            return
        if self.shift is not None:
            why = get_method("ssf").can_merge(static_site("", self.base, self.op))
            if why is not None:
                raise ValueError(f"cannot merge: {why}")
        w = self.base.weight
        w.copy_(w * _along(self.scale, w.dim(), self._weight_out))
        if self.shift is not None and self.op == "embedding":
            w.add_(self.shift)  # every row is an output: (vocab, dim) + (dim,)
        elif self.bias is not None:
            b = self.bias
            b.copy_(b * self.scale + (0 if self.shift is None else self.shift))
        elif self.shift is not None:
            self.base.bias = nn.Parameter(self.shift.detach().to(w.dtype).clone(), requires_grad=False)
            self._made_bias = True
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take scale and shift out again (exact up to float rounding while no scale is 0)."""
        if not self.merged:
            return
        w = self.base.weight
        if self.shift is not None and self.op == "embedding":
            w.sub_(self.shift)
        elif self._made_bias:
            self.base.bias = None
            self._made_bias = False
        elif self.bias is not None:
            b = self.bias
            b.copy_((b - (0 if self.shift is None else self.shift)) / self.scale)
        w.copy_(w / _along(self.scale, w.dim(), self._weight_out))
        self.merged = False

    def extra_repr(self) -> str:
        return f"shift={self.shift is not None}, merged={self.merged}"


def _along(v: torch.Tensor, ndim: int, dim: int) -> torch.Tensor:
    """A (C,) vector shaped to broadcast along axis ``dim`` of an ``ndim``-D tensor."""
    shape = [1] * ndim
    shape[dim] = -1
    return v.view(shape)

"""Sparse fine-tuning: train a fixed set of ``k`` entries of a frozen weight, stored compactly.

The mask is chosen once, at ``apply``: ``k = max(1, round(density * weight.numel()))`` entries
(Python's ``round``, half to even), as flat row-major indices into ``base.weight``. They are a
buffer (saved with the adapter, so ``load`` restores them exactly); the trained values are one
``k``-element Parameter, so gradients and optimizer states scale with ``k``, not with the
weight. ``forward`` uses ``W + scatter(values)``, a transient dense tensor.

``selection``:

- ``"magnitude"`` (default, data-free): the ``k`` entries of largest ``|W|``. Large weights are
  the ones the model leans on (magnitude pruning keeps them); with unknown gradients the
  planner's ``|θ·g|`` proxy ranks by ``|θ|`` too.
- ``"sensitivity"``: the ``k`` largest of per-element scores handed to
  ``apply(..., scores={site: tensor})`` (grad², Fisher, … from the planner).

Ties go to the lower flat index, so the mask is deterministic. Selection needs real weights,
so on the meta device it is deferred: the wrapper gets meta ``indices`` and ``values`` of the
right size (allocating nothing) and no mask. After ``to_empty`` its indices hold garbage until
they are restored from an artifact or a state dict of a model tuned on real weights; to pick
a fresh mask, apply the plan to the materialised model instead.

    >>> import torch.nn as nn
    >>> from peftplan.ir.modules import static_site
    >>> fc = nn.Linear(100, 10)
    >>> site = static_site("fc", fc, "linear")
    >>> Sparse().param_count(site, density=0.01)
    10
    >>> layer = Sparse().wrap(fc, site, density=0.01)
    >>> layer.indices.shape, layer.values.shape
    (torch.Size([10]), torch.Size([10]))
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ir.modules import is_hf_conv1d
from ..ir.site import Site
from .base import Method, PlanError, Size, get_method, register
from .wrapper import Wrapper

__all__ = ["Sparse", "SparseDelta", "select_top"]

SELECTIONS = ("magnitude", "sensitivity")


@register
class Sparse(Method):
    """``density`` (required, in (0, 1]): the fraction of the weight's entries that train;
    ``selection`` ``"magnitude"`` (default) or ``"sensitivity"`` (needs scores at ``apply``)."""

    name = "sparse"
    ops = frozenset({"linear", "conv2d", "embedding"})
    band, size = "fixed", Size("density", 1e-3, 0.1, 0.01, log=True)
    mergeable = True
    hyper = {"density": None, "selection": "magnitude"}
    example = {"density": 0.05}

    def check(self, site: Site, hp: dict[str, Any]) -> None:
        density, selection = hp["density"], hp["selection"]
        if not isinstance(density, Real) or isinstance(density, bool) or not 0 < density <= 1:
            raise PlanError(
                f"site {site.name!r}: sparse density must be a number in (0, 1], got {density!r}; e.g. density=0.01"
            )
        if selection not in SELECTIONS:
            raise PlanError(
                f"site {site.name!r}: sparse selection must be one of {list(SELECTIONS)}, got {selection!r}"
            )

    def needs_scores(self, density: float, selection: str = "magnitude") -> bool:
        """Whether ``apply`` must hand this site per-element scores (see `apply`)."""
        return selection == "sensitivity"

    def sized(self, site: Site, rank: int, **choices: Any) -> dict[str, Any]:
        lora = get_method("lora").param_count(site, rank=rank)
        return {"density": min(1.0, lora / weight_numel(site))}

    def extra_ops(self, site: Site, **hp: Any) -> int:
        return 3  # a zero delta, the scatter of the values into it, W + delta (the base op is replaced)

    def param_count(self, site: Site, density: float, selection: str = "magnitude") -> int:
        return max(1, round(density * weight_numel(site)))

    def adapter_bytes(
        self, site: Site, *, param_bytes: int = 4, density: float = 0.01, selection: str = "magnitude"
    ) -> int:
        return self.param_count(site, density) * (param_bytes + 8)  # values plus int64 indices

    def overhead_flops(self, site: Site, density: float, selection: str = "magnitude") -> int:
        # No matmul is added: each call scatters k values and adds the dense delta to W.
        return (weight_numel(site) + self.param_count(site, density)) * site.calls

    def saved_activations(self, site: Site, tokens: int, density: float, selection: str = "magnitude") -> int:
        # As autograd reports it: the scatter keeps the k indices (the buffer itself, by
        # reference); a linear keeps its input and W + Δ, which a frozen one needs neither of; a
        # conv keeps its input anyway and adds W + Δ; an embedding keeps its ids.
        k = self.param_count(site, density)
        if site.op == "embedding":
            per_call = tokens + k
        elif site.op == "conv2d":
            per_call = weight_numel(site) + k
        else:
            per_call = tokens * site.in_features + weight_numel(site) + k
        return per_call * site.calls

    def wrap(
        self,
        module: nn.Module,
        site: Site,
        density: float,
        selection: str = "magnitude",
        scores: torch.Tensor | None = None,
    ) -> nn.Module:
        weight, k = module.weight, self.param_count(site, density)
        if weight.is_meta:  # no data to select from: deferred, see the module docstring
            return SparseDelta(module, torch.empty(k, dtype=torch.long, device="meta"))
        if selection == "magnitude":
            if scores is not None:
                raise PlanError(
                    f"site {site.name!r}: sparse got scores with selection='magnitude'; use selection='sensitivity'"
                )
            scores = weight.detach().abs()
        elif scores is None:
            raise PlanError(
                f"site {site.name!r}: sparse selection='sensitivity' needs scores; pass apply(..., scores={{site: tensor}})"
            )
        if not torch.isfinite(scores).all():
            raise PlanError(f"site {site.name!r}: sparse scores must be finite; found NaN or inf")
        indices = select_top(scores, k)
        return SparseDelta(module, indices.to(weight.device))


def weight_numel(site: Site) -> int:
    """Entries of the site's weight (not its bias)."""
    if site.op == "conv2d":
        return site.out_features * (site.in_features // site.groups) * math.prod(site.kernel)
    return site.in_features * site.out_features


def select_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Flat row-major indices of the ``k`` largest ``scores``, ties to the lower index, sorted.

    >>> select_top(torch.tensor([[1.0, 3.0], [3.0, 0.5]]), 2)
    tensor([1, 2])
    """
    order = torch.sort(scores.detach().flatten().float(), descending=True, stable=True).indices
    return order[:k].sort().values


class SparseDelta(Wrapper):
    """A frozen ``base`` (Linear, HF Conv1D, Conv2d or Embedding) whose weight entries at
    ``indices`` (flat, row-major) train: ``W + scatter(values)``; ``values`` start at zero."""

    def __init__(self, base: nn.Module, indices: torch.Tensor) -> None:
        super().__init__(base)
        w = base.weight
        self.register_buffer("indices", indices.to(device=w.device, dtype=torch.long))
        self.values = nn.Parameter(torch.zeros(indices.numel(), device=w.device, dtype=w.dtype))

    def check_state(self) -> None:
        """`PlanError` unless ``indices`` are distinct flat indices into ``base.weight`` (after
        `peftplan.load` copied them from a file, which could hold anything)."""
        n, ix = self.base.weight.numel(), self.indices
        if ix.numel() and (int(ix.min()) < 0 or int(ix.max()) >= n):
            raise PlanError(
                f"sparse indices must lie in [0, {n}) (the weight's entries), found {int(ix.min())}..{int(ix.max())}"
            )
        if torch.unique(ix).numel() != ix.numel():
            raise PlanError("sparse indices must be distinct; found repeated entries")

    def delta_weight(self) -> torch.Tensor:
        """The dense delta, shaped and typed like ``base.weight``."""
        w = self.base.weight
        flat = torch.zeros(w.numel(), device=w.device, dtype=w.dtype)  # (numel,)
        return flat.index_add(0, self.indices, self.values.to(w.dtype)).view(w.shape)

    @torch.no_grad()
    def merge(self) -> None:
        """Add the values into ``base.weight`` at their indices; merging twice is a no-op."""
        if not self.merged:
            self._add_to_base(self.values)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract them again (exact up to float rounding)."""
        if self.merged:
            self._add_to_base(-self.values)
            self.merged = False

    def _add_to_base(self, values: torch.Tensor) -> None:
        w = self.base.weight
        w.index_put_(torch.unravel_index(self.indices, w.shape), values.to(w.dtype), accumulate=True)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.base
        if self.merged:
            return base(x, *args, **kwargs)
        w = base.weight + self.delta_weight()  # like base.weight
        if isinstance(base, nn.Embedding):
            return F.embedding(
                x, w, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
            )  # (..., dim)
        if isinstance(base, nn.Conv2d):
            return base._conv_forward(x, w, base.bias)  # (N, out, H', W')
        if is_hf_conv1d(base):  # weight stored (in, out)
            y = torch.addmm(base.bias, x.reshape(-1, x.shape[-1]), w)  # (tokens, out)
            return y.view(*x.shape[:-1], w.shape[1])  # (..., out)
        return F.linear(x, w, base.bias)  # (..., out)

    def extra_repr(self) -> str:
        return f"k={self.values.numel()} of {self.base.weight.numel()}, merged={self.merged}"

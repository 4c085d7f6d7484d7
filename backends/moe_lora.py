"""MoE-LoRA (MoLA-style): a mixture of ``experts`` LoRA experts per linear site, chosen per
token by a learned top-k router: ``y + sum_{e in top_k} p_e(x) · B_e A_e x · alpha / rank``.

Gates are the router's softmax probabilities of the chosen experts, not renormalised (as in
the Switch Transformer), so the router learns from the task loss even with ``top_k=1``. Every
``B_e`` starts at zero, so the site is unchanged at init. The wrapper's ``aux_loss()`` is the
Switch load-balancing loss of its last forward, ``experts · Σ_e f_e · P_e`` (``f_e``: share of
routing slots given to expert e, ``P_e``: its mean probability; 1.0 when perfectly balanced),
which ``peftplan.backends.aux_loss(model)`` sums over sites.

All experts are computed and the unchosen ones masked: with a handful of small experts two
dense matmuls beat a gather/scatter per expert, and shapes stay data-independent (the meta
device works); ``overhead_flops`` counts this dense work. Only ``experts=1`` (plain LoRA, gate
1) can merge into the weight.

    >>> import torch, torch.nn as nn
    >>> from peftplan.ir.modules import static_site
    >>> fc = nn.Linear(16, 8)
    >>> site = static_site("fc", fc, "linear")
    >>> MoELoRA().validate(site, experts=4, rank=2)
    {'experts': 4, 'rank': 2, 'alpha': 4, 'top_k': 1}
    >>> MoELoRA().param_count(site, experts=4, rank=2)  # 4 * 2 * (16 + 8) + router 16 * 4
    256
    >>> layer = MoELoRA().wrap(fc, site, experts=4, rank=2)
    >>> x = torch.randn(3, 16)
    >>> torch.equal(layer(x), fc(x)), layer.aux_loss() >= 1.0
    (True, tensor(True))
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ir.modules import is_hf_conv1d, module_features
from ..ir.site import Site
from .base import Method, PlanError, register
from .lora import check_rank_limit
from .lora_layers import LoRALayer

__all__ = ["MoELoRA", "MoELoRALinear"]


@register
class MoELoRA(Method):
    """``experts`` and ``rank`` (required, positive ints), ``alpha`` (positive, default
    ``2 * rank``), ``top_k`` (experts per token, 1 to ``experts``, default 1)."""

    name = "moe_lora"
    ops = frozenset({"linear"})
    band, structure = "rank", "experts"  # a rank per expert; a space may add experts with depth
    mergeable = True  # with experts=1 only: see can_merge
    hyper = {"experts": None, "rank": None, "alpha": None, "top_k": 1}
    example = {"experts": 3, "rank": 2, "top_k": 2}

    def validate(self, site: Site, **hp: Any) -> dict[str, Any]:
        if hp.get("alpha") is None and hp.get("rank") is not None:
            _check_positive_int(site, "rank", hp["rank"])  # before alpha's default is derived from it
            hp["alpha"] = 2 * hp["rank"]
        return super().validate(site, **hp)

    def check(self, site: Site, hp: dict[str, Any]) -> None:
        for key in ("experts", "rank", "top_k"):
            _check_positive_int(site, key, hp[key])
        check_rank_limit(site, self.name, hp["rank"])
        alpha = hp["alpha"]
        if not isinstance(alpha, Real) or isinstance(alpha, bool) or not (alpha > 0 and math.isfinite(alpha)):
            raise PlanError(f"site {site.name!r}: moe_lora alpha must be a positive number, got {alpha!r}")
        if hp["top_k"] > hp["experts"]:
            raise PlanError(
                f"site {site.name!r}: moe_lora top_k={hp['top_k']} exceeds experts={hp['experts']}; use top_k <= experts"
            )

    def can_merge(self, site: Site, experts: int = 1, **hp: Any) -> str | None:
        if experts == 1:
            return None
        return f"moe_lora with {experts} experts mixes them per token, so no single weight delta exists; only experts=1 merges"

    def param_count(self, site: Site, experts: int, rank: int, alpha: float | None = None, top_k: int = 1) -> int:
        return experts * rank * (site.in_features + site.out_features) + site.in_features * experts

    def sized(self, site: Site, rank: int, experts: int = 1, **choices: Any) -> dict[str, Any]:
        """``rank`` split among the experts: ``min(experts, rank)`` of rank ``rank // experts``."""
        e = min(experts, rank)
        return {"experts": e, "rank": rank // e, "alpha": 2 * (rank // e)}

    def fixed_params(self, site: Site, experts: int = 1, **choices: Any) -> int:
        return site.in_features * experts  # the router

    def extra_ops(self, site: Site, **hp: Any) -> int:
        # router, softmax, top-k, routing mask (zeros, scatter), gates; A, gating, B, scaling,
        # the sum; the balance loss (two means, the share's division, product, sum, x experts)
        return 17

    def overhead_flops(self, site: Site, experts: int, rank: int, alpha: float | None = None, top_k: int = 1) -> int:
        # router, then every expert's A and B (computed densely, then masked)
        per_token = experts * (site.in_features + rank * (site.in_features + site.out_features))
        return 2 * site.tokens * per_token * site.calls

    def saved_activations(
        self, site: Site, tokens: int, experts: int, rank: int, alpha: float | None = None, top_k: int = 1
    ) -> int:
        # As autograd lists them: the input (for the router's and A's gradients: twice), the
        # softmax output, the routing mask, the expert projection and the gates, the gated
        # projection for B; plus the per-expert shares kept by the balancing loss.
        per_token = 2 * site.in_features + 3 * experts + 2 * experts * rank
        return (tokens * per_token + experts) * site.calls

    def wrap(
        self, module: nn.Module, site: Site, experts: int, rank: int, alpha: float | None = None, top_k: int = 1
    ) -> nn.Module:
        return MoELoRALinear(module, experts, rank, 2 * rank if alpha is None else alpha, top_k)


def _check_positive_int(site: Site, key: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise PlanError(f"site {site.name!r}: moe_lora {key} must be a positive int, got {value!r}")


class MoELoRALinear(LoRALayer):
    """A frozen linear ``base`` (``nn.Linear`` or HF ``Conv1D``) plus routed LoRA experts.

    ``lora_A`` is (experts * rank, in) and ``lora_B`` (out, experts * rank): expert ``e`` owns
    rows (of A) and columns (of B) ``e*rank : (e+1)*rank``, so one expert has LoRA's layout.
    ``router`` is a bias-free ``Linear(in, experts)``.
    """

    def __init__(self, base: nn.Module, experts: int, rank: int, alpha: float, top_k: int = 1) -> None:
        super().__init__(base, rank, alpha)
        if not 1 <= top_k <= experts:
            raise ValueError(f"top_k must be in [1, experts={experts}], got {top_k}")
        self.experts = experts
        self.top_k = top_k
        self.fan_in_fan_out = is_hf_conv1d(base)
        n_in, n_out = module_features(base)
        self.lora_A = self._new(experts * rank, n_in)
        self.lora_B = self._new(n_out, experts * rank)
        for a in self.lora_A.data.split(rank):  # each expert initialised as a LoRA A
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        w = base.weight
        self.router = nn.Linear(n_in, experts, bias=False, device=w.device, dtype=w.dtype)
        self._aux: torch.Tensor | None = None

    def _delta(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        delta = b @ a * self.scaling  # (out, in); one expert, gate 1
        return delta.T if self.fan_in_fan_out else delta

    def merge(self) -> None:
        """Fold the single expert into the base weight; refused with several experts."""
        if self.experts != 1:
            raise RuntimeError(f"moe_lora with {self.experts} experts cannot be merged: the mix changes per token")
        super().merge()

    def aux_loss(self) -> torch.Tensor | None:
        """Load-balancing loss of the last unmerged forward (None before one)."""
        return self._aux

    def __getstate__(self) -> dict[str, Any]:
        # the last loss holds its graph, which deepcopy and pickle refuse; a copy starts fresh
        return {**self.__dict__, "_aux": None}

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base(x, *args, **kwargs)  # (..., out)
        if self.merged:
            self._aux = None
            return y
        xs = x.to(self.lora_A.dtype)  # (..., in)
        probs = self.router(xs).float().softmax(-1)  # (..., E)
        chosen = probs.detach().topk(self.top_k, dim=-1).indices  # (..., k)
        routed = torch.zeros_like(probs).scatter(-1, chosen, 1.0)  # (..., E), 1 where chosen
        gates = probs * routed  # (..., E)
        h = F.linear(xs, self.lora_A)  # (..., E*r)
        h = h.unflatten(-1, (self.experts, self.rank)) * gates.unsqueeze(-1).to(h.dtype)  # (..., E, r)
        delta = F.linear(h.flatten(-2), self.lora_B) * self.scaling  # (..., out)
        share = routed.flatten(0, -2).mean(0) / self.top_k  # (E,) fraction of routing slots
        self._aux = self.experts * (share * probs.flatten(0, -2).mean(0)).sum()  # () Switch balance loss
        return y + delta.to(y.dtype)

    def extra_repr(self) -> str:
        return f"experts={self.experts}, rank={self.rank}, alpha={self.alpha}, top_k={self.top_k}, merged={self.merged}"

"""LoRA (Hu et al., 2021): a trainable low-rank delta ``B @ A * alpha / rank`` beside a frozen
weight (``alpha / sqrt(rank)`` with ``rslora=True``), on linear layers (``nn.Linear``, HF ``Conv1D``), 2-D convolutions and embeddings.

    >>> import torch.nn as nn
    >>> from peftplan.ir.modules import static_site
    >>> lora = LoRA()
    >>> site = static_site("fc", nn.Linear(384, 384), "linear")
    >>> lora.validate(site, rank=8)
    {'rank': 8, 'alpha': 16, 'dropout': 0.0, 'rslora': False, 'init': 'zero'}
    >>> lora.param_count(site, rank=8)
    6144
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import torch
import torch.nn as nn

from ..ir.site import Site
from .base import Method, PlanError, register
from .lora_layers import LoRAConv2d, LoRAEmbedding, LoRALinear

__all__ = ["INITS", "START_LABELS", "LoRA"]

# How an adapter starts: B at zero (peft's default), the weight's principal directions (PiSSA)
# or its gradient's (LoRA-GA: `wrap` takes the gradient). The default space does not search the
# start: at each task's best rate (3e-3) PiSSA moved MiniLM's dev accuracy by -0.49 (sst2) and
# -0.20 (subj) points, LoRA-GA by -1.32 and -0.15; LoRA-GA helps only below the best rate, as
# LoRA+ does (+3.35 and +1.10 at 3e-4), where the rate search already goes (benchmarks/fidelity.py,
# RESULTS.md).
INITS = ("zero", "pissa", "lora_ga")
NEEDED = {"pissa": 1, "lora_ga": 2}  # singular directions a start takes per unit of rank
START_LABELS = {"pissa": "PiSSA", "lora_ga": "LoRA-GA"}  # the starts other than zero, as messages name them


@register
class LoRA(Method):
    """``rank`` (required, positive int), ``alpha`` (positive, default ``2 * rank``), ``dropout``
    on the adapter input (default 0; not used on embeddings, as in peft), ``rslora`` (default
    False: scaling ``alpha / rank``; True: the rank-stabilised ``alpha / sqrt(rank)`` of
    Kalajdzievski 2023, peft's ``use_rslora``), ``init`` on linear layers (`INITS`: "zero", the
    default; "pissa": A and B start at the weight's top singular directions, peft's
    ``init_lora_weights="pissa"``; "lora_ga": at the top singular directions of the weight's
    mean gradient, peft's ``init_lora_weights="lora_ga"``, which `needs_gradient` and
    `peftplan.apply` takes as ``gradients=``; `LoRALinear`)."""

    name = "lora"
    ops = frozenset({"linear", "conv2d", "embedding"})
    band = "rank"
    mergeable = True
    hyper = {"rank": None, "alpha": None, "dropout": 0.0, "rslora": False, "init": "zero"}
    example = {"rank": 4, "alpha": 8}

    def validate(self, site: Site, **hp: Any) -> dict[str, Any]:
        if "rank" not in hp:
            raise PlanError(
                f"site {site.name!r}: method {self.name!r} needs 'rank' (e.g. rank=8; alpha defaults to 2*rank)"
            )
        self._check_rank(site, hp["rank"])  # before alpha's default is derived from it
        if hp.get("alpha") is None:
            hp["alpha"] = 2 * hp["rank"]
        return super().validate(site, **hp)

    def check(self, site: Site, hp: dict[str, Any]) -> None:
        rank, alpha, dropout, rslora = hp["rank"], hp["alpha"], hp["dropout"], hp["rslora"]
        self._check_rank(site, rank)
        if not _is_real(alpha) or not alpha > 0 or not math.isfinite(alpha):
            raise PlanError(
                f"site {site.name!r}: {self.name} alpha must be a positive number, got {alpha!r}; e.g. alpha={2 * rank}"
            )
        if not _is_real(dropout) or not 0 <= dropout < 1:
            raise PlanError(f"site {site.name!r}: {self.name} dropout must be in [0, 1), got {dropout!r}")
        if not isinstance(rslora, bool):
            raise PlanError(f"site {site.name!r}: {self.name} rslora must be true or false, got {rslora!r}")
        self._check_init(site, rank, hp.get("init", "zero"))
        if site.op == "conv2d" and site.groups != 1:
            raise PlanError(
                f"site {site.name!r}: {self.name} supports grouped convolutions only with groups=1, this one has "
                f"groups={site.groups}; tune it with 'full' or 'none' instead"
            )

    def _check_init(self, site: Site, rank: int, init: Any) -> None:
        if init not in INITS:
            raise PlanError(f"site {site.name!r}: {self.name} init must be one of {list(INITS)}, got {init!r}")
        if init != "zero" and site.op != "linear":
            raise PlanError(
                f"site {site.name!r}: {self.name} init {init!r} starts from a linear layer's singular directions, and "
                f"this site's op is {site.op}: use init 'zero' here"
            )
        needed = NEEDED.get(init, 0) * rank
        if 0 < min(site.in_features, site.out_features) < needed:
            raise PlanError(
                f"site {site.name!r}: {self.name} init {init!r} at rank {rank} needs {needed} singular directions, and "
                f"this {site.in_features}x{site.out_features} weight has {min(site.in_features, site.out_features)}: "
                "lower the rank or use init 'zero'"
            )

    def needs_gradient(self, init: str = "zero", **_: Any) -> bool:
        """Whether `wrap` needs the weight's mean gradient (``gradient=``): a LoRA-GA start."""
        return init == "lora_ga"

    def param_count(self, site: Site, rank: int, **_: Any) -> int:
        if site.op == "conv2d":
            return rank * site.in_features * math.prod(site.kernel) + site.out_features * rank
        return rank * (site.in_features + site.out_features)

    def overhead_flops(self, site: Site, rank: int, init: str = "zero", **_: Any) -> int:
        if site.op == "embedding":  # A is a row lookup; only B is a matmul
            per_token = rank * site.out_features
        elif site.op == "conv2d":
            per_token = rank * (site.in_features * math.prod(site.kernel) + site.out_features)
        else:
            per_token = rank * (site.in_features + site.out_features)
        paths = 1 if init == "zero" else 2  # a frozen start subtracts B0·A0·x beside B·A·x
        return 2 * site.tokens * per_token * site.calls * paths

    def extra_ops(self, site: Site, init: str = "zero", **hp: Any) -> int:
        # A (a matmul, convolution or lookup), B, the scaling, the sum; from a frozen start
        # A − A0, B − B0, four matmuls, their sum, the scaling and the sum (`LoRALinear._lora`)
        return 4 if init == "zero" else 9

    def adapter_bytes(self, site: Site, *, param_bytes: int = 4, init: str = "zero", **hp: Any) -> int:
        """A PiSSA or LoRA-GA start saves its frozen A0 and B0 beside A and B."""
        return super().adapter_bytes(site, param_bytes=param_bytes, **hp) * (1 if init == "zero" else 2)

    def train_memory(self, site: Site, tokens: int, *, param_bytes: int = 4, init: str = "zero", **hp: Any) -> int:
        """A PiSSA or LoRA-GA start also keeps its frozen A0 and B0 on the device while training."""
        start = 0 if init == "zero" else self.param_count(site, **hp) * param_bytes
        return super().train_memory(site, tokens, param_bytes=param_bytes, **hp) + start

    def sized(self, site: Site, rank: int, **choices: Any) -> dict[str, Any]:
        return {"rank": rank, "alpha": 2 * rank}

    def saved_activations(self, site: Site, tokens: int, rank: int, dropout: float = 0.0, **_: Any) -> int:
        # A's gradient needs the (dropped-out) input, B's the rank-r projection; a frozen base
        # keeps neither. An embedding's A gradient needs only the ids.
        if site.op == "embedding":
            per_token = rank
        else:
            per_token = site.in_features + rank  # a conv keeps its input map (stride 1 assumed)
            per_token += site.in_features if dropout > 0 else 0  # the dropout mask
        return tokens * per_token * site.calls

    def wrap(
        self,
        module: nn.Module,
        site: Site,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        rslora: bool = False,
        init: str = "zero",
        gradient: torch.Tensor | None = None,
    ) -> nn.Module:
        alpha = 2 * rank if alpha is None else alpha
        if site.op == "conv2d":
            return LoRAConv2d(module, rank, alpha, dropout, rslora)
        if site.op == "embedding":
            return LoRAEmbedding(module, rank, alpha, rslora)
        return LoRALinear(module, rank, alpha, dropout, rslora, init, gradient)

    def _check_rank(self, site: Site, rank: Any) -> None:
        if not _is_int(rank) or rank <= 0:
            raise PlanError(
                f"site {site.name!r}: {self.name} rank must be a positive int, got {rank!r}; use e.g. rank=8 or method 'none'"
            )
        check_rank_limit(site, self.name, rank)


def check_rank_limit(site: Site, method: str, rank: int) -> None:
    """`PlanError` for a rank above max(in, out) of ``site``, where each factor alone is larger
    than the weight (a rank of 2**40 read from a file would otherwise reach the allocator).
    Ranks between min(in, out) and max(in, out) add no expressiveness but are allowed: a
    uniform plan's rank may exceed a small head's outputs."""
    limit = max(site.in_features * (math.prod(site.kernel) if site.op == "conv2d" else 1), site.out_features)
    if limit > 0 and rank > limit:  # a site without shapes (a plan read without its model) has no limit
        raise PlanError(
            f"site {site.name!r}: {method} rank {rank} exceeds max(in, out) = {limit} of this {site.op}, "
            f"so each factor is larger than the weight itself: use a rank of at most "
            f"{min(limit, site.in_features, site.out_features)} (min(in, out)), or 'full'"
        )


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)

"""The planner's cost model: what a plan costs, per site and in total, before it is applied.

Every per-site figure comes from the method's own contract (`Method.param_count`,
``overhead_flops``, ``extra_ops``, ``train_memory``, ``can_merge``), so a newly registered
method is costed without touching this file:

    >>> import torch, torch.nn as nn, peftplan as pp
    >>> graph = pp.lower(nn.Sequential(nn.Linear(384, 384)), torch.randn(16, 384))
    >>> cost = plan_cost(graph, pp.Plan(sites={"0": {"method": "lora", "rank": 8}}))
    >>> cost.params, cost.train_bytes, cost.adapter_bytes     # 8 * (384 + 384) parameters
    (6144, 123392, 24576)
    >>> cost.unmerged_flops, cost.latency_flops, f"{cost.unmerged_fraction:.4f}"
    (196608, 0, '0.0417')
    >>> cost.unmerged_ops, cost.base_ops, f"{cost.unmerged_latency_fraction:.2f}", cost.latency_fraction
    (4, 1, '0.13', 0.0)

Latency is predicted time, not FLOPs (`planner.latency`): 16 tokens through one linear layer
take 86 µs of FLOPs and 2 µs of kernel call on `DEFAULT_MACHINE`; unmerged, LoRA's four extra
kernels add 8 µs and its 4% more FLOPs 3.6 µs: +13%. ``latency_fraction`` is the overhead
left after `merge`, what ``Budget(latency=…)`` limits.

``train_memory_estimate`` adds the frozen model around the plan: its weights and the
activations it keeps for backward once gradients flow from the tuned sites. That last term is
measured, not modelled: one forward of one example (batch 1, the training sequence length) in
training mode, counting the bytes autograd saves (``saved_tensors_hooks``, each storage once,
parameters excluded), scaled by the batch size, which every saved tensor is linear in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn as nn

from ..backends.base import PlanError, get_method
from ..backends.inspection import PLAN_ATTR
from ..ir.inputs import example_inputs, model_device, normalise
from ..ir.site import Site, SiteGraph
from ..plan import Plan
from .latency import DEFAULT_MACHINE, Machine

# Methods that train the site's own weights: those weights are in the model already, so the
# plan adds only their gradients and optimizer states.
OPTIMIZER_STATE_BYTES = 8  # AdamW: exp_avg and exp_avg_sq, fp32


@dataclass(frozen=True)
class SiteCost:
    """One tuned site: trainable parameters, bytes added while training, extra forward FLOPs
    and kernels while unmerged and after `merge` (0 when the site folds in), bytes in the
    artifact."""

    method: str
    params: int
    train_bytes: int
    unmerged_flops: int
    latency_flops: int
    adapter_bytes: int
    unmerged_ops: int = 0
    latency_ops: int = 0


@dataclass(frozen=True)
class PlanCost:
    """A plan's cost in total and per site (``sites``, tuned sites only).

    ``unmerged_flops``/``unmerged_ops``: extra forward FLOPs and kernels while training or
    serving unmerged; ``latency_flops``/``latency_ops``: what is left after `merge` (sites that
    cannot fold in). ``base_flops`` are the FLOPs of every site of the graph (its linear
    layers, convolutions and norms: attention's score products are not sites), ``base_ops``
    the kernels of one forward (`SiteGraph.kernels`). ``latency_fraction`` and
    ``unmerged_latency_fraction`` are predicted forward-time overheads on ``machine``;
    ``unmerged_fraction`` is the FLOPs ratio alone.
    """

    params: int
    train_bytes: int
    unmerged_flops: int
    latency_flops: int
    base_flops: int
    adapter_bytes: int
    sites: dict[str, SiteCost] = field(default_factory=dict)
    unmerged_ops: int = 0
    latency_ops: int = 0
    base_ops: int = 0
    machine: Machine = DEFAULT_MACHINE

    @property
    def unmerged_fraction(self) -> float:
        return self.unmerged_flops / self.base_flops if self.base_flops else 0.0

    @property
    def unmerged_latency_fraction(self) -> float:
        """Predicted forward-time overhead while unmerged (training, or serving unmerged)."""
        return self.machine.overhead(self.unmerged_flops, self.unmerged_ops, self.base_flops, self.base_ops)

    @property
    def latency_fraction(self) -> float:
        """Predicted forward-time overhead after `merge`: what ``Budget(latency=…)`` limits."""
        return self.machine.overhead(self.latency_flops, self.latency_ops, self.base_flops, self.base_ops)

    def __str__(self) -> str:
        return (
            f"{len(self.sites)} tuned site(s): {self.params:,} params, +{self.train_bytes / 2**20:,.1f} MiB "
            f"training, +{self.unmerged_latency_fraction:.2%} forward time unmerged, +{self.latency_fraction:.2%} "
            f"merged, {self.adapter_bytes / 2**20:,.2f} MiB adapters"
        )


def plan_cost(
    graph: SiteGraph,
    plan: Plan,
    *,
    batch_shape: tuple[int, int] | None = None,
    param_bytes: int = 4,
    act_bytes: int = 4,
    machine: Machine = DEFAULT_MACHINE,
) -> PlanCost:
    """The cost of ``plan`` on the model ``graph`` describes.

    Activations and FLOPs are at ``batch_shape`` (batch, sequence length; default: the example
    the graph was lowered with), site by site (`Site.tokens_at`: a pooled head's positions grow
    with the batch only); a search costs training memory at its task's `Task.batch_shape`.
    ``param_bytes`` is the size of an adapter element (4: fp32),
    ``act_bytes`` of a saved activation element; optimizer states are AdamW's two fp32 tensors.
    Weights shared by sites (``Site.tied``) trained with ``full`` count once, as
    `count_trainable` counts them. ``machine`` holds the latency model's constants; kernels
    per forward do not grow with the batch, FLOPs do.

    >>> from peftplan import lower
    >>> plan = Plan(sites={"bert.encoder.layer.0.attention.self.query": {"method": "lora", "rank": 2, "alpha": 4}})
    >>> cost = plan_cost(lower(tiny_bert()), plan, batch_shape=(32, 64))
    >>> cost.params, cost.train_bytes > 0
    (128, True)
    """
    (b, n), (b0, n0) = batch_shape or graph.example_shape, graph.example_shape
    if b < 1 or n < 1:
        raise ValueError(f"batch_shape must be two positive sizes (batch, sequence length), got {batch_shape}")
    cost = _cost(
        graph, plan, lambda s: s.tokens_at(b, n, graph.example_shape), b * n / (b0 * n0), param_bytes, act_bytes
    )
    return replace(cost, machine=machine)


@dataclass(frozen=True)
class MemoryEstimate:
    """Whole-model training memory in bytes, by term; ``total`` is their sum."""

    base_weights: int
    frozen_activations: int
    plan: PlanCost

    @property
    def total(self) -> int:
        return self.base_weights + self.frozen_activations + self.plan.train_bytes

    def __str__(self) -> str:
        mib = 2**20
        return (
            f"{self.total / mib:,.0f} MiB = weights {self.base_weights / mib:,.0f} + frozen activations "
            f"{self.frozen_activations / mib:,.0f} + plan {self.plan.train_bytes / mib:,.0f}"
        )


def train_memory_estimate(
    model: nn.Module,
    graph: SiteGraph,
    plan: Plan,
    *,
    batch: int,
    seq_len: int,
    example_inputs: Any = None,
    param_bytes: int = 4,
    act_bytes: int = 4,
) -> MemoryEstimate:
    """Training memory of ``model`` tuned by ``plan``, at ``batch`` sequences of ``seq_len``.

    Base weights (``graph.total_params`` in the model's dtype) + activations the frozen model
    keeps for backward + the plan's own cost (its weights, gradients, AdamW states, saved
    activations). The frozen term and each tuned site's positions are measured on one example
    in training mode (dropout masks count), then scaled by ``batch``. ``example_inputs`` is that
    one example (batch 1, training size); HF text models get ``seq_len`` random token ids.
    Call it on the model before `apply`.

    >>> from peftplan import lower
    >>> model = tiny_bert()
    >>> plan = Plan(sites={"bert.encoder.layer.0.attention.self.query": {"method": "lora", "rank": 2, "alpha": 4}})
    >>> print(train_memory_estimate(model, lower(model), plan, batch=32, seq_len=64))
    15 MiB = weights 0 + frozen activations 14 + plan 0
    """

    if hasattr(model, PLAN_ATTR):
        raise PlanError(
            "train_memory_estimate needs the model before apply (the plan's own activations "
            "are costed from its methods); call peftplan.remove(model) first"
        )
    if batch <= 0 or seq_len <= 0:
        raise ValueError(f"batch and seq_len must be positive, got batch={batch}, seq_len={seq_len}")
    tuned = [graph[n] for n in plan.tuned() if n in graph]
    saved, tokens = saved_bytes(model, tuned, _one_example(model, seq_len, example_inputs))
    weight = next(model.parameters(), torch.empty(0))
    scale = batch * seq_len / max(s.tokens for s in graph)  # FLOPs: the example's longest positions
    cost = _cost(graph, plan, lambda s: tokens.get(s.name, s.tokens) * batch, scale, param_bytes, act_bytes)
    return MemoryEstimate(graph.total_params * weight.element_size(), saved * batch, cost)


def saved_bytes(model: nn.Module, tuned: list[Site], inputs: tuple[tuple, dict]) -> tuple[int, dict[str, int]]:
    """Bytes autograd keeps for backward in one training-mode forward of ``model`` with every
    parameter frozen and the ``tuned`` sites' outputs requiring grad (as they do once tuned),
    each storage once, parameters and buffers excluded; and each tuned site's positions per call.

    >>> from peftplan import lower
    >>> model = tiny_bert()
    >>> saved_bytes(model, [lower(model)["bert.encoder.layer.0.attention.self.query"]], ((), {"input_ids": torch.ones(1, 64, dtype=torch.long)}))
    (469248, {'bert.encoder.layer.0.attention.self.query': 64})
    """
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages: dict[int, int] = {}
    tokens: dict[str, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in owned and s.device.type != "meta":
            storages[s.data_ptr()] = s.nbytes()
        return t

    def output_needs_grad(site: Site) -> Callable:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor):
                tokens[site.name] = out.numel() // site.out_features  # (..., out) or (N, out, H, W)
                if out.is_floating_point() and not out.requires_grad:
                    out.requires_grad_(True)

        return hook

    handles = [model.get_submodule(s.name).register_forward_hook(output_needs_grad(s)) for s in tuned]
    was_training = model.training
    trainable = [p for p in model.parameters() if p.requires_grad]
    args, kwargs = inputs
    try:
        model.train()
        for p in trainable:  # frozen, as apply leaves it
            p.requires_grad_(False)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(*args, **kwargs)
        del out  # the saved tensors were counted while alive; free them with the graph
    finally:
        model.train(was_training)
        for p in trainable:
            p.requires_grad_(True)
        for h in handles:
            h.remove()
    return sum(storages.values()), tokens


def _cost(
    graph: SiteGraph, plan: Plan, tokens_of: Callable[[Site], int], flops_scale: float, param_bytes: int, act_bytes: int
) -> PlanCost:
    """Per-site costs with ``tokens_of(site)`` positions per call, FLOPs at ``flops_scale``
    times the example shape."""
    missing = [n for n in plan.sites if n not in graph]
    if missing:
        raise PlanError(
            f"plan site(s) {missing[:10]} are not in this graph ({graph.model_class}); "
            "cost a plan against the graph of the model it was made for"
        )
    sites, counted_full = {}, set()
    for name, entry in plan.tuned().items():
        site = graph[name]
        method = get_method(entry["method"])
        hp = method.validate(site, **plan.hyper(entry))
        tokens = tokens_of(site)
        params = method.param_count(site, **hp)
        train = method.train_memory(site, tokens, param_bytes=param_bytes, act_bytes=act_bytes, **hp)
        if method.name == "full":
            if any(t in counted_full for t in site.tied):  # a shared weight trains once
                train -= params * (param_bytes + OPTIMIZER_STATE_BYTES)
                params = 0
            counted_full.add(name)
        flops = round(method.overhead_flops(site, **hp) * flops_scale)
        ops = method.extra_ops(site, **hp) * site.calls
        merges = method.can_merge(site, **hp) is None
        sites[name] = SiteCost(
            method=method.name,
            params=params,
            train_bytes=train,
            unmerged_flops=flops,
            latency_flops=0 if merges else flops,
            adapter_bytes=method.adapter_bytes(site, param_bytes=param_bytes, **hp),
            unmerged_ops=ops,
            latency_ops=0 if merges else ops,
        )
    return PlanCost(
        params=sum(c.params for c in sites.values()),
        train_bytes=sum(c.train_bytes for c in sites.values()),
        unmerged_flops=sum(c.unmerged_flops for c in sites.values()),
        latency_flops=sum(c.latency_flops for c in sites.values()),
        base_flops=round(sum(s.flops for s in graph) * flops_scale),
        adapter_bytes=sum(c.adapter_bytes for c in sites.values()),
        sites=sites,
        unmerged_ops=sum(c.unmerged_ops for c in sites.values()),
        latency_ops=sum(c.latency_ops for c in sites.values()),
        base_ops=graph.kernels or sum(s.calls for s in graph),  # uncounted: one kernel per site call
    )


def _one_example(model: nn.Module, seq_len: int, given: Any) -> tuple[tuple, dict]:
    """Inputs for one training example: ``given``, or ``seq_len`` random ids for HF text models."""

    if given is not None:
        return normalise(given)
    args, kwargs = example_inputs(model)
    if "input_ids" not in kwargs:
        raise ValueError(
            f"{type(model).__name__} is not an HF text model: pass example_inputs= one training "
            "example (batch 1, training size) to measure its activations"
        )
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    kwargs["input_ids"] = torch.randint(0, min(text.vocab_size, 1000), (1, seq_len), device=model_device(model))
    return args, kwargs

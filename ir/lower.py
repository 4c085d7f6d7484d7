"""`lower(model) -> SiteGraph`: the lowering pipeline.

capture (shortened stacks) → sites → dataflow → blocks (full depth) → roles → cost.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> g = lower(LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
    ...                                        num_attention_heads=4, vocab_size=128)))
    >>> print(g.table())  # doctest: +ELLIPSIS
    LlamaForCausalLM: 21 sites, 2 blocks, ... captured by export
    ...
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from . import blocks as blocks_pass
from . import dataflow, roles
from .capture import CaptureError, OpGraph, capture
from .inputs import batch_shape, normalise
from .inputs import example_inputs as synthesise
from .kernels import count_kernels
from .modules import count_params, fingerprint, module_features, module_op, static_site
from .site import Block, SiteGraph


class LoweringError(ValueError):
    """The model cannot be lowered as given; the message says why and what to do."""


def lower(model: nn.Module, example_inputs: Any = None, *, shorten: bool = True) -> SiteGraph:
    """Lower ``model`` to a `SiteGraph` of every tunable site it calls.

    ``example_inputs``: a tensor, a tuple of positional arguments or a dict of keyword
    arguments; synthesised when omitted (HF configs, or the first tunable module's shape).
    Models on the meta device lower without allocating weights. ``shorten=False`` captures
    every block instead of a few per structure (slower on deep models; same result).
    """
    if not isinstance(model, nn.Module):
        raise LoweringError(f"lower() takes a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise LoweringError(f"{type(model).__name__} is a TorchScript module, whose submodules peftplan cannot "
                            "replace: lower and apply the eager model, then script the tuned one")  # fmt: skip
    tunable = {n: op for n, m in model.named_modules() if (op := module_op(m))}
    if "" in tunable:
        raise LoweringError(f"the model is a single {type(model).__name__}: peftplan tunes the modules inside a model; "
                            "wrap it, e.g. nn.Sequential(layer), and tune site '0'")  # fmt: skip
    quantized = sorted({type(m).__module__ + "." + type(m).__name__ for m in model.modules() if "quantized" in type(m).__module__})
    if quantized and not tunable:
        raise LoweringError(f"{type(model).__name__} holds quantized modules ({', '.join(quantized[:3])}), which peftplan "
                            "does not tune: plan and apply on the floating-point model, then quantize")  # fmt: skip
    if not tunable:
        raise LoweringError(
            f"{type(model).__name__} has no tunable module (Linear, Conv1d/2d, HF Conv1D, Embedding, "
            "LayerNorm/RMSNorm): there is nothing for peftplan to tune"
        )
    inputs = normalise(example_inputs) if example_inputs is not None else synthesise(model)
    stacks = blocks_pass.find_stacks(model)

    was_training = model.training
    model.eval()
    try:
        og, shortened = _capture_shortened(model, inputs, stacks if shorten else [])
        kernels, kernel_note = _kernels(model, inputs)
    finally:
        model.train(was_training)

    calls: dict[str, list] = {}
    for n in og.nodes:
        if n.kind == "site":
            calls.setdefault(n.site, []).append(n)
    if not calls:
        raise LoweringError(
            f"{type(model).__name__} has tunable modules but none was called on the example inputs; "
            "pass example_inputs that exercise the model"
        )
    order = list(calls)
    sources, site_in = dataflow.propagate(og)
    graph = dataflow.edges(og, site_in)
    if shortened:
        order, graph = blocks_pass.expand(order, graph, stacks)

    where = {name: next(((s, i) for s in stacks if (i := s.child_of(name)) is not None), None) for name in order}
    block_of = {n: (loc[1] if loc else None) for n, loc in where.items()}

    def stand_in(name: str) -> str:
        """The captured site whose calls and dataflow roles ``name`` shares."""
        loc = where[name]
        return name if name in calls else loc[0].rename(name, loc[1], loc[0].rep(loc[1]))

    def same_block(a: str, b: str) -> bool:
        la, lb = where.get(a), where.get(b)
        if la is None or lb is None:
            return la is None and lb is None and not stacks  # heads outside blocks are not an MLP
        return la[0] is lb[0] and la[1] == lb[1]

    ops = {n: tunable[n] for n in order}
    flow_captured = dataflow.flow_roles(og, sources, site_in, {n: tunable[n] for n in calls}, same_block)
    flow = {n: flow_captured[stand_in(n)] for n in order if stand_in(n) in flow_captured}
    role_of, notes = roles.assign(order, ops, flow, block_of)

    depth = _depths(order, where)
    tied = _tied(model, order)
    sites = []
    for name in order:
        module, site_calls = model.get_submodule(name), calls[stand_in(name)]
        sites.append(
            static_site(
                name, module, ops[name],
                role=role_of[name], tied=tied.get(name, ()), block=block_of[name],
                stack=where[name][0].path if where[name] else None, depth=depth[name],
                in_shape=site_calls[0].in_shape, out_shape=site_calls[0].out_shape, calls=len(site_calls),
                flops=sum(_flops(module, ops[name], c.out_shape) for c in site_calls),
            )  # fmt: skip
        )
    block_list = [Block(s.path, i, s.size, s.type_names[i]) for s in stacks for i in range(s.size)]
    notes = list(og.notes) + notes + kernel_note
    if shortened:
        notes.append("captured " + ", ".join(f"{s.path or '<root>'}: {len(s.kept)} of {s.size} blocks" for s in stacks) + " and expanded by structure")
    return SiteGraph(
        sites=sites,
        graph=graph,
        blocks=block_list,
        capture=og.path,
        fingerprint=fingerprint(model),
        model_class=type(model).__name__,
        total_params=count_params(model),
        notes=notes,
        example_shape=batch_shape(*inputs),
        kernels=kernels,
    )


def _kernels(model: nn.Module, inputs) -> tuple[int, list[str]]:
    """Kernels of one eager forward of the whole model (the latency model's per-call term);
    0 and a note when the model does not run eagerly on these inputs."""
    try:
        return count_kernels(model, inputs), []
    except Exception as e:  # the graph is still useful without the count
        return 0, [f"kernels not counted: {type(e).__name__}: {str(e)[:200]}"]


def _capture_shortened(model: nn.Module, inputs, stacks) -> tuple[OpGraph, bool]:
    """Capture with deep stacks shortened; if the shortened model does not run (its forward
    indexes blocks by number, say), capture it whole."""
    if any(len(s.kept) < s.size for s in stacks):
        try:
            with blocks_pass.shortened(stacks):
                og = capture(model, inputs)
            if og.has_dataflow:
                return og, True
        except CaptureError:
            pass
    return capture(model, inputs), False


def _depths(order: list[str], where: dict) -> dict[str, float]:
    """Relative depth in [0, 1]: block index over the stack's depth. A site outside blocks
    is 0 before and 1 after the stack it shares the longest path prefix with (embeddings,
    final norms); otherwise it takes the depth of the last block site before it. Without
    blocks: position in execution order."""
    if all(loc is None for loc in where.values()):
        n = len(order)
        return {name: (i / (n - 1) if n > 1 else 0.0) for i, name in enumerate(order)}
    stacks = {id(loc[0]): loc[0] for loc in where.values() if loc is not None}.values()
    first = {}
    for i, name in enumerate(order):
        if where[name] is not None:
            first.setdefault(id(where[name][0]), i)

    def shared(a: str, b: str) -> int:
        pa, pb = a.split("."), b.split(".")
        return next((k for k, (x, y) in enumerate(zip(pa, pb)) if x != y), min(len(pa), len(pb)))

    out, last = {}, 0.0
    for i, name in enumerate(order):
        loc = where[name]
        if loc is not None:
            s, b = loc
            out[name] = last = b / (s.size - 1) if s.size > 1 else 0.0
            continue
        near = max(stacks, key=lambda s: shared(name, s.path + ".x"))
        if shared(name, near.path + ".x") > 0:
            out[name] = 0.0 if i < first[id(near)] else 1.0
        else:
            out[name] = last
    return out


def _tied(model: nn.Module, order: list[str]) -> dict[str, tuple[str, ...]]:
    """Sites whose weight tensor is shared with another site."""
    owners: dict[int, list[str]] = {}
    for name in order:
        w = getattr(model.get_submodule(name), "weight", None)
        if isinstance(w, torch.Tensor):
            owners.setdefault(id(w), []).append(name)
    return {n: tuple(o for o in names if o != n) for names in owners.values() if len(names) > 1 for n in names}


def _flops(module: nn.Module, op: str, out_shape: tuple[int, ...]) -> int:
    """Forward FLOPs (2 x multiply-adds) of one call producing ``out_shape``."""
    if not out_shape:
        return 0
    numel = math.prod(out_shape)
    i, _o = module_features(module)
    if op == "linear":
        return 2 * numel * i
    if op in ("conv1d", "conv2d"):
        k = math.prod(module.kernel_size)
        return 2 * numel * (i // module.groups) * k
    if op == "norm":
        return 5 * numel
    return 0

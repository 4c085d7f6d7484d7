"""`lower(model) -> SiteGraph`: the lowering pipeline, one pass per function, each writing its
result onto the `SiteGraph` (``graph.annotate``), as torch.fx passes annotate their nodes.

capture (shortened stacks) → sites → dataflow → blocks (full depth) → depths → roles → costs.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> g = lower(LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
    ...                                        num_attention_heads=4, vocab_size=128)))
    >>> print(g.table())  # doctest: +ELLIPSIS
    LlamaForCausalLM: 21 sites, 2 blocks, ... captured by export
    ...
"""

from __future__ import annotations

import math
from collections.abc import Container
from dataclasses import replace
from typing import Any

import networkx as nx
import torch
import torch.nn as nn

from . import blocks as blocks_pass
from . import dataflow, roles
from .blocks import Stack
from .capture import CaptureError, OpGraph, OpNode, capture
from .inputs import batch_shape, normalise
from .inputs import example_inputs as synthesise
from .kernels import count_kernels
from .modules import count_params, fingerprint, module_features, module_op, static_site
from .site import Block, Site, SiteGraph


class LoweringError(ValueError):
    """The model cannot be lowered as given; the message says why and what to do."""


def lower(model: nn.Module, example_inputs: Any = None, *, shorten: bool = True) -> SiteGraph:
    """Lower ``model`` to a `SiteGraph` of every tunable site it calls.

    ``example_inputs``: a tensor, a tuple of positional arguments or a dict of keyword
    arguments; synthesised when omitted (HF configs, or the first tunable module's shape).
    Models on the meta device lower without allocating weights. ``shorten=False`` captures
    every block instead of a few per structure (slower on deep models; same result). Each
    pass after capture writes its result onto the graph, as fx passes annotate their nodes:
    sites, dataflow edges, blocks (full depth), depths, roles, costs.

    >>> import torch.nn as nn
    >>> [(s.name, s.role, s.depth, s.flops) for s in lower(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))]
    [('0', 'mlp.up', 0.0, 64), ('2', 'mlp.down', 1.0, 32)]
    """
    tunable = _tunable(model)
    inputs = normalise(example_inputs) if example_inputs is not None else synthesise(model)
    stacks = blocks_pass.find_stacks(model)
    og, shortened, graph = _capture(model, inputs, stacks if shorten else [])
    graph, calls = _sites(graph, model, og, tunable)
    sources, site_in = dataflow.propagate(og)
    graph.graph = dataflow.edges(og, site_in)
    if shortened:
        graph = _expand(graph, model, tunable, stacks)
    _blocks(graph, stacks)
    _depths(graph, stacks)
    _roles(graph, og, sources, site_in, stacks, calls)
    _costs(graph, model, stacks, calls)
    return graph


def _tunable(model: nn.Module) -> dict[str, str]:
    """The tunable modules of ``model`` by path, with their op; a `LoweringError` saying why
    there is nothing to lower otherwise."""
    if not isinstance(model, nn.Module):
        raise LoweringError(f"lower() takes a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise LoweringError(
            f"{type(model).__name__} is a TorchScript module, whose submodules peftplan cannot "
            "replace: lower and apply the eager model, then script the tuned one"
        )
    tunable = {n: op for n, m in model.named_modules() if (op := module_op(m))}
    if "" in tunable:
        raise LoweringError(
            f"the model is a single {type(model).__name__}: peftplan tunes the modules inside a model; "
            "wrap it, e.g. nn.Sequential(layer), and tune site '0'"
        )
    quantized = sorted(
        {type(m).__module__ + "." + type(m).__name__ for m in model.modules() if "quantized" in type(m).__module__}
    )
    if quantized and not tunable:
        raise LoweringError(
            f"{type(model).__name__} holds quantized modules ({', '.join(quantized[:3])}), which peftplan "
            "does not tune: plan and apply on the floating-point model, then quantize"
        )
    if not tunable:
        raise LoweringError(
            f"{type(model).__name__} has no tunable module (Linear, Conv1d/2d, HF Conv1D, Embedding, "
            "LayerNorm/RMSNorm): there is nothing for peftplan to tune"
        )
    return tunable


def _capture(model: nn.Module, inputs, stacks: list[Stack]) -> tuple[OpGraph, bool, SiteGraph]:
    """Capture pass, in eval mode: the `OpGraph` (stacks shortened when that runs), whether it
    was shortened, and a `SiteGraph` without sites holding what the model itself says (its
    class, fingerprint and parameters, the example's shape, the kernels one forward runs)."""
    was_training = model.training
    model.eval()
    try:
        og, shortened = _capture_shortened(model, inputs, stacks)
        kernels, kernel_note = _kernels(model, inputs)
    finally:
        model.train(was_training)
    graph = SiteGraph(
        sites=[],
        graph=nx.DiGraph(),
        blocks=[],
        capture=og.path,
        fingerprint=fingerprint(model),
        model_class=type(model).__name__,
        total_params=count_params(model),
        notes=[*og.notes, *kernel_note],
        example_shape=batch_shape(*inputs),
        kernels=kernels,
    )
    return og, shortened, graph


def _sites(
    graph: SiteGraph, model: nn.Module, og: OpGraph, tunable: dict[str, str]
) -> tuple[SiteGraph, dict[str, list[OpNode]]]:
    """Sites pass: a `Site` per tunable module the captured forward calls, in call order, with
    its shapes (at its first call) and call count; and each site's calls, for the later passes."""
    calls: dict[str, list[OpNode]] = {}
    for n in og.nodes:
        if n.kind == "site":
            calls.setdefault(n.site, []).append(n)
    if not calls:
        raise LoweringError(
            f"{type(model).__name__} has tunable modules but none was called on the example inputs; "
            "pass example_inputs that exercise the model"
        )
    sites = [
        static_site(
            name,
            model.get_submodule(name),
            tunable[name],
            in_shape=c[0].in_shape,
            out_shape=c[0].out_shape,
            calls=len(c),
        )
        for name, c in calls.items()
    ]
    return replace(graph, sites=sites), calls


def _expand(graph: SiteGraph, model: nn.Module, tunable: dict[str, str], stacks: list[Stack]) -> SiteGraph:
    """Blocks pass, first half: the full-depth sites and dataflow of a capture with shortened
    stacks (`blocks.expand`); a site in a block not captured takes its stand-in's shapes and calls."""
    order, edges = blocks_pass.expand(graph.names(), graph.graph, stacks)

    def copied(name: str) -> Site:
        like = graph[_stand_in(name, stacks, graph)]
        return static_site(
            name,
            model.get_submodule(name),
            tunable[name],
            in_shape=like.in_shape,
            out_shape=like.out_shape,
            calls=like.calls,
        )

    kept = ", ".join(f"{len(s.kept)} of the {s.size} blocks of {s.path or '<root>'}" for s in stacks)
    note = (
        f"traced {kept} (faster than tracing all); the other blocks are built the same way, so their sites are "
        "copies of the traced blocks' sites"
    )
    return replace(
        graph,
        sites=[graph[n] if n in graph else copied(n) for n in order],
        graph=edges,
        notes=[*graph.notes, note],
    )


def _blocks(graph: SiteGraph, stacks: list[Stack]) -> None:
    """Blocks pass, second half: each site's block index and stack path, and the graph's blocks."""
    where = {s.name: loc for s in graph if (loc := _locate(s.name, stacks)) is not None}
    graph.annotate("block", {n: i for n, (_, i) in where.items()})
    graph.annotate("stack", {n: s.path for n, (s, _) in where.items()})
    graph.blocks = [Block(s.path, i, s.size, s.type_names[i]) for s in stacks for i in range(s.size)]


def _locate(name: str, stacks: list[Stack]) -> tuple[Stack, int] | None:
    return next(((s, i) for s in stacks if (i := s.child_of(name)) is not None), None)


def _stand_in(name: str, stacks: list[Stack], captured: Container[str]) -> str:
    """The ``captured`` site whose calls and dataflow roles site ``name`` shares: itself if captured."""
    loc = None if name in captured else _locate(name, stacks)
    return name if loc is None else loc[0].rename(name, loc[1], loc[0].rep(loc[1]))


def _roles(
    graph: SiteGraph, og: OpGraph, sources, site_in, stacks: list[Stack], calls: dict[str, list[OpNode]]
) -> None:
    """Roles pass: the roles the dataflow implies (`dataflow.flow_roles`, on the captured
    sites; a site in a block not captured takes its stand-in's), confirmed against names."""

    def same_block(a: str, b: str) -> bool:
        la, lb = _locate(a, stacks), _locate(b, stacks)
        if la is None or lb is None:
            return la is None and lb is None and not stacks  # heads outside blocks are not an MLP
        return la[0] is lb[0] and la[1] == lb[1]

    captured = dataflow.flow_roles(og, sources, site_in, {n: graph[n].op for n in calls}, same_block)
    order = graph.names()
    flow = {n: captured[_stand_in(n, stacks, calls)] for n in order if _stand_in(n, stacks, calls) in captured}
    role_of, notes = roles.assign(order, {s.name: s.op for s in graph}, flow, {s.name: s.block for s in graph})
    graph.annotate("role", role_of)
    graph.notes.extend(notes)


def _costs(graph: SiteGraph, model: nn.Module, stacks: list[Stack], calls: dict[str, list[OpNode]]) -> None:
    """Cost pass: forward FLOPs of each site's calls (its stand-in's, in a block not
    captured), and the sites whose weight tensor another site shares."""
    flops = {}
    for s in graph:
        module = model.get_submodule(s.name)
        flops[s.name] = sum(_flops(module, s.op, c.out_shape) for c in calls[_stand_in(s.name, stacks, calls)])
    graph.annotate("flops", flops)
    graph.annotate("tied", _tied(model, graph.names()))


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


def _depths(graph: SiteGraph, stacks: list[Stack]) -> None:
    """Depth pass: relative depth in [0, 1], block index over the stack's depth. A site outside
    blocks is 0 before and 1 after the stack it shares the longest path prefix with
    (embeddings, final norms); otherwise it takes the depth of the last block site before it.
    Without blocks: position in execution order."""
    order = graph.names()
    if all(s.block is None for s in graph):
        n = len(order)
        graph.annotate("depth", {name: (i / (n - 1) if n > 1 else 0.0) for i, name in enumerate(order)})
        return
    size = {s.path: s.size for s in stacks}
    first: dict[str, int] = {}
    for i, site in enumerate(graph):
        if site.stack is not None:
            first.setdefault(site.stack, i)
    out, last = {}, 0.0
    for i, site in enumerate(graph):
        if site.block is not None:
            out[site.name] = last = site.block / (size[site.stack] - 1) if size[site.stack] > 1 else 0.0
            continue
        near = max(first, key=lambda path: _shared(site.name, path + ".x"))
        out[site.name] = (0.0 if i < first[near] else 1.0) if _shared(site.name, near + ".x") > 0 else last
    graph.annotate("depth", out)


def _shared(a: str, b: str) -> int:
    """How many leading path components ``a`` and ``b`` share."""
    pa, pb = a.split("."), b.split(".")
    return next((k for k, (x, y) in enumerate(zip(pa, pb)) if x != y), min(len(pa), len(pb)))


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

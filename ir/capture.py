"""Capture pass: run the model symbolically and reduce the graph to an `OpGraph`.

Three ways in, tried in order and recorded on the result:

1. ``symbolic_trace`` — torch.fx with every tunable module kept as a leaf (fast, plain models);
2. ``export`` — ``torch.export.export(strict=False)``; each node carries ``nn_module_stack``,
   from which the nodes of one tunable-module call are folded into one site node (HF models);
3. ``module_walk`` — the model is run once with forward hooks: sites, call counts and shapes
   are exact but there is no dataflow (said in the notes).

    >>> import torch, torch.nn as nn
    >>> og = capture(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), ((torch.randn(1, 4),), {}))
    >>> og.path, [n.site for n in og.nodes if n.site]
    ('symbolic_trace', ['0', '2'])
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn as nn

from .modules import module_op

ATTENTION_OPS = ("scaled_dot_product", "flash_attention", "efficient_attention", "multi_head_attention")
SOFTMAX_OPS = {"softmax", "_softmax", "_safe_softmax"}
MATMUL_OPS = {"matmul", "bmm", "mm", "baddbmm", "einsum"}
ACTIVATIONS = (
    "relu",
    "gelu",
    "silu",
    "swish",
    "sigmoid",
    "tanh",
    "mish",
    "elu",
    "softplus",
    "hardswish",
    "erf",
    "activation",
)


@dataclass
class OpNode:
    """One node of the reduced graph: a site call or a plain op."""

    index: int
    kind: str  # "site" | "attention" | "softmax" | "matmul" | "act" | "input" | "other"
    inputs: list[int] = field(default_factory=list)
    site: str | None = None
    in_shape: tuple[int, ...] = ()
    out_shape: tuple[int, ...] = ()


@dataclass
class OpGraph:
    """The reduced graph in topological order, and how it was captured."""

    nodes: list[OpNode]
    path: str
    notes: list[str] = field(default_factory=list)
    has_dataflow: bool = True


class CaptureError(RuntimeError):
    pass


def capture(model: nn.Module, inputs: tuple[tuple, dict]) -> OpGraph:
    """Capture ``model`` called as ``model(*args, **kwargs)``; falls back in the order above."""
    tunable = {name: op for name, mod in model.named_modules() if (op := module_op(mod))}
    reasons = []
    for path, fn in (("symbolic_trace", _symbolic_trace), ("export", _export)):
        try:
            og = fn(model, inputs, tunable)
        except Exception as e:  # any failure means: try the next capture path
            reasons.append(f"{path}: {type(e).__name__}: {_first_line(e)}")
            continue
        og.notes.extend(f"{r} (fell back)" for r in reasons[1:])
        return og
    og = _module_walk(model, inputs, tunable)
    why = "; ".join(reasons)
    warnings.warn(
        f"peftplan.lower: {type(model).__name__} could not be traced ({why}); fell back to a "
        "module walk: sites, roles by name and shapes are known, dataflow edges are not. "
        "Data-dependent Python control flow is the usual cause.",
        stacklevel=3,
    )
    og.notes.append(f"no dataflow: tracing failed ({why})")
    return og


def _first_line(e: Exception) -> str:
    s = str(e).strip().splitlines()
    return s[0][:200] if s else ""


def _op_kind(name: str) -> str:
    n = name.lower().rstrip("_")
    if any(a in n for a in ATTENTION_OPS):
        return "attention"
    if n in SOFTMAX_OPS:
        return "softmax"
    if n in MATMUL_OPS:
        return "matmul"
    if any(a in n for a in ACTIVATIONS) and "dropout" not in n:
        return "act"
    return "other"


def _shape(val) -> tuple[int, ...]:
    if isinstance(val, (tuple, list)):
        val = next((v for v in val if hasattr(v, "shape")), None)
    shape = getattr(val, "shape", None)
    if shape is None:
        return ()
    try:
        return tuple(int(d) for d in shape)
    except (TypeError, ValueError):  # symbolic sizes
        return ()


def _node_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    return list(node.all_input_nodes)


# -- 1. torch.fx symbolic_trace ---------------------------------------------------------------


class _LeafTracer(torch.fx.Tracer):
    def __init__(self, tunable: dict[str, str]):
        super().__init__()
        self.tunable = tunable

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.tunable or super().is_leaf_module(m, qualname)


def _symbolic_trace(model: nn.Module, inputs: tuple[tuple, dict], tunable: dict[str, str]) -> OpGraph:
    args, kwargs = inputs
    if kwargs:
        raise CaptureError("keyword inputs are not supported by symbolic_trace")
    tracer = _LeafTracer(tunable)
    graph = tracer.trace(model)
    gm = torch.fx.GraphModule(tracer.root, graph)
    from torch.fx.passes.shape_prop import ShapeProp

    with redirect_stderr(
        io.StringIO()
    ):  # ShapeProp prints a traceback before raising; the fallback reports it in one line
        ShapeProp(gm).propagate(*args)

    nodes: list[OpNode] = []
    index: dict[torch.fx.Node, int] = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        ins = [index[a] for a in _node_inputs(node) if a in index]
        meta = node.meta.get("tensor_meta")
        out_shape = tuple(meta.shape) if hasattr(meta, "shape") else ()
        site = None
        if node.op in ("placeholder", "get_attr"):
            kind = "input"
        elif node.op == "call_module" and node.target in tunable:
            kind, site = "site", node.target
        elif node.op == "call_module":
            kind = _op_kind(type(gm.get_submodule(node.target)).__name__)
        elif node.op == "call_method":
            kind = _op_kind(node.target)
        else:
            kind = _op_kind(getattr(node.target, "__name__", str(node.target)))
        in_shape = ()
        if site is not None and node.args and isinstance(node.args[0], torch.fx.Node):
            m = node.args[0].meta.get("tensor_meta")
            in_shape = tuple(m.shape) if hasattr(m, "shape") else ()
        index[node] = len(nodes)
        nodes.append(OpNode(len(nodes), kind, ins, site, in_shape, out_shape))
    return OpGraph(nodes, "symbolic_trace")


@contextmanager
def _quiet_torch_logs():
    """torch.export prints and logs the failing graph when it gives up; the fallback warning
    says why instead."""
    loggers = [
        logging.getLogger(n)
        for n in ("torch.fx.experimental.symbolic_shapes", "torch._export", "torch.export", "torch._dynamo")
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# -- 2. torch.export --------------------------------------------------------------------------


def _export(model: nn.Module, inputs: tuple[tuple, dict], tunable: dict[str, str]) -> OpGraph:
    args, kwargs = inputs
    with warnings.catch_warnings(), _quiet_torch_logs():
        warnings.simplefilter("ignore")
        ep = torch.export.export(model, args, kwargs, strict=False)
    from torch.export.graph_signature import InputKind

    weights = {s.arg.name for s in ep.graph_signature.input_specs if s.kind != InputKind.USER_INPUT}
    keys = {node: _site_key(node, tunable) for node in ep.graph.nodes if node.op == "call_function"}
    return OpGraph(_fold(ep.graph, keys, weights), "export")


def _site_key(node: torch.fx.Node, tunable: dict[str, str]) -> tuple[str, str] | None:
    """The innermost tunable-module call ``node`` belongs to: (call key, module path), or None."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    for key, (path, _cls) in reversed(stack.items()):
        if path in tunable:
            return key, path
    return None


def _fold(graph: torch.fx.Graph, keys: dict[torch.fx.Node, tuple[str, str] | None], weights: set[str]) -> list[OpNode]:
    """The exported graph's nodes as `OpNode`s, those of one tunable-module call folded into
    one site node (its inputs from outside the call, its shape at the input and the output)."""
    last = {key[0]: node for node, key in keys.items() if key is not None}

    def resolve(a: torch.fx.Node, call: str | None) -> torch.fx.Node:
        """Outside a call, an inner node of it (not its result) is a pass-through alias of
        the call's input (``x.to(float32)`` in an RMSNorm returns ``x``): read through it."""
        while (k := keys.get(a)) is not None and k[0] != call and last[k[0]] is not a:
            a = next((i for i in _node_inputs(a) if i.name not in weights), None) or a
            if keys.get(a) is None or keys[a][0] != k[0]:
                break
        return a

    nodes: list[OpNode] = []
    index: dict[torch.fx.Node, int] = {}
    groups: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "output":
            continue
        if node.op == "placeholder":
            index[node] = len(nodes)
            nodes.append(OpNode(len(nodes), "input", out_shape=_shape(node.meta.get("val"))))
            continue
        key = keys.get(node)
        ext = [r for a in _node_inputs(node) if (r := resolve(a, key[0] if key else None)) in index]
        if key is None:
            name = getattr(node.target, "_opname", None) or getattr(node.target, "__name__", str(node.target))
            index[node] = len(nodes)
            nodes.append(
                OpNode(len(nodes), _op_kind(name), [index[a] for a in ext], out_shape=_shape(node.meta.get("val")))
            )
            continue
        if key[0] not in groups:
            groups[key[0]] = len(nodes)
            data = next((a for a in ext if a.name not in weights), None)
            nodes.append(
                OpNode(len(nodes), "site", [], key[1], _shape(data.meta.get("val")) if data is not None else ())
            )
        g = nodes[groups[key[0]]]
        for i in (index[a] for a in ext):
            if i != g.index and i not in g.inputs:
                g.inputs.append(i)
        if _shape(node.meta.get("val")):
            g.out_shape = _shape(node.meta.get("val"))
        index[node] = g.index
    return nodes


# -- 3. module walk with hooks ---------------------------------------------------------------


def _module_walk(model: nn.Module, inputs: tuple[tuple, dict], tunable: dict[str, str]) -> OpGraph:
    nodes: list[OpNode] = []
    handles = []

    def hook_for(path: str) -> Callable:
        def hook(_mod, args, output):
            x = args[0] if args else None
            nodes.append(OpNode(len(nodes), "site", [], path, _shape(x), _shape(output)))

        return hook

    for path in tunable:
        handles.append(model.get_submodule(path).register_forward_hook(hook_for(path)))
    try:
        args, kwargs = inputs
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as e:
        raise CaptureError(
            f"{type(model).__name__} failed to run on the example inputs ({type(e).__name__}: {_first_line(e)}); "
            "pass lower(model, example_inputs=...) a tensor, a tuple of arguments or a dict of keyword inputs the "
            "model accepts (search and the CLI take that lowering as search(..., graph=lower(model, example_inputs=...)))"
        ) from e
    finally:
        for h in handles:
            h.remove()
    return OpGraph(nodes, "module_walk", has_dataflow=False)

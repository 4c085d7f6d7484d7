"""Dataflow pass: site → site edges, and the roles the dataflow itself implies.

Each node of the `OpGraph` carries the set of sites whose output reaches it without passing
another site (a site node resets the set to itself). Activations tag what passes them
(``act:<site>``), attention ops add the marker ``@attn``. From those sets:

- edges ``a -> b`` for every site ``a`` in the set reaching ``b``'s input;
- q/k/v: the sites feeding the query, key and value operands of an attention op (or of the
  ``matmul → softmax → matmul`` pattern); a site feeding several is a fused ``attn.qkv``;
- o: a linear site fed by an attention result;
- up/gate/down: a linear site fed through an activation is a down projection; what fed it
  through the activation is the up projection, or the gate when another site of the same
  block feeds it directly (``down(act(gate(x)) * up(x))``).
"""

from __future__ import annotations

from graphlib import TopologicalSorter

import networkx as nx

from .capture import OpGraph

ATTN = "@attn"


def _site_of(token: str) -> str | None:
    if token.startswith("@"):
        return None
    return token[4:] if token.startswith("act:") else token


def propagate(og: OpGraph) -> tuple[dict[int, frozenset], dict[str, set[str]]]:
    """Source sets per node, and the union of source sets reaching each site's inputs."""
    order = TopologicalSorter({n.index: set(n.inputs) for n in og.nodes}).static_order()
    nodes = {n.index: n for n in og.nodes}
    sources: dict[int, frozenset] = {}
    site_in: dict[str, set[str]] = {}
    for i in order:
        n = nodes[i]
        incoming = frozenset().union(*(sources.get(j, frozenset()) for j in n.inputs))
        if n.kind == "site":
            site_in.setdefault(n.site, set()).update(incoming)
            sources[i] = frozenset({n.site})
        elif n.kind == "act":
            sources[i] = frozenset(t if t.startswith(("@", "act:")) else f"act:{t}" for t in incoming)
        elif n.kind in ("attention", "softmax"):
            sources[i] = incoming | {ATTN}
        else:
            sources[i] = incoming
    return sources, site_in


def edges(og: OpGraph, site_in: dict[str, set[str]]) -> nx.DiGraph:
    g = nx.DiGraph()
    g.add_nodes_from(n.site for n in og.nodes if n.kind == "site")
    for site, tokens in site_in.items():
        for t in tokens:
            src = _site_of(t)
            if src is not None:
                g.add_edge(src, site)
    return g


def _sites(tokens) -> set[str]:
    return {s for t in tokens if (s := _site_of(t)) is not None}


def flow_roles(og: OpGraph, sources, site_in, ops: dict[str, str], same_block) -> dict[str, str]:
    """Roles implied by the dataflow alone (see module docstring). ``ops`` maps site → op;
    ``same_block(a, b)`` says whether two sites sit in the same block."""
    roles: dict[str, str] = {}
    for s, rs in _attention_operands(og, sources).items():
        if ops.get(s) == "linear":
            roles[s] = "attn.qkv" if len(rs) > 1 else f"attn.{rs.pop()}"
    for site, tokens in site_in.items():
        if ops.get(site) == "linear" and site not in roles and ATTN in tokens:
            roles[site] = "attn.o"
    _mlp_roles(og, site_in, ops, same_block, roles)
    return roles


def _attention_operands(og: OpGraph, sources) -> dict[str, set[str]]:
    """The operands (``"q"``, ``"k"``, ``"v"``) each site feeds of an attention op or of a
    ``matmul → softmax → matmul`` pattern."""
    nodes = {n.index: n for n in og.nodes}
    users: dict[int, list[int]] = {}
    for n in og.nodes:
        for j in n.inputs:
            users.setdefault(j, []).append(n.index)
    qkv: dict[str, set[str]] = {}

    def feed(node_index: int, role: str) -> None:
        for s in _sites(sources.get(node_index, ())):
            qkv.setdefault(s, set()).add(role)

    def nearest(start: int, step, kind: str) -> int | None:
        seen, todo = set(), list(step(start))
        while todo:
            i = todo.pop(0)
            if i in seen:
                continue
            seen.add(i)
            if nodes[i].kind == kind:
                return i
            if nodes[i].kind != "site":
                todo.extend(step(i))
        return None

    for n in og.nodes:
        if n.kind == "attention" and len(n.inputs) >= 3:
            for j, role in zip(n.inputs[:3], ("q", "k", "v")):
                feed(j, role)
        elif n.kind == "softmax":
            scores = nearest(n.index, lambda i: nodes[i].inputs, "matmul")
            mixed = nearest(n.index, lambda i: users.get(i, []), "matmul")
            if scores is not None and len(nodes[scores].inputs) >= 2:
                feed(nodes[scores].inputs[0], "q")
                feed(nodes[scores].inputs[1], "k")
            if mixed is not None:
                for j in nodes[mixed].inputs:
                    if ATTN not in sources.get(j, ()):
                        feed(j, "v")
    return qkv


def _mlp_roles(og: OpGraph, site_in, ops: dict[str, str], same_block, roles: dict[str, str]) -> None:
    """up/gate/down, in ``roles`` for the linear sites it leaves unassigned: a site fed through
    an activation by another of its block is a down projection, that one its up projection, or
    its gate when a third feeds the down projection directly."""
    for n in og.nodes:
        y = n.site
        if n.kind != "site" or ops.get(y) != "linear" or y in roles:
            continue
        tokens = site_in.get(y, set())
        through = {t[4:] for t in tokens if t.startswith("act:")}
        direct = {t for t in tokens if not t.startswith(("@", "act:")) and t not in through}
        through = {x for x in through if ops.get(x) == "linear" and same_block(x, y) and x not in roles}
        direct = {x for x in direct if ops.get(x) == "linear" and same_block(x, y) and x not in roles}
        if not through:
            continue
        roles[y] = "mlp.down"
        for x in through:
            roles.setdefault(x, "mlp.gate" if direct else "mlp.up")
        for x in direct:
            roles.setdefault(x, "mlp.up")

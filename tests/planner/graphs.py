"""Hand-built site graphs for planner tests: linear sites chained in the order given."""

from __future__ import annotations

import networkx as nx

from peftplan.ir.site import Site, SiteGraph


def linear_site(name: str, role: str, n_in: int, n_out: int, block: int | None = 0, depth: float = 0.0) -> Site:
    return Site(
        name=name,
        op="linear",
        role=role,
        module_type="Linear",
        in_features=n_in,
        out_features=n_out,
        params=n_in * n_out + n_out,
        block=block,
        depth=depth,
    )


def graph_of(*sites: Site) -> SiteGraph:
    g = nx.DiGraph()
    g.add_nodes_from(s.name for s in sites)
    g.add_edges_from((a.name, b.name) for a, b in zip(sites, sites[1:], strict=False))
    return SiteGraph(
        sites=list(sites),
        graph=g,
        blocks=[],
        capture="hand",
        fingerprint="0" * 16,
        model_class="Hand",
        total_params=sum(s.params for s in sites),
    )

"""Shared helpers for planner tests: hand-built site graphs and a tiny BERT."""

from __future__ import annotations

import networkx as nx
import pytest
import torch

import peftplan  # noqa: F401  (registers the backends' methods)
from peftplan.ir.site import Site, SiteGraph


def linear_site(name: str, role: str, n_in: int, n_out: int, block: int | None = 0, depth: float = 0.0) -> Site:
    return Site(name=name, op="linear", role=role, module_type="Linear", in_features=n_in,
                out_features=n_out, params=n_in * n_out + n_out, block=block, depth=depth)  # fmt: skip


def graph_of(*sites: Site) -> SiteGraph:
    g = nx.DiGraph()
    g.add_nodes_from(s.name for s in sites)
    g.add_edges_from((a.name, b.name) for a, b in zip(sites, sites[1:], strict=False))
    return SiteGraph(sites=list(sites), graph=g, blocks=[], capture="hand", fingerprint="0" * 16,
                     model_class="Hand", total_params=sum(s.params for s in sites))  # fmt: skip


@pytest.fixture(scope="session")
def tiny_bert():
    """A 2-layer BERT classifier with hidden size 32 and a 100-token vocabulary."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2)  # fmt: skip
    return BertForSequenceClassification(config).eval()


@pytest.fixture(scope="session")
def tiny_bert_graph(tiny_bert):
    return peftplan.lower(tiny_bert)

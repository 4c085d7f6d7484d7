"""Fixtures for planner tests: a tiny BERT classifier and its lowered graph."""

from __future__ import annotations

import pytest
import torch

import peftplan  # noqa: F401  (registers the backends' methods)


@pytest.fixture(scope="session")
def tiny_bert():
    """A 2-layer BERT classifier with hidden size 32 and a 100-token vocabulary."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
    )
    return BertForSequenceClassification(config).eval()


@pytest.fixture(scope="session")
def tiny_bert_graph(tiny_bert):
    return peftplan.lower(tiny_bert)

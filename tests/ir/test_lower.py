"""Lowering the zoo: sites against a forward-hook count, roles against hand-written names,
blocks, dataflow, the meta device, and the shortened capture against the full one."""

from __future__ import annotations

import json
import warnings
from collections import Counter

import pytest
import torch
import torch.nn as nn

from peftplan.ir import SiteGraph, lower
from peftplan.ir.inputs import example_inputs
from peftplan.ir.lower import LoweringError
from peftplan.ir.modules import module_op
from tests import zoo


def called_modules(model: nn.Module, inputs) -> Counter:
    """Reference: which tunable modules a real forward calls, and how often."""
    calls: Counter = Counter()
    hooks = [
        m.register_forward_hook(lambda _m, _i, _o, n=name: calls.update([n]))
        for name, m in model.named_modules()
        if module_op(m)
    ]
    args, kwargs = inputs
    with torch.no_grad():
        model.eval()(*args, **kwargs)
    for h in hooks:
        h.remove()
    return calls


# What each family's module names mean, written by hand from the model definitions.
ROLE_OF_LEAF = {
    "query": "attn.q",
    "key": "attn.k",
    "value": "attn.v",
    "q_lin": "attn.q",
    "k_lin": "attn.k",
    "v_lin": "attn.v",
    "out_lin": "attn.o",
    "q_proj": "attn.q",
    "k_proj": "attn.k",
    "v_proj": "attn.v",
    "o_proj": "attn.o",
    "q": "attn.q",
    "k": "attn.k",
    "v": "attn.v",
    "o": "attn.o",
    "c_attn": "attn.qkv",
    "gate_proj": "mlp.gate",
    "up_proj": "mlp.up",
    "down_proj": "mlp.down",
    "lin1": "mlp.up",
    "lin2": "mlp.down",
    "wi": "mlp.up",
    "wo": "mlp.down",
    "fc1": "mlp.up",
    "fc2": "mlp.down",
    "c_fc": "mlp.up",
}


def expected_role(site) -> str:
    parts = site.name.split(".")
    if site.op == "norm":
        return "norm"
    if parts[0] in ("classifier", "lm_head", "pooler", "pre_classifier"):
        return "head"
    if parts[-1] == "relative_attention_bias":
        return "other"
    if site.op == "embedding" or parts[-2:] == ["patch_embeddings", "projection"]:
        return "embed"
    if parts[-1] == "dense":  # BERT family: attention.output.dense / intermediate.dense / output.dense
        return "attn.o" if "attention" in parts else "mlp.up" if "intermediate" in parts else "mlp.down"
    if parts[-1] == "c_proj":  # GPT-2: attn.c_proj / mlp.c_proj
        return "attn.o" if "attn" in parts else "mlp.down"
    return ROLE_OF_LEAF[parts[-1]]


@pytest.mark.parametrize("name", sorted(zoo.HF))
def test_hf_zoo_sites_roles_blocks(name):
    model = getattr(zoo, name)()
    inputs = example_inputs(model)
    reference = called_modules(model, inputs)
    g = lower(model, inputs)

    assert g.capture == "export"
    assert {s.name: s.calls for s in g} == dict(reference)
    for s in g:
        assert s.role == expected_role(s), s.name
    stacks = Counter(s.stack for s in g if s.stack)
    assert len(g.blocks) == zoo.L * len(stacks)  # T5: encoder and decoder stacks
    for s in g:
        if s.stack:
            assert s.name.startswith(f"{s.stack}.{s.block}.")
            assert s.depth == s.block / (zoo.L - 1)
        else:
            assert s.depth in (0.0, 1.0)


def test_llama_block_dataflow():
    g = lower(zoo.llama())
    e = g.graph
    for b in range(zoo.L):
        p = f"model.layers.{b}."
        for x in ("q_proj", "k_proj", "v_proj"):
            assert e.has_edge(p + "self_attn." + x, p + "self_attn.o_proj")
        for x in ("up_proj", "gate_proj"):
            assert e.has_edge(p + "mlp." + x, p + "mlp.down_proj")
        assert not e.has_edge(p + "self_attn.q_proj", p + "mlp.down_proj")
        assert e.has_edge(p + "input_layernorm", p + "self_attn.q_proj")
    assert e.has_edge("model.layers.0.mlp.down_proj", "model.layers.1.input_layernorm")
    assert e.has_edge("model.layers.1.mlp.down_proj", "model.norm")
    assert e.has_edge("model.norm", "lm_head")


def test_roles_from_dataflow_with_unfamiliar_names():
    g = lower(zoo.OddNet(), zoo.odd_input())
    want = {
        "alpha": "attn.q",
        "beta": "attn.k",
        "gamma": "attn.v",
        "delta": "attn.o",
        "valve": "mlp.gate",
        "widen": "mlp.up",
        "narrow": "mlp.down",
    }
    assert {s.name.split(".")[-1]: s.role for s in g} == want
    assert [b.index for b in g.blocks] == [0, 1, 2]
    assert g["stages.1.narrow"].block == 1 and g["stages.1.narrow"].depth == 0.5


def test_gpt2_conv1d_fused_qkv_and_tied_head():
    g = lower(zoo.gpt2())
    s = g["transformer.h.0.attn.c_attn"]
    assert (s.op, s.module_type, s.in_features, s.out_features) == ("linear", "Conv1D", 32, 96)
    assert g["lm_head"].tied == ("transformer.wte",)


def test_plain_models():
    g = lower(zoo.MLP())
    assert g.capture == "symbolic_trace"
    assert [(s.name, s.role) for s in g] == [("norm", "norm"), ("fc1", "mlp.up"), ("fc2", "mlp.down")]
    assert g["fc1"].flops == 2 * 1 * 8 * 16  # one row of 8 features into 16
    cnn = lower(zoo.CNN())
    body = cnn["body"]
    assert (body.op, body.kernel, body.out_shape) == ("conv2d", (3, 3), (1, 16, 16, 16))
    assert body.flops == 2 * 16 * 16 * 16 * 8 * 9  # every output element: 8 channels x 3x3 taps
    assert list(cnn.graph.edges) == [("stem", "body"), ("body", "head")]


def test_shared_module_is_one_site_called_twice():
    g = lower(zoo.SharedTwice())
    assert g.names() == ["inp", "shared", "out"]
    assert g["shared"].calls == 2
    assert g["shared"].flops == 2 * (2 * 8 * 8)
    assert g.graph.has_edge("shared", "shared")


def test_tied_embedding_and_head():
    g = lower(zoo.TiedLM())
    assert g["embed"].tied == ("lm_head",) and g["lm_head"].tied == ("embed",)
    assert g.site_params == 800 + 272  # the shared matrix counted once
    assert g.total_params == 800 + 272


def test_untraceable_model_falls_back_with_reason():
    with pytest.warns(UserWarning, match=r"could not be traced.*control flow.*module walk"):
        g = lower(zoo.DataDependent())
    assert g.capture == "module_walk"
    assert g.graph.number_of_edges() == 0
    assert any("no dataflow" in n for n in g.notes)
    assert len(g) == 2 and g.names()[0] == "a"  # one branch ran


def test_model_without_tunable_site():
    with pytest.raises(LoweringError, match="no tunable module"):
        lower(nn.Sequential(nn.ReLU(), nn.Tanh()))


@pytest.mark.parametrize(
    "size,layers,kv_out,params", [("7b", 32, 4096, 6_738_415_616), ("70b", 80, 1024, 70_553_706_496)]
)
def test_meta_llama_layouts_lower_without_weights(size, layers, kv_out, params):
    model = zoo.llama_meta(size)
    g = lower(model)
    assert all(p.is_meta for p in model.parameters())
    assert len(g) == 9 * layers + 3 and len(g.blocks) == layers
    assert g.total_params == params
    last = f"model.layers.{layers - 1}."
    assert g[last + "self_attn.k_proj"].out_features == kv_out
    assert g[last + "mlp.down_proj"].depth == 1.0
    assert g.graph.has_edge(last + "self_attn.v_proj", last + "self_attn.o_proj")
    assert any("3 of" in n for n in g.notes)


def test_shortened_capture_equals_full_capture():
    model = zoo.llama(layers=6)
    short, full = lower(model), lower(model, shorten=False)
    assert [s.to_dict() for s in short] == [s.to_dict() for s in full]
    block = {s.name: s.block for s in full}

    def local(edges):  # residual edges that skip blocks are kept only next to the stack
        return {(a, b) for a, b in edges if block[a] is None or block[b] is None or block[b] - block[a] <= 1}

    assert local(short.graph.edges) == local(full.graph.edges)


def test_minilm_from_wheel():
    g = lower(zoo.minilm())
    assert g.model_class == "BertModel" and len(g.blocks) == 6
    roles = Counter(s.role for s in g)
    assert roles["attn.q"] == roles["attn.v"] == roles["mlp.down"] == 6
    assert g["encoder.layer.5.intermediate.dense"].out_features == 1536


def test_sitegraph_json_round_trip_and_table():
    g = lower(zoo.bert())
    back = SiteGraph.from_dict(json.loads(g.to_json()))
    assert [s.to_dict() for s in back] == [s.to_dict() for s in g]
    assert set(back.graph.edges) == set(g.graph.edges)
    assert back.fingerprint == g.fingerprint
    text = str(g)
    assert text.splitlines()[0].startswith("BertModel: 21 sites, 2 blocks")
    assert "encoder.layer.1.output.dense" in text and "mlp.down" in text
    with pytest.raises(ValueError, match="not a peftplan site graph"):
        SiteGraph.from_dict({"format": "other"})


def test_a_pass_annotates_sites_in_place_and_refuses_what_no_site_has():
    g = lower(zoo.MLP())
    before = [s.to_dict() for s in g]
    g.annotate("role", {"fc2": "head"})
    assert g["fc2"].role == "head" and g.sites[-1] is g["fc2"]  # the list and the index agree
    assert [s.to_dict() for s in g] == [{**d, "role": "head"} if d["name"] == "fc2" else d for d in before]
    with pytest.raises(ValueError, match="no field 'colour'"):
        g.annotate("colour", {"fc2": "red"})
    with pytest.raises(KeyError, match="no site named 'fc3'"):
        g.annotate("role", {"fc3": "head"})


def test_select():
    g = lower(zoo.llama())
    assert [s.name for s in g.select(role="attn", block=1)] == [f"model.layers.1.self_attn.{x}_proj" for x in "qkvo"]
    assert len(g.select(op="norm")) == 5
    with pytest.raises(KeyError, match="no site named"):
        g["nope"]


def test_fingerprint_tracks_layout_not_weights():
    a, b = zoo.llama(), zoo.llama()
    assert lower(a).fingerprint == lower(b).fingerprint
    assert lower(a).fingerprint != lower(zoo.llama(layers=3)).fingerprint
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lower(zoo.bert())  # a traceable model raises no warning

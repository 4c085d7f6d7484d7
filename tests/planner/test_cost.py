"""The cost model against hand computations, and against the model `apply` builds."""

from __future__ import annotations

import copy
import json
import struct
from dataclasses import replace

import pytest
import torch

import peftplan as pp
from peftplan.backends import count_trainable, methods
from peftplan.planner.cost import plan_cost, train_memory_estimate
from peftplan.planner.latency import Machine
from tests.planner.graphs import graph_of, linear_site
from tests.zoo import TiedLM

TOKENS = 2 * 16  # the hand-built sites' example: batch 2, sequence 16


def shaped(name: str, role: str, n_in: int, n_out: int):
    """A linear site seen on TOKENS positions, with its forward FLOPs."""
    site = linear_site(name, role, n_in, n_out)
    return replace(site, in_shape=(2, 16, n_in), out_shape=(2, 16, n_out), flops=2 * TOKENS * n_in * n_out, bias=True)


Q, V = shaped("q", "attn.q", 384, 384), shaped("v", "attn.v", 384, 384)
GRAPH = replace(graph_of(Q, V), example_shape=(2, 16))  # the sites were measured on 2 x 16


def test_lora_by_hand():
    plan = pp.Plan(sites={"q": {"method": "lora", "rank": 8}, "v": {"method": "lora", "rank": 8, "alpha": 8}})
    params = 8 * (384 + 384)  # per site
    cost = plan_cost(GRAPH, plan, batch_shape=(8, 16))  # 4 x the example's positions
    assert cost.params == 2 * params
    # fp32 weights + grads (8 B) + AdamW's two states (8 B) per parameter; LoRA keeps its input
    # and its rank-8 projection for backward, 4 B per element, at 4 x 32 positions
    assert cost.train_bytes == 2 * (params * 16 + 4 * (4 * TOKENS) * (384 + 8))
    assert cost.unmerged_flops == 2 * (2 * (4 * TOKENS) * params)  # x@A.T then h@B.T, per site
    assert cost.latency_flops == 0  # both merge
    assert cost.base_flops == 4 * 2 * (2 * TOKENS * 384 * 384)
    assert cost.unmerged_fraction == pytest.approx(2 * 8 * 768 / (2 * 384 * 384))
    assert cost.adapter_bytes == 2 * params * 4
    assert cost.sites["q"].params == params and set(cost.sites) == {"q", "v"}


def test_full_by_hand_counts_no_new_weights():
    cost = plan_cost(GRAPH, pp.Plan(sites={"q": {"method": "full"}}), param_bytes=2, act_bytes=2)
    params = 384 * 384 + 384
    # the weights are the model's own: only bf16 grads (2 B) and fp32 AdamW states (8 B) are
    # new, plus the input the weight gradient needs
    assert cost.params == params
    assert cost.train_bytes == params * (2 + 8) + 2 * TOKENS * 384
    assert cost.unmerged_flops == cost.latency_flops == 0
    assert cost.adapter_bytes == params * 2


def test_none_costs_nothing():
    cost = plan_cost(GRAPH, pp.Plan(sites={"q": {"method": "none"}}))
    assert (cost.params, cost.train_bytes, cost.unmerged_flops, cost.adapter_bytes, cost.sites) == (0, 0, 0, 0, {})
    assert cost.base_flops == 2 * (2 * TOKENS * 384 * 384)


def test_unmergeable_sites_keep_their_overhead():
    if "adapter" not in methods():
        pytest.skip("the adapter method is not registered")
    cost = plan_cost(
        GRAPH, pp.Plan(sites={"q": {"method": "adapter", "bottleneck": 4}, "v": {"method": "lora", "rank": 2}})
    )
    assert cost.latency_flops == cost.sites["q"].unmerged_flops > 0
    assert cost.sites["v"].latency_flops == 0


def test_latency_is_predicted_time_flops_and_kernels_by_hand():
    if "adapter" not in methods():
        pytest.skip("the adapter method is not registered")
    machine = Machine(flops_per_second=1e9, seconds_per_kernel=1e-4)
    plan = pp.Plan(sites={"q": {"method": "adapter", "bottleneck": 4}, "v": {"method": "lora", "rank": 2}})
    cost = plan_cost(GRAPH, plan, machine=machine)
    adapter_flops = 2 * TOKENS * 4 * (384 + 384)  # down and up
    lora_flops = 2 * TOKENS * 2 * (384 + 384)
    base_seconds = 2 * (2 * TOKENS * 384 * 384) / 1e9 + 2 * 1e-4  # uncounted graph: a kernel per site call
    # adapter: down, relu, up, sum; LoRA: A, B, scaling, sum; only the adapter stays after merge
    assert (cost.unmerged_ops, cost.latency_ops, cost.base_ops) == (8, 4, 2)
    assert cost.latency_fraction == pytest.approx((adapter_flops / 1e9 + 4e-4) / base_seconds)
    assert cost.unmerged_latency_fraction == pytest.approx(((adapter_flops + lora_flops) / 1e9 + 8e-4) / base_seconds)
    # the FLOPs ratio alone says 1.04% for the adapter; its kernels make it 3.1% on this machine
    assert cost.latency_flops / cost.base_flops == pytest.approx(0.0104, abs=1e-4)
    assert cost.latency_fraction == pytest.approx(0.0313, abs=1e-3)


def test_kernels_per_call_do_not_grow_with_the_batch():
    graph = pp.lower(
        torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)), torch.randn(1, 64)
    )
    assert graph.kernels == 3  # addmm, relu, addmm
    plan = pp.Plan(sites={"0": {"method": "adapter", "bottleneck": 4}})
    small, large = (plan_cost(graph, plan, batch_shape=(b, 1)) for b in (1, 4096))
    assert small.latency_ops == large.latency_ops == 4
    assert small.latency_fraction > 10 * large.latency_fraction  # per-call cost dominates small batches


def test_unknown_site_is_an_error():
    with pytest.raises(pp.PlanError, match="not in this graph"):
        plan_cost(GRAPH, pp.Plan(sites={"k": {"method": "lora", "rank": 8}}))


def test_lowered_model_by_hand(tiny_bert_graph):
    # tiny BERT: hidden 32, lowered on one 16-token sequence; LoRA r=2 on the 2 query layers
    queries = [s.name for s in tiny_bert_graph.select(role="attn.q")]
    cost = plan_cost(tiny_bert_graph, pp.Plan(sites={n: {"method": "lora", "rank": 2} for n in queries}))
    assert len(queries) == 2
    assert cost.params == 2 * 2 * (32 + 32)
    assert cost.train_bytes == 2 * (2 * 64 * 16 + 4 * 16 * (32 + 2))
    assert cost.unmerged_flops == 2 * (2 * 16 * 2 * 64)


def mixed_plan(graph):
    """Every registered method that suits a linear site once, LoRA on the rest, the head full."""
    linears = [s.name for s in graph.select(op="linear") if s.role != "head"]
    examples = [
        (name, m.example) for name, m in sorted(methods().items()) if "linear" in m.ops and name not in ("none", "full")
    ]
    sites = {n: {"method": "lora", "rank": 2} for n in linears}
    for (name, example), site in zip(examples, linears):
        sites[site] = {"method": name, **example}
    head = [s.name for s in graph.select(role="head")]
    sites.update({n: {"method": "full"} for n in head})
    return pp.Plan(sites=sites, model={"fingerprint": graph.fingerprint})


def test_params_and_adapter_bytes_match_the_applied_model(tiny_bert, tiny_bert_graph, tmp_path):
    plan = mixed_plan(tiny_bert_graph)
    cost = plan_cost(tiny_bert_graph, plan)
    model = pp.apply(copy.deepcopy(tiny_bert), plan)
    assert cost.params == count_trainable(model)
    pp.save(model, tmp_path)
    raw = (tmp_path / "adapters.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    tensors = {k: v for k, v in json.loads(raw[8 : 8 + header_len]).items() if k != "__metadata__"}
    stored = sum(end - start for start, end in (v["data_offsets"] for v in tensors.values()))
    per_site = {
        n: sum(e - s for k, v in tensors.items() if k.startswith(n + ".") for s, e in [v["data_offsets"]])
        for n in cost.sites
    }
    assert len(raw) == 8 + header_len + stored
    # every method's adapter_bytes is what it actually writes (a sparse delta's indices too)
    for name, c in cost.sites.items():
        assert c.adapter_bytes == per_site[name], name


def test_tied_weights_trained_in_full_count_once():
    model = TiedLM()
    graph = pp.lower(model)
    assert graph["lm_head"].tied == ("embed",)
    plan = pp.Plan(
        sites={"embed": {"method": "full"}, "lm_head": {"method": "full"}}, model={"fingerprint": graph.fingerprint}
    )
    cost = plan_cost(graph, plan)
    assert cost.params == count_trainable(pp.apply(model, plan)) == 50 * 16


def test_frozen_activations_scale_with_batch_and_start_at_the_first_tuned_site(tiny_bert, tiny_bert_graph):
    graph = tiny_bert_graph
    layers = [s.name for s in graph.select(role="attn.q")]
    one = pp.Plan(sites={layers[-1]: {"method": "lora", "rank": 2}})
    both = pp.Plan(sites={n: {"method": "lora", "rank": 2} for n in layers})
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (1, 24))
    a = train_memory_estimate(tiny_bert, graph, one, batch=1, seq_len=24, example_inputs={"input_ids": ids})
    b = train_memory_estimate(tiny_bert, graph, one, batch=3, seq_len=24, example_inputs={"input_ids": ids})
    c = train_memory_estimate(tiny_bert, graph, both, batch=1, seq_len=24, example_inputs={"input_ids": ids})
    assert b.frozen_activations == 3 * a.frozen_activations > 0
    assert c.frozen_activations > a.frozen_activations  # gradients flow through layer 0 as well
    assert a.base_weights == graph.total_params * 4
    assert b.plan.train_bytes - a.plan.train_bytes == 4 * 2 * 24 * (32 + 2)  # LoRA's saved elements
    assert train_memory_estimate(tiny_bert, graph, pp.Plan(sites={}), batch=2, seq_len=8).frozen_activations == 0


def test_estimate_matches_what_autograd_saves_in_the_tuned_model(tiny_bert, tiny_bert_graph):
    # LoRA on the queries only: nothing else saves a query's input, so the estimate's
    # activations (measured frozen part + LoRA's modelled part) are exactly what the applied
    # model saves
    plan = pp.Plan(sites={s.name: {"method": "lora", "rank": 2} for s in tiny_bert_graph.select(role="attn.q")})
    ids = {"input_ids": torch.randint(0, 100, (1, 24))}
    est = train_memory_estimate(tiny_bert, tiny_bert_graph, plan, batch=1, seq_len=24, example_inputs=ids)
    model = pp.apply(copy.deepcopy(tiny_bert), plan).train()
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in owned:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**ids)
    measured = sum(storages.values())
    lora_params = sum(c.params for c in est.plan.sites.values())
    modelled = est.frozen_activations + est.plan.train_bytes - lora_params * 16
    assert modelled == measured


def test_estimate_refuses_a_tuned_model(tiny_bert_graph):
    model = TiedLM()
    pp.apply(model, pp.Plan(sites={"mix": {"method": "lora", "rank": 2}}), check=False)
    with pytest.raises(pp.PlanError, match="before apply"):
        train_memory_estimate(model, tiny_bert_graph, pp.Plan(sites={}), batch=1, seq_len=4)

"""MoE-LoRA against a per-token hand computation (router, top-k, gated experts), the Switch
balancing loss by hand, merge only with one expert; and a mixed plan (lora + adapter + sparse +
moe_lora) on one BERT that trains, saves, loads and merges."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from peftplan.backends import (
    PlanError,
    apply,
    aux_loss,
    get_method,
    load,
    merge,
    save,
    trainable_parameters,
    unmerge,
)
from peftplan.backends.moe_lora import MoELoRALinear
from peftplan.ir.modules import module_op, static_site
from tests.backends.adapters import frozen, plan_for
from tests.backends.references import matmul_flops
from tests.zoo import bert_eager, token_ids

moe = get_method("moe_lora")
KINDS = {"linear": lambda: nn.Linear(12, 7), "conv1d_hf": lambda: Conv1D(7, 12)}


def _case(kind: str = "linear", **hp) -> tuple[nn.Module, MoELoRALinear, torch.Tensor]:
    torch.manual_seed(0)
    base = KINDS[kind]()
    site = static_site("m", base, module_op(base))
    layer = moe.wrap(frozen(base), site, **moe.validate(site, **{"experts": 4, "rank": 2, **hp}))
    return base, layer, torch.randn(3, 5, 12)


def _reference(base: nn.Module, layer: MoELoRALinear, x: torch.Tensor) -> torch.Tensor:
    """Token by token: softmax router, the top_k experts, each ``p_e · B_e A_e x · scaling``."""
    r, out = layer.rank, base(x).reshape(-1, 7).clone()
    for t, xt in enumerate(x.reshape(-1, 12)):
        p = torch.softmax(layer.router.weight @ xt, -1)
        for e in p.argsort(descending=True)[: layer.top_k].tolist():
            a, b = layer.lora_A[e * r : (e + 1) * r], layer.lora_B[:, e * r : (e + 1) * r]
            out[t] += p[e] * (b @ (a @ xt)) * layer.scaling
    return out.reshape(3, 5, 7)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_identity_at_init_then_matches_reference(kind, top_k):
    base, layer, x = _case(kind, top_k=top_k)
    assert torch.equal(layer(x), base(x))
    with torch.no_grad():
        layer.lora_B.normal_()
    torch.testing.assert_close(layer(x), _reference(base, layer, x), atol=1e-5, rtol=1e-5)


def test_balance_loss_by_hand_and_summed_over_sites():
    _, layer, x = _case(top_k=2)
    assert layer.aux_loss() is None  # before any forward
    layer(x)
    probs = torch.softmax(x.reshape(-1, 12) @ layer.router.weight.T, -1)  # (15, 4)
    routed = torch.zeros_like(probs).scatter(-1, probs.topk(2, -1).indices, 1.0)
    expected = 4 * (routed.mean(0) / 2 * probs.mean(0)).sum()
    torch.testing.assert_close(layer.aux_loss(), expected)
    assert copy.deepcopy(layer).aux_loss() is None  # a copy drops the last loss and its graph
    layer.aux_loss().backward()
    assert layer.router.weight.grad.abs().sum() > 0  # the router learns to balance
    model = nn.Sequential(layer, nn.ReLU(), MoELoRALinear(nn.Linear(7, 7), 3, 2, 4.0))
    model(x)
    torch.testing.assert_close(aux_loss(model), layer.aux_loss() + model[2].aux_loss())
    with torch.no_grad():  # a balanced router: uniform probabilities, every expert chosen
        layer.router.weight.zero_()
    layer.top_k = 4
    layer(x)
    torch.testing.assert_close(layer.aux_loss(), torch.tensor(1.0))


def test_one_expert_merges_as_lora_and_several_are_left_with_a_reason():
    base, layer, x = _case("conv1d_hf", experts=1)
    with torch.no_grad():
        layer.lora_B.normal_()
    unmerged, original = layer(x), base.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(base(x), unmerged, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(base.weight, original, atol=1e-6, rtol=0)
    _, several, _ = _case(experts=3)
    with pytest.raises(RuntimeError, match="3 experts"):
        several.merge()
    assert "only experts=1" in moe.can_merge(static_site("m", nn.Linear(2, 2), "linear"), experts=3, rank=2)


@pytest.mark.parametrize("kind", KINDS)
def test_param_count_is_exact(kind):
    base, layer, _ = _case(kind, experts=3, rank=2)
    site = static_site("m", base, "linear")
    trainable = {n: p.numel() for n, p in layer.named_parameters() if p.requires_grad}
    assert set(trainable) == {"lora_A", "lora_B", "router.weight"}
    assert sum(trainable.values()) == moe.param_count(site, experts=3, rank=2) == 3 * 2 * (12 + 7) + 12 * 3


@pytest.mark.parametrize("top_k", [1, 3])
def test_overhead_flops_match_flop_counter(top_k):
    base, layer, _ = _case(top_k=top_k)
    x = torch.randn(3, 5, 12, requires_grad=True)
    site = static_site("m", base, "linear", out_shape=(3, 5, 7))  # tokens = 15
    hp = {"experts": 4, "rank": 2, "top_k": top_k}
    assert matmul_flops(layer, x) - matmul_flops(base, x) == moe.overhead_flops(site, **hp)


@pytest.mark.parametrize(
    "hp, word",
    [
        ({"experts": 2, "rank": 2, "top_k": 3}, "exceeds"),
        ({"experts": 0, "rank": 2}, "experts"),
        ({"experts": 2, "rank": 0}, "rank"),
        ({"experts": 2, "rank": 2, "alpha": -1}, "alpha"),
        ({"experts": 2, "rank": 2, "top_k": 0}, "top_k"),
        ({"experts": 2}, "needs"),
    ],
)
def test_bad_hyper_parameters_are_plan_errors(hp, word):
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(PlanError, match=word):
        apply(model, plan_for(model, {"0": {"method": "moe_lora", **hp}}))
    assert type(model[0]) is nn.Linear


def test_bf16_and_meta():
    base, layer, x = _case(top_k=2)
    layer = layer.to(torch.bfloat16)
    assert layer(x.bfloat16()).dtype == torch.bfloat16 and torch.isfinite(layer.aux_loss())
    meta = nn.Linear(12, 7, device="meta")
    wrapped = moe.wrap(meta, static_site("m", meta, "linear"), experts=3, rank=2)
    assert all(p.is_meta for p in wrapped.parameters())
    assert wrapped(x.to("meta")).shape == (3, 5, 7)


def test_mixed_plan_trains_saves_loads_and_merges(tmp_path):
    model = bert_eager()
    fresh = copy.deepcopy(model)
    layer = "encoder.layer.{}.{}"
    sites = {
        layer.format(0, "attention.self.query"): {"method": "lora", "rank": 2},
        layer.format(0, "attention.output.dense"): {"method": "adapter", "bottleneck": 4},
        layer.format(1, "attention.self.value"): {
            "method": "adapter",
            "bottleneck": 3,
            "placement": "parallel",
            "activation": "gelu",
        },
        layer.format(0, "intermediate.dense"): {"method": "sparse", "density": 0.05},
        layer.format(1, "intermediate.dense"): {"method": "sparse", "density": 0.02, "selection": "sensitivity"},
        layer.format(1, "output.dense"): {"method": "moe_lora", "experts": 3, "rank": 2, "top_k": 2},
        layer.format(0, "output.dense"): {"method": "moe_lora", "experts": 1, "rank": 2},
    }
    scored = layer.format(1, "intermediate.dense")
    scores = {scored: torch.rand(37, 32, generator=torch.Generator().manual_seed(5))}
    apply(model, plan_for(model, sites), scores=scores)
    opt = torch.optim.AdamW(trainable_parameters(model).values(), lr=1e-2)
    weights = {n: p.detach().clone() for n, p in trainable_parameters(model).items()}
    for _ in range(3):
        loss = model(token_ids()).last_hidden_state.pow(2).mean() + 0.01 * aux_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(not torch.equal(p, weights[n]) for n, p in trainable_parameters(model).items())
    model.eval()
    with torch.no_grad():
        expected = model(token_ids()).last_hidden_state
    save(model, tmp_path)
    loaded = load(fresh, tmp_path)  # no scores: the sensitivity indices come from the file
    with torch.no_grad():
        assert torch.equal(loaded(token_ids()).last_hidden_state, expected)
        report = merge(model)
        torch.testing.assert_close(model(token_ids()).last_hidden_state, expected, atol=1e-5, rtol=1e-5)
    left = {
        layer.format(0, "attention.output.dense"),
        layer.format(1, "attention.self.value"),
        layer.format(1, "output.dense"),
    }
    assert set(report.left) == left and set(report.merged) == set(sites) - left
    unmerge(model)

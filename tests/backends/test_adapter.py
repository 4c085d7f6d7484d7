"""Bottleneck adapters against a hand computation of ``y + up(act(down(source)))``, serial and
parallel, on nn.Linear and HF Conv1D; FLOPs against torch's flop counter (saved activations:
test_contract.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from peftplan.backends import PlanError, apply, get_method, merge
from peftplan.backends.adapter import ACTIVATIONS, BottleneckAdapter
from peftplan.ir.modules import module_op, static_site
from tests.backends.adapters import frozen, plan_for
from tests.backends.references import matmul_flops

adapter = get_method("adapter")
ACTS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}  # the reference's own table
KINDS = {"linear": lambda: nn.Linear(12, 7), "conv1d_hf": lambda: Conv1D(7, 12)}  # both 12 -> 7


def _case(kind: str, **hp) -> tuple[nn.Module, BottleneckAdapter, torch.Tensor]:
    torch.manual_seed(0)
    base = KINDS[kind]()
    site = static_site("m", base, module_op(base))
    layer = adapter.wrap(frozen(base), site, **adapter.validate(site, **hp))
    return base, layer, torch.randn(3, 5, 12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("placement", ["serial", "parallel"])
@pytest.mark.parametrize("activation", sorted(ACTS))
def test_identity_at_init_then_matches_reference(kind, placement, activation):
    base, layer, x = _case(kind, bottleneck=3, placement=placement, activation=activation)
    assert torch.equal(layer(x), base(x))
    with torch.no_grad():
        layer.up.weight.normal_()
        layer.up.bias.normal_()
    y = base(x)
    source = y if placement == "serial" else x
    down, up = layer.down, layer.up
    expected = y + ACTS[activation](source @ down.weight.T + down.bias) @ up.weight.T + up.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    assert set(ACTIVATIONS) == set(ACTS)


@pytest.mark.parametrize("placement", ["serial", "parallel"])
def test_param_count_is_exact_and_only_adapter_trains(placement):
    base, layer, x = _case("conv1d_hf", bottleneck=4, placement=placement)
    site = static_site("m", base, "linear")
    trainable = {n: p.numel() for n, p in layer.named_parameters() if p.requires_grad}
    assert set(trainable) == {"down.weight", "down.bias", "up.weight", "up.bias"}
    d = 7 if placement == "serial" else 12
    assert (
        sum(trainable.values()) == adapter.param_count(site, bottleneck=4, placement=placement) == d * 4 + 4 + 4 * 7 + 7
    )
    layer(x).sum().backward()
    assert layer.up.weight.grad is not None and base.weight.grad is None


@pytest.mark.parametrize("placement", ["serial", "parallel"])
def test_overhead_flops_match_flop_counter(placement):
    base, layer, x = _case("linear", bottleneck=3, placement=placement)
    site = static_site("m", base, "linear", out_shape=(3, 5, 7))  # tokens = 15
    assert matmul_flops(layer, x) - matmul_flops(base, x) == adapter.overhead_flops(
        site, bottleneck=3, placement=placement
    )


def test_never_merges_and_says_why():
    _, layer, x = _case("linear", bottleneck=2)
    site = static_site("m", nn.Linear(12, 7), "linear")
    assert "nonlinear" in adapter.can_merge(site, bottleneck=2)
    with pytest.raises(RuntimeError, match="nonlinear"):
        layer.merge()
    layer.unmerge()  # a no-op, as remove() calls it on every site
    model = nn.Sequential(nn.Linear(12, 7))
    apply(model, plan_for(model, {"0": {"method": "adapter", "bottleneck": 2}}))
    report = merge(model)
    assert report.merged == [] and "nonlinear" in report.left["0"]


@pytest.mark.parametrize(
    "hp, word",
    [
        ({"bottleneck": 0}, "positive int"),
        ({"bottleneck": 2.0}, "positive int"),
        ({"bottleneck": True}, "positive int"),
        ({}, "needs"),
        ({"bottleneck": 2, "placement": "sideways"}, "placement"),
        ({"bottleneck": 2, "activation": "softmax"}, "activation"),
        ({"bottleneck": 2, "rank": 2}, "no hyper-parameter"),
    ],
)
def test_bad_hyper_parameters_are_plan_errors_before_touching(hp, word):
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(PlanError, match=word):
        apply(model, plan_for(model, {"0": {"method": "adapter", **hp}}))
    assert type(model[0]) is nn.Linear and model[0].weight.requires_grad


def test_bf16_and_meta():
    base, layer, x = _case("linear", bottleneck=3, activation="gelu")
    layer = layer.to(torch.bfloat16)
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    meta = nn.Linear(12, 7, device="meta")
    wrapped = adapter.wrap(meta, static_site("m", meta, "linear"), bottleneck=3)
    assert all(p.is_meta for p in wrapped.parameters())
    assert wrapped(x.to("meta")).shape == (3, 5, 7)

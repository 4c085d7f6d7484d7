"""SSF against the hand computation ``base(x) * scale + shift`` on every op it tunes, merge round
trips (bias-less layers gain a bias while merged and lose it after; bias-less norms refuse),
whole models, bf16, the meta device and exact costs (saved activations: test_contract.py)."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode
from transformers.pytorch_utils import Conv1D

from peftplan.backends import PlanError, adapter_tensors, apply, get_method, merge, remove, unmerge
from peftplan.ir.modules import module_op, static_site, tunable_modules
from tests.backends.adapters import frozen, plan_for, snapshot
from tests.zoo import bert_eager, llama_eager, token_ids


def _cases() -> dict[str, tuple[nn.Module, torch.Tensor, int]]:
    """name -> (module, input, channel axis of the output)"""
    torch.manual_seed(0)
    return {
        "linear": (nn.Linear(12, 7), torch.randn(3, 5, 12), -1),
        "linear_no_bias": (nn.Linear(12, 7, bias=False), torch.randn(3, 5, 12), -1),
        "conv1d_hf": (Conv1D(7, 12), torch.randn(3, 5, 12), -1),
        "conv2d": (nn.Conv2d(4, 6, 3, stride=2, padding=1), torch.randn(2, 4, 7, 7), 1),
        "conv2d_no_bias": (nn.Conv2d(4, 6, 3, groups=2, bias=False), torch.randn(2, 4, 7, 7), 1),
        "embedding": (nn.Embedding(20, 8, padding_idx=0), torch.randint(0, 20, (3, 5)), -1),
        "layernorm": (nn.LayerNorm(8), torch.randn(3, 5, 8), -1),
        "groupnorm": (nn.GroupNorm(2, 6), torch.randn(2, 6, 4, 4), 1),
        "rmsnorm": (nn.RMSNorm(8), torch.randn(3, 5, 8), -1),
    }


CASES = list(_cases())
MERGEABLE = [c for c in CASES if c != "rmsnorm"]


def _wrap(module: nn.Module) -> nn.Module:
    site = static_site("m", module, module_op(module))
    ssf = get_method("ssf")
    return ssf.wrap(module, site, **ssf.validate(site))


def _randomize(layer: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.scale.add_(torch.randn(layer.scale.shape, generator=g).to(layer.scale.dtype) * 0.3)
        layer.shift.add_(torch.randn(layer.shift.shape, generator=g).to(layer.shift.dtype) * 0.3)
    return layer


@pytest.mark.parametrize("case", CASES)
def test_identity_at_init_and_hand_computation(case):
    module, x, channel = _cases()[case]
    expected = module(x)
    layer = _wrap(module)
    assert torch.equal(layer(x), expected)
    _randomize(layer)
    shape = [1] * expected.dim()
    shape[channel] = -1
    by_hand = expected * layer.scale.view(shape) + layer.shift.view(shape)
    torch.testing.assert_close(layer(x), by_hand)


@pytest.mark.parametrize("case", MERGEABLE)
def test_merge_equals_unmerged_and_unmerge_restores(case):
    module, x, _ = _cases()[case]
    original = snapshot(module)
    layer = _randomize(_wrap(module))
    unmerged = layer(x)
    layer.merge()
    layer.merge()  # no-op
    assert layer.merged
    torch.testing.assert_close(module(x), unmerged, atol=1e-5, rtol=1e-5)  # it is all in the base now
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)
    if case.endswith("no_bias"):
        assert module.bias is not None and not module.bias.requires_grad
    layer.unmerge()
    restored = snapshot(module)
    assert restored.keys() == original.keys()  # a bias made for the merge is gone again
    for k in original:
        torch.testing.assert_close(restored[k], original[k], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)


def test_norm_without_bias_refuses_to_merge():
    ssf = get_method("ssf")
    module, x, _ = _cases()["rmsnorm"]
    assert "cannot be merged" in ssf.can_merge(static_site("n", module, "norm"))
    assert "cannot be merged" in ssf.can_merge(static_site("n", nn.LayerNorm(8, bias=False), "norm"))
    assert ssf.can_merge(static_site("n", nn.LayerNorm(8), "norm")) is None
    with pytest.raises(ValueError, match="cannot merge"):
        _wrap(module).merge()


class LayerNorm(nn.Module):
    """A look-alike named like torch's norm, as many model repos define one: what it does with
    its weight is its own business, so SSF must not fold into it."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(n)), nn.Parameter(torch.zeros(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.layer_norm(x, x.shape[-1:]) * (1 + self.weight) + self.bias


class ChannelsFirstLayerNorm(nn.LayerNorm):
    """A torch LayerNorm under another name (vision models' ``LayerNorm2d``): it merges."""


def test_mergeability_is_decided_by_the_method_alone():
    ssf = get_method("ssf")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), LayerNorm(8), nn.Linear(8, 8), ChannelsFirstLayerNorm(8)).eval()
    assert [module_op(m) for m in model] == ["linear", "norm", "linear", "norm"]
    apply(model, plan_for(model, {n: {"method": "ssf"} for n in ("0", "1", "2", "3")}))
    x = torch.randn(3, 8)
    with torch.no_grad():
        for t in adapter_tensors(model).values():
            t.add_(torch.randn(t.shape) * 0.1)
        unmerged = model(x)
        report = merge(model)  # the look-alike is left, not a ValueError half-way through
        merged = model(x)
    for name in ("1", "3"):
        site = static_site(name, model.get_submodule(name).base, "norm")
        assert (name in report.left) == (ssf.can_merge(site) is not None), str(report)
    assert report.merged == ["0", "2", "3"] and list(report.left) == ["1"], str(report)
    assert "cannot be merged" in report.left["1"]
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cannot be merged"):
        model.get_submodule("1").merge()  # the layer asks the method too


def test_whole_models_merge_where_they_can():
    for make, out in ((bert_eager, lambda o: o.last_hidden_state), (llama_eager, lambda o: o.logits)):
        model = make()
        before = snapshot(model)
        entries = {n: {"method": "ssf"} for n, _, op in tunable_modules(model) if op in get_method("ssf").ops}
        apply(model, plan_for(model, entries))
        with torch.no_grad():
            for t in adapter_tensors(model).values():
                t.add_(torch.randn(t.shape) * 0.1)
            unmerged = out(model(token_ids()))
            report = merge(model)
            torch.testing.assert_close(out(model(token_ids())), unmerged, atol=1e-5, rtol=1e-5)
        norms = {n for n in entries if module_op(model.get_submodule(n).base) == "norm"}
        if make is llama_eager:  # RMSNorms have nowhere to put the shift
            assert set(report.left) == norms and norms
        else:
            assert not report.left
        unmerge(model)
        after = snapshot(remove(model))
        assert after.keys() == before.keys()
        for k in before:
            torch.testing.assert_close(after[k], before[k], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_bf16_and_meta(case):
    module, x, _ = _cases()[case]
    xb = x if x.dtype == torch.long else x.to(torch.bfloat16)
    bf16 = _wrap(copy.deepcopy(module).to(torch.bfloat16))
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert torch.equal(bf16(xb), bf16.base(xb))
    unmerged = _randomize(bf16)(xb)
    if case != "rmsnorm":
        bf16.merge()
        assert bf16(xb).dtype == torch.bfloat16
        torch.testing.assert_close(bf16(xb), unmerged, atol=0.1, rtol=0.05)

    meta = _wrap(module.to("meta"))
    assert all(t.is_meta for t in meta.parameters())
    assert meta(x.to("meta")).is_meta
    if case != "rmsnorm":
        meta.merge()
        meta.unmerge()


@pytest.mark.parametrize("case", CASES)
def test_costs_are_exact(case):
    module, x, _ = _cases()[case]
    if x.is_floating_point():
        x.requires_grad_(True)  # as inside a model
    ssf = get_method("ssf")
    y = module(x)
    site = replace(static_site("m", module, module_op(module)), out_shape=tuple(y.shape))
    channels = y.shape[1] if site.op == "conv2d" or isinstance(module, nn.GroupNorm) else y.shape[-1]
    layer = ssf.wrap(frozen(module), site)
    assert sum(p.numel() for p in layer.parameters() if p.requires_grad) == ssf.param_count(site) == 2 * channels
    with FlopCounterMode(display=False) as flops:
        layer(x)
    with FlopCounterMode(display=False) as base_flops:
        module(x)
    assert flops.get_total_flops() == base_flops.get_total_flops()  # no matmul: a multiply-add per output
    if not isinstance(module, nn.GroupNorm):  # Site.tokens reads a GroupNorm's (N, C, H, W) as tokens x C
        assert ssf.overhead_flops(site) == 2 * y.numel()


def test_bad_plans_are_plan_errors():
    ssf = get_method("ssf")
    with pytest.raises(PlanError, match="no hyper-parameter"):
        ssf.validate(static_site("fc", nn.Linear(4, 4), "linear"), rank=2)
    with pytest.raises(PlanError, match="tunes only"):
        ssf.validate(static_site("c", nn.Conv1d(4, 4, 3), "conv1d"))

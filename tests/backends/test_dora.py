"""DoRA against HF peft's ``LoraConfig(use_dora=True)`` as the reference (outputs, gradients,
merged weights, the dropout path), and its own properties: identity at init, merge round trips,
bf16, the meta device, exact params and FLOPs against the FLOP counter (saved activations:
test_contract.py)."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model
from torch.utils.flop_counter import FlopCounterMode
from transformers.pytorch_utils import Conv1D

from peftplan.backends import PlanError, apply, get_method
from peftplan.backends.dora import DoRAConv2d, DoRALinear
from peftplan.ir.modules import module_op, static_site
from tests.backends.adapters import frozen, perturb, plan_for
from tests.backends.references import (
    compare_dora_with_peft,
)
from tests.zoo import bert_eager, gpt2_eager, llama_eager, pointwise_cnn, token_ids

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_bert_equals_peft():
    entries = {}
    for i in range(2):
        p = f"encoder.layer.{i}"
        entries[f"{p}.attention.self.query"] = {"rank": 2 + i}
        entries[f"{p}.attention.self.value"] = {"rank": 4, "alpha": 3}
        entries[f"{p}.intermediate.dense"] = {"rank": 1 + 2 * i, "alpha": 5}
        entries[f"{p}.output.dense"] = {"rank": 2}
    compare_dora_with_peft(bert_eager(), entries, token_ids(), out=lambda o: o.last_hidden_state)


def test_llama_equals_peft():
    entries = {}
    for i in range(2):
        p = f"model.layers.{i}"
        for proj, r in (
            ("self_attn.q_proj", 4),
            ("self_attn.k_proj", 2),
            ("self_attn.o_proj", 1),
            ("mlp.down_proj", 3 + i),
        ):
            entries[f"{p}.{proj}"] = {"rank": r}
    entries["lm_head"] = {"rank": 2, "alpha": 7}
    compare_dora_with_peft(llama_eager(), entries, token_ids(), out=lambda o: o.logits)


def test_gpt2_conv1d_and_cnn_equal_peft():
    entries = {f"transformer.h.{i}.{m}": {"rank": 2 + i} for i in range(2) for m in ("attn.c_attn", "mlp.c_proj")}
    compare_dora_with_peft(gpt2_eager(), entries, token_ids(), out=lambda o: o.logits)
    compare_dora_with_peft(
        pointwise_cnn(),
        {"stem": {"rank": 2}, "body": {"rank": 3, "alpha": 1}, "point": {"rank": 2}},
        torch.randn(2, 3, 11, 11, generator=torch.Generator().manual_seed(0)),
    )


def test_dropout_path_equals_peft_in_training():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    twin = copy.deepcopy(model)
    ours = apply(model, plan_for(model, {"0": {"method": "dora", "rank": 2, "dropout": 0.5}}))
    perturb(ours)
    config = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.5, target_modules=["0"], use_dora=True)
    theirs = get_peft_model(twin, config)
    with torch.no_grad():
        other = theirs.base_model.model[0]
        other.lora_A["default"].weight.copy_(ours[0].lora_A)
        other.lora_B["default"].weight.copy_(ours[0].lora_B)
        other.lora_magnitude_vector["default"].weight.copy_(ours[0].magnitude)
    ours.train(), theirs.train()
    x = torch.randn(4, 6)
    torch.manual_seed(1)
    got = ours(x)
    torch.manual_seed(1)
    torch.testing.assert_close(got, theirs(x), atol=1e-6, rtol=1e-6)
    ours.eval()
    assert not torch.allclose(ours(x), got)  # the dropout was active


def _layers():
    torch.manual_seed(0)
    return {
        "linear": (nn.Linear(12, 7), torch.randn(3, 5, 12)),
        "linear_no_bias": (nn.Linear(12, 7, bias=False), torch.randn(3, 5, 12)),
        "conv1d_hf": (Conv1D(7, 12), torch.randn(3, 5, 12)),
        "conv2d": (nn.Conv2d(4, 6, 3, padding=1), torch.randn(2, 4, 6, 6)),
    }


def _wrap(module: nn.Module, **hp) -> nn.Module:
    site = static_site("m", module, module_op(module))
    dora = get_method("dora")
    return dora.wrap(module, site, **dora.validate(site, **{"rank": 3, **hp}))


def _randomize(layer: nn.Module) -> nn.Module:
    with torch.no_grad():
        layer.lora_B.normal_(std=0.2)
        layer.magnitude.mul_(1 + 0.3 * torch.randn(layer.magnitude.shape))
    return layer


@pytest.mark.parametrize("case", list(_layers()))
def test_identity_at_init_and_magnitude_is_column_norm(case):
    module, x = _layers()[case]
    expected = module(x)
    layer = _wrap(module)
    assert torch.equal(layer(x), expected)
    rows = module.weight.T if case == "conv1d_hf" else module.weight  # (out, ...)
    torch.testing.assert_close(layer.magnitude, rows.flatten(1).norm(dim=1))


@pytest.mark.parametrize("case", list(_layers()))
def test_matches_hand_written_formula(case):
    module, x = _layers()[case]
    layer = _randomize(_wrap(module, rslora=True))
    with torch.no_grad():
        w = module.weight + layer.delta_weight()  # layout of module.weight
        rows = w.T if case == "conv1d_hf" else w  # (out, ...)
        factor = layer.magnitude / rows.flatten(1).norm(dim=1)
        tuned = copy.deepcopy(module)
        tuned.weight.copy_(w * (factor if case == "conv1d_hf" else factor.view(-1, *[1] * (w.dim() - 1))))
    torch.testing.assert_close(layer(x), tuned(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", list(_layers()))
def test_merge_equals_unmerged_and_unmerge_restores(case):
    module, x = _layers()[case]
    layer = _randomize(_wrap(module))
    original = module.weight.detach().clone()
    unmerged = layer(x)
    layer.merge()
    layer.merge()  # no-op
    assert layer.merged and not torch.allclose(module.weight, original)
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(module.weight, original, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", list(_layers()))
def test_bf16_and_meta(case):
    module, x = _layers()[case]
    bf16 = _wrap(copy.deepcopy(module).to(torch.bfloat16))
    xb = x.to(torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert torch.equal(bf16(xb), bf16.base(xb))
    unmerged = _randomize(bf16)(xb)
    bf16.merge()
    assert bf16(xb).dtype == torch.bfloat16
    torch.testing.assert_close(bf16(xb), unmerged, atol=0.1, rtol=0.05)

    meta = _wrap(module.to("meta"))
    assert all(t.is_meta for t in meta.parameters())
    assert meta(x.to("meta")).is_meta
    meta.merge()
    meta.unmerge()


@pytest.mark.parametrize(
    "case, hp",
    [
        ("linear", {}),
        ("linear", {"dropout": 0.1}),
        ("conv1d_hf", {}),
        ("conv2d", {}),
        ("linear_no_bias", {"dropout": 0.2}),
    ],
)
def test_costs_are_exact(case, hp):
    module, x = _layers()[case]
    x.requires_grad_(True)  # as inside a model
    dora = get_method("dora")
    site = static_site("m", module, module_op(module))
    y = module(x)
    site = replace(site, out_shape=tuple(y.shape))
    tokens = site.tokens
    full = dora.validate(site, rank=3, **hp)
    with FlopCounterMode(display=False) as base_flops:
        module(x)
    layer = dora.wrap(frozen(module), site, **full)  # training mode: dropout active
    assert sum(p.numel() for p in layer.parameters() if p.requires_grad) == dora.param_count(site, **full)
    with FlopCounterMode(display=False) as flops:
        layer.eval()(x)
    # the FLOP counter sees the matmuls: LoRA's path and B·A; the rest is element-wise
    weight = site.in_features * site.out_features * (9 if case == "conv2d" else 1)
    elementwise = 4 * weight + 3 * tokens * site.out_features
    matmuls = flops.get_total_flops() - base_flops.get_total_flops()
    assert matmuls == get_method("lora").overhead_flops(site, rank=3) + 2 * 3 * weight
    assert dora.overhead_flops(site, **full) == matmuls + elementwise


def test_bad_hyper_parameters_are_plan_errors():
    dora = get_method("dora")
    fc = static_site("fc", nn.Linear(4, 4), "linear")
    for hp in (
        {},
        {"rank": 0},
        {"rank": 2.5},
        {"rank": 2, "alpha": -1},
        {"rank": 2, "dropout": 1.0},
        {"rank": 2, "rslora": "yes"},
        {"rank": 2, "scale": 1},
    ):
        with pytest.raises(PlanError):
            dora.validate(fc, **hp)
    with pytest.raises(PlanError, match="tunes only"):
        dora.validate(static_site("e", nn.Embedding(9, 4), "embedding"), rank=2)
    with pytest.raises(PlanError, match="groups"):
        dora.validate(static_site("c", nn.Conv2d(4, 4, 3, groups=2), "conv2d"), rank=2)


def test_layers_have_peft_shapes():
    layer = DoRALinear(Conv1D(7, 12), rank=3, alpha=6)
    assert (layer.lora_A.shape, layer.lora_B.shape, layer.magnitude.shape) == ((3, 12), (7, 3), (7,))
    conv = DoRAConv2d(nn.Conv2d(4, 6, 3), rank=3, alpha=6)
    assert (conv.lora_A.shape, conv.lora_B.shape, conv.magnitude.shape) == ((3, 4, 3, 3), (6, 3, 1, 1), (6,))

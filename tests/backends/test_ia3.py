"""(IA)³ against HF peft's ``IA3Config`` as the reference (outputs, gradients, merged weights;
output scaling, and input scaling on peft's ``feedforward_modules``), the ``auto`` placement by
role, merge round trips (grouped convolutions too), bf16, the meta device and exact costs."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
from peft import IA3Config, get_peft_model
from transformers.pytorch_utils import Conv1D

from peftplan.backends import PlanError, adapter_tensors, apply, get_method, merge
from peftplan.backends.ia3 import InputScale
from peftplan.backends.ssf import ScaleShift
from peftplan.ir.modules import module_op, static_site
from tests.backends.adapters import frozen, plan_for
from tests.backends.references import assert_matches_reference
from tests.zoo import bert_eager, gpt2_eager, llama_eager, pointwise_cnn, token_ids

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _compare(model: nn.Module, entries: dict[str, dict], feedforward: list[str], inputs, out=lambda o: o) -> None:
    """``entries`` are plan entries (placement or role); ``feedforward`` the sites peft scales at the input."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        base = out(model(inputs))
    ours = apply(model, plan_for(model, {n: {"method": "ia3", **e} for n, e in entries.items()}))
    with torch.no_grad():
        for t in adapter_tensors(ours).values():
            t.add_(torch.randn(t.shape, generator=torch.Generator().manual_seed(0)) * 0.3)
    theirs = get_peft_model(twin, IA3Config(target_modules=list(entries), feedforward_modules=feedforward))
    pairs = []
    with torch.no_grad():
        for name in entries:
            mine, other = ours.get_submodule(name), theirs.base_model.model.get_submodule(name)
            assert isinstance(mine, InputScale) == (name in feedforward)
            other.ia3_l["default"].copy_(mine.scale.view_as(other.ia3_l["default"]))
            pairs.append((mine.scale, other.ia3_l["default"]))

    got = out(ours(inputs))
    assert_matches_reference(got, out(theirs(inputs)), base, pairs)

    with torch.no_grad():
        merge(ours)
        theirs.merge_adapter()
        torch.testing.assert_close(out(ours(inputs)), got, atol=1e-5, rtol=1e-5)
        for name in entries:
            mine, other = ours.get_submodule(name).base, theirs.base_model.model.get_submodule(name).base_layer
            torch.testing.assert_close(mine.weight, other.weight, atol=1e-6, rtol=1e-5)
            if mine.bias is not None:
                torch.testing.assert_close(mine.bias, other.bias, atol=1e-6, rtol=1e-5)


def test_bert_equals_peft():
    entries, feedforward = {}, []
    for i in range(2):
        p = f"encoder.layer.{i}"
        entries[f"{p}.attention.self.key"] = {"placement": "output"}
        entries[f"{p}.attention.self.value"] = {}  # auto, role other: output
        entries[f"{p}.intermediate.dense"] = {"role": "mlp.up"}
        entries[f"{p}.output.dense"] = {"role": "mlp.down"}  # auto: input, as peft's feedforward_modules
        feedforward.append(f"{p}.output.dense")
    _compare(bert_eager(), entries, feedforward, token_ids(), out=lambda o: o.last_hidden_state)


def test_llama_equals_peft():
    entries, feedforward = {}, []
    for i in range(2):
        p = f"model.layers.{i}"
        entries[f"{p}.self_attn.k_proj"] = {}
        entries[f"{p}.self_attn.v_proj"] = {"placement": "output"}
        entries[f"{p}.mlp.up_proj"] = {"placement": "input"}
        entries[f"{p}.mlp.down_proj"] = {"role": "mlp.down"}
        feedforward += [f"{p}.mlp.up_proj", f"{p}.mlp.down_proj"]
    _compare(llama_eager(), entries, feedforward, token_ids(), out=lambda o: o.logits)


def test_gpt2_conv1d_and_cnn_equal_peft():
    entries = {
        f"transformer.h.{i}.{m}": {"placement": p}
        for i in range(2)
        for m, p in (("attn.c_attn", "output"), ("mlp.c_proj", "input"))
    }
    feedforward = [n for n, e in entries.items() if e["placement"] == "input"]
    _compare(gpt2_eager(), entries, feedforward, token_ids(), out=lambda o: o.logits)
    entries = {"stem": {"placement": "output"}, "body": {"placement": "input"}, "point": {"placement": "input"}}
    _compare(
        pointwise_cnn(),
        entries,
        ["body", "point"],
        torch.randn(2, 3, 11, 11, generator=torch.Generator().manual_seed(0)),
    )


def test_auto_placement_follows_role_and_validate_resolves_it():
    ia3 = get_method("ia3")
    site = static_site("ff", nn.Linear(16, 4), "linear")
    down = replace(site, role="mlp.down")
    assert ia3.validate(site) == {"placement": "output"}
    assert ia3.validate(down) == {"placement": "input"}
    assert ia3.validate(down, placement="output") == {"placement": "output"}
    assert (ia3.param_count(site), ia3.param_count(down)) == (4, 16)
    assert isinstance(ia3.wrap(nn.Linear(16, 4), down), InputScale)
    layer = ia3.wrap(nn.Linear(16, 4), site)
    assert isinstance(layer, ScaleShift) and layer.shift is None


def _cases():
    torch.manual_seed(0)
    return {
        "linear": (nn.Linear(12, 7), torch.randn(3, 5, 12)),
        "linear_no_bias": (nn.Linear(12, 7, bias=False), torch.randn(3, 5, 12)),
        "conv1d_hf": (Conv1D(7, 12), torch.randn(3, 5, 12)),
        "conv2d": (nn.Conv2d(4, 6, 3, padding=1), torch.randn(2, 4, 6, 6)),
        "conv2d_grouped": (nn.Conv2d(4, 6, 3, padding=1, groups=2, padding_mode="reflect"), torch.randn(2, 4, 6, 6)),
    }


CASES = [pytest.param(c, p, id=f"{c}-{p}") for c in _cases() for p in ("output", "input")]


def _wrap(module: nn.Module, placement: str) -> nn.Module:
    site = static_site("m", module, module_op(module))
    ia3 = get_method("ia3")
    return ia3.wrap(module, site, **ia3.validate(site, placement=placement))


def _randomize(layer: nn.Module) -> nn.Module:
    with torch.no_grad():
        layer.scale.add_(
            (torch.randn(layer.scale.shape, generator=torch.Generator().manual_seed(0)) * 0.3).to(layer.scale.dtype)
        )
    return layer


@pytest.mark.parametrize("case, placement", CASES)
def test_identity_at_init_hand_computation_and_merge(case, placement):
    module, x = _cases()[case]
    original = {k: v.clone() for k, v in module.state_dict().items()}
    expected = module(x)
    layer = _wrap(module, placement)
    assert torch.equal(layer(x), expected)
    _randomize(layer)
    channel = 1 if x.dim() == 4 else -1
    shape = [1] * x.dim()
    shape[channel] = -1
    if placement == "input":
        by_hand = module(x * layer.scale.view(shape))
    else:
        by_hand = expected * layer.scale.view(shape)
    unmerged = layer(x)
    torch.testing.assert_close(unmerged, by_hand)
    layer.merge()
    layer.merge()  # no-op
    torch.testing.assert_close(module(x), unmerged, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    assert module.state_dict().keys() == original.keys()
    for k, v in module.state_dict().items():
        torch.testing.assert_close(v, original[k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case, placement", CASES)
def test_bf16_and_meta(case, placement):
    module, x = _cases()[case]
    bf16 = _wrap(copy.deepcopy(module).to(torch.bfloat16), placement)
    xb = x.to(torch.bfloat16)
    assert bf16.scale.dtype == torch.bfloat16
    assert torch.equal(bf16(xb), bf16.base(xb))
    unmerged = _randomize(bf16)(xb)
    bf16.merge()
    assert bf16(xb).dtype == torch.bfloat16
    torch.testing.assert_close(bf16(xb), unmerged, atol=0.1, rtol=0.05)

    meta = _wrap(module.to("meta"), placement)
    assert meta.scale.is_meta
    assert meta(x.to("meta")).is_meta
    meta.merge()
    meta.unmerge()


@pytest.mark.parametrize("case, placement", CASES)
def test_costs_are_exact(case, placement):
    module, x = _cases()[case]  # stride 1, same padding: input and output maps have one size
    x.requires_grad_(True)  # as inside a model
    ia3 = get_method("ia3")
    y = module(x)
    site = replace(static_site("m", module, module_op(module)), out_shape=tuple(y.shape))
    channels = site.in_features if placement == "input" else site.out_features
    layer = ia3.wrap(frozen(module), site, placement=placement)
    assert sum(p.numel() for p in layer.parameters() if p.requires_grad) == ia3.param_count(site, placement) == channels
    assert ia3.overhead_flops(site, placement) == site.tokens * channels  # one multiply per scaled element


def test_bad_plans_are_plan_errors():
    ia3 = get_method("ia3")
    fc = static_site("fc", nn.Linear(4, 4), "linear")
    for hp in ({"placement": "inputs"}, {"placement": None}, {"rank": 2}):
        with pytest.raises(PlanError):
            ia3.validate(fc, **hp)
    with pytest.raises(PlanError, match="tunes only"):
        ia3.validate(static_site("e", nn.Embedding(9, 4), "embedding"))

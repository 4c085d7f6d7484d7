"""Sparse fine-tuning against a hand-built dense delta: selection, compact storage (optimizer
state of k elements), merge, save/load of the exact indices, scores through `apply`, meta."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from peftplan.backends import PlanError, apply, count_trainable, get_method, load, merge, save
from peftplan.backends.sparse import SparseDelta, select_top
from peftplan.ir.modules import module_op, static_site
from tests.backends.adapters import frozen, plan_for
from tests.zoo import bert_eager, gpt2_eager, token_ids

sparse = get_method("sparse")


def _modules() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    return {
        "linear": (nn.Linear(12, 7), torch.randn(3, 5, 12)),
        "conv1d_hf": (Conv1D(7, 12), torch.randn(3, 5, 12)),
        "conv2d": (nn.Conv2d(4, 6, 3, stride=2, padding=1), torch.randn(2, 4, 9, 9)),
        "conv2d_groups": (nn.Conv2d(4, 6, 3, groups=2), torch.randn(2, 4, 9, 9)),
        "embedding": (nn.Embedding(20, 8, padding_idx=0), torch.randint(0, 20, (3, 5))),
    }


CASES = list(_modules())


def _wrap(module: nn.Module, density: float = 0.2, **kw) -> SparseDelta:
    site = static_site("m", module, module_op(module))
    return sparse.wrap(frozen(module), site, **sparse.validate(site, density=density), **kw)


def _reference(module: nn.Module, layer: SparseDelta) -> nn.Module:
    """A copy of ``module`` with the delta written in element by element."""
    ref = copy.deepcopy(module)
    with torch.no_grad():
        flat = ref.weight.view(-1)
        for i, v in zip(layer.indices.tolist(), layer.values.tolist()):
            flat[i] += v
    return ref


@pytest.mark.parametrize("case", CASES)
def test_identity_at_init_then_matches_reference(case):
    module, x = _modules()[case]
    expected = module(x)
    layer = _wrap(module)
    assert torch.equal(layer(x), expected)
    with torch.no_grad():
        layer.values.normal_()
    torch.testing.assert_close(layer(x), _reference(module, layer)(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_param_count_is_k_and_optimizer_state_scales_with_k(case):
    module, x = _modules()[case]
    site = static_site("m", module, module_op(module))
    k = max(1, round(0.2 * module.weight.numel()))
    layer = _wrap(module)
    assert sparse.param_count(site, density=0.2) == k == layer.values.numel() == layer.indices.numel()
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["values"]
    opt = torch.optim.AdamW([layer.values], lr=0.1)
    layer(x).float().pow(2).mean().backward()
    opt.step()
    assert module.weight.grad is None
    state = opt.state[layer.values]
    assert state["exp_avg"].numel() == state["exp_avg_sq"].numel() == k


def test_k_by_hand():
    fc = static_site("fc", nn.Linear(100, 10), "linear")
    assert sparse.param_count(fc, density=0.01) == 10
    assert sparse.param_count(fc, density=1e-9) == 1  # never empty
    assert sparse.param_count(fc, density=1) == 1000
    assert sparse.param_count(fc, density=0.0125) == 12  # round half to even: 12.5 -> 12
    conv = static_site("c", nn.Conv2d(4, 6, 3, groups=2), "conv2d")
    assert sparse.param_count(conv, density=1) == 6 * 2 * 9


def test_magnitude_picks_largest_abs_with_ties_to_lower_index():
    fc = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[0.5, -2.0, 1.0], [-1.0, 0.1, 2.0]]))
    assert _wrap(fc, density=0.5).indices.tolist() == [1, 2, 5]  # |2|, |2|, then the first |1|
    assert select_top(torch.tensor([1.0, 1.0, 1.0, 0.0]), 2).tolist() == [0, 1]


def test_sensitivity_picks_top_k_of_given_scores_through_apply():
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 2))
    plan = plan_for(model, {"0": {"method": "sparse", "density": 0.15, "selection": "sensitivity"}})
    scores = torch.zeros(5, 4)
    scores.view(-1)[[17, 3, 9]] = torch.tensor([3.0, 2.0, 1.0])
    apply(model, plan, scores={"0": scores, "1": torch.ones(2, 5)})  # scores of other sites are ignored
    assert model[0].indices.tolist() == [3, 9, 17]  # k = 3: the three scored entries, in index order


@pytest.mark.parametrize("scores, word", [(None, "per-element scores"), ({"0": torch.ones(4, 5)}, "shape")])
def test_sensitivity_without_fitting_scores_is_a_plan_error_before_touching(scores, word):
    model = nn.Sequential(nn.Linear(4, 5))
    plan = plan_for(model, {"0": {"method": "sparse", "density": 0.5, "selection": "sensitivity"}})
    with pytest.raises(PlanError, match=word):
        apply(model, plan, scores=scores)
    assert type(model[0]) is nn.Linear and not hasattr(model, "peftplan_plan")


@pytest.mark.parametrize(
    "hp, word",
    [
        ({"density": 0}, r"\(0, 1\]"),
        ({"density": 1.5}, r"\(0, 1\]"),
        ({"density": "0.1"}, r"\(0, 1\]"),
        ({"density": True}, r"\(0, 1\]"),
        ({}, "needs"),
        ({"density": 0.1, "selection": "random"}, "selection"),
    ],
)
def test_bad_hyper_parameters_are_plan_errors(hp, word):
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(PlanError, match=word):
        apply(model, plan_for(model, {"0": {"method": "sparse", **hp}}))
    assert type(model[0]) is nn.Linear


@pytest.mark.parametrize("case", CASES)
def test_merge_equals_unmerged_and_unmerge_restores(case):
    module, x = _modules()[case]
    layer = _wrap(module)
    with torch.no_grad():
        layer.values.normal_()
    original, unmerged = module.weight.detach().clone(), layer(x)
    layer.merge()
    layer.merge()  # a second merge must not add twice
    torch.testing.assert_close(module(x), unmerged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(module.weight, original, atol=1e-6, rtol=0)


def test_overhead_flops_by_hand():
    site = static_site("fc", nn.Linear(100, 10), "linear", calls=2)
    assert sparse.overhead_flops(site, density=0.01) == 2 * (1000 + 10)  # add W + Δ, scatter k


@pytest.mark.parametrize("case", CASES)
def test_bf16(case):
    module, x = _modules()[case]
    module = module.to(torch.bfloat16)
    x = x if x.dtype == torch.long else x.bfloat16()
    layer = _wrap(module)
    assert layer.values.dtype == torch.bfloat16 and torch.equal(layer(x), module(x))
    with torch.no_grad():
        layer.values.normal_()
    unmerged = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), unmerged, atol=0.1, rtol=0.05)


def test_meta_defers_selection_and_allocates_nothing():
    model = nn.Sequential(nn.Linear(6, 4))
    real = apply(copy.deepcopy(model), plan_for(model, {"0": {"method": "sparse", "density": 0.25}}))
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(6, 4))
    apply(meta, plan_for(meta, {"0": {"method": "sparse", "density": 0.25}}))
    assert all(t.is_meta for t in [*meta.parameters(), *meta.buffers()])
    assert meta[0].indices.shape == (6,) and meta(torch.randn(2, 6, device="meta")).shape == (2, 4)
    meta.to_empty(device="cpu")
    meta.load_state_dict(real.state_dict())  # the mask comes with the tuned state
    assert torch.equal(meta[0].indices, real[0].indices)


def test_save_load_restores_exact_sensitivity_indices(tmp_path):
    model = bert_eager()
    fresh = copy.deepcopy(model)
    name = "encoder.layer.0.intermediate.dense"
    scores = torch.rand(model.get_submodule(name).weight.shape, generator=torch.Generator().manual_seed(4))
    apply(
        model,
        plan_for(model, {name: {"method": "sparse", "density": 0.03, "selection": "sensitivity"}}),
        scores={name: scores},
    )
    with torch.no_grad():
        model.get_submodule(name).values.normal_()
    save(model, tmp_path)
    loaded = load(fresh, tmp_path)  # no scores needed: the indices come from the artifact
    assert torch.equal(loaded.get_submodule(name).indices, model.get_submodule(name).indices)
    assert torch.equal(model.get_submodule(name).indices, select_top(scores, count_trainable(model)))
    assert torch.equal(loaded(token_ids()).last_hidden_state, model(token_ids()).last_hidden_state)


def test_tied_weight_is_left_unmerged():
    model = gpt2_eager()  # lm_head shares wte's weight
    apply(model, plan_for(model, {"transformer.wte": {"method": "sparse", "density": 0.1}}))
    with torch.no_grad():
        model.transformer.wte.values.normal_()
        expected = model(token_ids()).logits
        report = merge(model)
        assert "lm_head" in report.left["transformer.wte"] and report.merged == []
        assert torch.equal(model(token_ids()).logits, expected)

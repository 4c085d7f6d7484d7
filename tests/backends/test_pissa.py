"""LoRA from the weight's principal singular directions (``init="pissa"``) against peft's
``init_lora_weights="pissa"``: the same start, the same function once trained, the same
merged weights; the method contract from that start; and its validation."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model

from peftplan.backends import PlanError, apply, get_method, merge, methods, remove
from peftplan.ir.modules import static_site
from tests.backends import test_contract as contract
from tests.backends.adapters import plan_for
from tests.backends.references import assert_same_lora_function
from tests.zoo import gpt2, llama_eager, token_ids

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SITES = {
    f"model.layers.{i}.{m}": {"rank": 2 + i, "alpha": 3}
    for i in range(2)
    for m in ("self_attn.q_proj", "mlp.down_proj")
}


def _pair():
    """Our PiSSA-started LoRA and peft's on two copies of one tiny Llama."""
    model = llama_eager()
    config = LoraConfig(
        r=8,
        lora_alpha=8,
        target_modules=list(SITES),
        init_lora_weights="pissa",
        rank_pattern={re.escape(n): e["rank"] for n, e in SITES.items()},
        alpha_pattern={re.escape(n): e["alpha"] for n, e in SITES.items()},
    )
    theirs = get_peft_model(copy.deepcopy(model), config)
    ours = apply(model, plan_for(model, {n: {"method": "lora", "init": "pissa", **e} for n, e in SITES.items()}))
    return ours, theirs


def test_the_start_is_peft_pissa_and_the_model_is_unchanged():
    reference = llama_eager()
    ours, theirs = _pair()
    for name in SITES:
        mine, other = ours.get_submodule(name), theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(mine.lora_A, other.lora_A["default"].weight)  # the same singular directions
        torch.testing.assert_close(mine.lora_B, other.lora_B["default"].weight)
        residual = reference.get_submodule(name).weight - mine.scaling * mine.lora_B @ mine.lora_A
        torch.testing.assert_close(other.base_layer.weight, residual, atol=1e-6, rtol=1e-5)  # peft's frozen residual
        assert torch.equal(mine.base.weight, reference.get_submodule(name).weight)  # ours keeps the weight
    with torch.no_grad():
        expected = reference(token_ids()).logits
        torch.testing.assert_close(ours(token_ids()).logits, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs(token_ids()).logits, expected, atol=1e-5, rtol=1e-5)


def test_trained_outputs_gradients_and_merge_equal_peft():
    ours, theirs = _pair()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # as if trained: both moved off the start alike
        for name in SITES:
            mine, other = ours.get_submodule(name), theirs.base_model.model.get_submodule(name)
            for p, q in ((mine.lora_A, other.lora_A["default"].weight), (mine.lora_B, other.lora_B["default"].weight)):
                step = 0.05 * torch.randn(p.shape, generator=g)
                p.add_(step)
                q.add_(step)
    got = assert_same_lora_function(ours, theirs, SITES, token_ids())
    with torch.no_grad():
        merge(ours)
        theirs.merge_adapter()
        for name in SITES:
            merged = theirs.base_model.model.get_submodule(name).base_layer.weight
            torch.testing.assert_close(ours.get_submodule(name).base.weight, merged, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(token_ids()).logits, got.detach(), atol=1e-5, rtol=1e-5)


def test_removing_puts_back_the_weight_it_started_from():
    reference = llama_eager()
    ours, _ = _pair()
    with torch.no_grad():
        for name in SITES:
            nn.init.normal_(ours.get_submodule(name).lora_B)
    merge(ours)
    remove(ours)
    for name in SITES:
        torch.testing.assert_close(
            ours.get_submodule(name).weight, reference.get_submodule(name).weight, atol=1e-6, rtol=0
        )


@pytest.fixture
def pissa_example(monkeypatch):
    """The contract suite's LoRA, started from the principal directions on every linear site."""
    lora = methods()["lora"]
    monkeypatch.setattr(lora, "example", {"rank": 2, "alpha": 4, "init": "pissa"})
    monkeypatch.setattr(lora, "ops", frozenset({"linear"}))


CONTRACT = [
    "test_identity_at_init",
    "test_param_count_equals_trainable_parameters",
    "test_only_adapter_tensors_get_gradients",
    "test_merge_equals_unmerged_and_unmerge_restores_base",
    "test_extra_ops_are_the_kernels_the_wrapped_forward_adds",
    "test_training_reduces_loss",
    "test_bfloat16_forward_and_backward_are_finite",
    "test_meta_device_allocates_nothing_until_materialised",
]


@pytest.mark.parametrize("model_name", ["mlp", "llama", "gpt2"])
@pytest.mark.parametrize("check", CONTRACT)
def test_the_method_contract_holds_from_a_pissa_start(pissa_example, check, model_name):
    getattr(contract, check)("lora", model_name)


@pytest.mark.parametrize("model_name", ["mlp", "gpt2"])
def test_save_load_from_a_pissa_start(pissa_example, model_name, tmp_path):
    contract.test_save_load_gives_identical_outputs("lora", model_name, tmp_path)


def test_adapter_bytes_count_the_saved_start(pissa_example, tmp_path):
    from peftplan.backends import adapter_tensors

    model = gpt2()  # HF Conv1D linears: the weight stored (in, out)
    site = static_site("transformer.h.0.attn.c_attn", model.transformer.h[0].attn.c_attn, "linear")
    hp = get_method("lora").validate(site, rank=3, init="pissa")
    tuned = apply(model, plan_for(model, {site.name: {"method": "lora", **hp}}))
    saved = sum(t.numel() * t.element_size() for t in adapter_tensors(tuned).values())
    assert get_method("lora").adapter_bytes(site, **hp) == saved


@pytest.mark.parametrize(
    "module, hp, match",
    [
        (nn.Linear(8, 8), {"rank": 2, "init": "svd"}, "init must be one of"),
        (nn.Embedding(10, 8), {"rank": 2, "init": "pissa"}, "op is embedding"),
        (nn.Linear(8, 3), {"rank": 4, "init": "pissa"}, "has 3"),
    ],
)
def test_bad_starts_are_named(module, hp, match):
    from peftplan.ir.modules import module_op

    with pytest.raises(PlanError, match=match):
        get_method("lora").validate(static_site("m", module, module_op(module)), **hp)


def test_dora_has_no_start_of_its_own():
    with pytest.raises(PlanError, match="no hyper-parameter"):
        get_method("dora").validate(static_site("m", nn.Linear(8, 8), "linear"), rank=2, init="pissa")


def test_dropout_reaches_the_adapter_path_alone():
    """As in peft: the frozen residual weight sees the input before dropout (by hand, one mask)."""
    from peftplan.backends.lora_layers import LoRALinear

    torch.manual_seed(0)
    base, x = nn.Linear(12, 10), torch.randn(4, 12)
    layer = LoRALinear(base, rank=3, alpha=6, dropout=0.5, init="pissa").train()
    with torch.no_grad():
        layer.lora_B.add_(0.1 * torch.randn(layer.lora_B.shape))  # off the start
    torch.manual_seed(1)
    got = layer(x)
    torch.manual_seed(1)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    s = layer.scaling
    residual = base.weight - s * layer.lora_B0 @ layer.lora_A0
    expected = x @ residual.T + base.bias + s * dropped @ (layer.lora_B @ layer.lora_A).T
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_load_copies_the_saved_start_instead_of_computing_it(tmp_path, monkeypatch):
    from peftplan.backends import load, save

    entries = {n: {"method": "lora", "init": "pissa", **e} for n, e in SITES.items()}
    tuned = _trained(llama_eager(), entries)
    save(tuned, tmp_path)

    def no_svd(*args, **kwargs):
        raise AssertionError("load computed a start it then overwrites")

    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    loaded = load(llama_eager(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(token_ids()).logits, tuned(token_ids()).logits, atol=0, rtol=0)
    with pytest.raises(AssertionError, match="overwrites"):  # apply itself computes it
        apply(llama_eager(), plan_for(llama_eager(), entries))


def test_a_start_too_wide_to_export_is_named(tmp_path):
    from peftplan.backends import export_peft

    model = llama_eager()  # q_proj is 64x64 in the tiny Llama
    name = "model.layers.0.self_attn.q_proj"
    width = max(model.get_submodule(name).weight.shape)
    tuned = apply(model, plan_for(model, {name: {"method": "lora", "rank": width // 2 + 1, "init": "pissa"}}))
    with pytest.raises(PlanError, match=f"rank {2 * (width // 2 + 1)}, above this layer's"):
        export_peft(tuned, tmp_path)


@pytest.mark.parametrize("start", ["gaussian", "eva", "orthogonal", "mica", False])
def test_peft_adapters_whose_start_kept_the_weights_import(tmp_path, start):
    from peftplan.backends import export_peft, import_peft

    tuned = _trained(llama_eager(), {"model.layers.0.mlp.up_proj": {"method": "lora", "rank": 2}})
    export_peft(tuned, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": start}))
    with torch.no_grad():
        back = import_peft(llama_eager(), tmp_path)
        torch.testing.assert_close(back(token_ids()).logits, tuned(token_ids()).logits, atol=1e-6, rtol=1e-6)


def _trained(model: nn.Module, entries: dict[str, dict]) -> nn.Module:
    """``entries`` applied to ``model``, A and B moved off their PiSSA start."""
    tuned = apply(model, plan_for(model, entries))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name in entries:
            for p in (tuned.get_submodule(name).lora_A, tuned.get_submodule(name).lora_B):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return tuned


@pytest.mark.parametrize("rslora", [False, True])
def test_export_loads_in_peft_on_the_unchanged_model_and_imports_back(tmp_path, rslora):
    from peft import PeftModel

    from peftplan.backends import export_peft, import_peft

    entries = {n: {"method": "lora", "init": "pissa", "rslora": rslora, **e} for n, e in SITES.items()}
    entries["model.layers.0.self_attn.v_proj"] = {"method": "lora", "rank": 2, "rslora": rslora}  # from zero beside
    ours = _trained(llama_eager(), entries)
    export_peft(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True  # a plain LoRA: peft changes no weight on loading it
    pattern = {k.replace("\\", ""): v for k, v in config["rank_pattern"].items()}
    ranks = {n: pattern.get(n, config["r"]) for n in entries}
    assert ranks == {**{n: 2 * e["rank"] for n, e in SITES.items()}, "model.layers.0.self_attn.v_proj": 2}
    with torch.no_grad():
        expected = ours(token_ids()).logits
        theirs = PeftModel.from_pretrained(llama_eager(), tmp_path)
        torch.testing.assert_close(theirs(token_ids()).logits, expected, atol=1e-5, rtol=1e-5)
        back = import_peft(llama_eager(), tmp_path)
        torch.testing.assert_close(back(token_ids()).logits, expected, atol=1e-5, rtol=1e-5)


def test_peft_config_starts_as_ours_and_a_mixed_plan_is_refused_with_the_nearest():
    model = llama_eager()
    plan = plan_for(model, {n: {"method": "lora", "init": "pissa", **e} for n, e in SITES.items()})
    config = plan.to_peft_config()
    assert config.init_lora_weights == "pissa"
    theirs = get_peft_model(copy.deepcopy(model), config)
    ours = apply(model, plan)
    for name in SITES:
        torch.testing.assert_close(
            ours.get_submodule(name).lora_A, theirs.base_model.model.get_submodule(name).lora_A["default"].weight
        )
    mixed = plan_for(model, {**plan.sites, "model.layers.1.self_attn.v_proj": {"method": "lora", "rank": 2}})
    with pytest.raises(PlanError, match="starts every site of one adapter alike"):
        mixed.to_peft_config()
    nearest = mixed.as_lora()
    assert {e.get("init", "zero") for e in nearest.sites.values()} == {"zero"}
    assert sorted(nearest.provenance["as_lora"]) == sorted(
        f"{n}: lora from a PiSSA start → from zero (peft starts every site of one adapter alike (init_lora_weights))"
        for n in SITES
    )
    assert nearest.to_peft_config().init_lora_weights is True
    assert "peft_init_lora_weights: pissa" in plan.to_axolotl().splitlines()  # axolotl hands it to peft
    assert "peft_init_lora_weights" not in nearest.to_axolotl()
    assert plan.summary() == "lora: 4 sites, ranks 2–3, 4 from a PiSSA start"


def test_a_peft_adapter_trained_against_changed_weights_is_refused(tmp_path):
    from peftplan.backends import export_peft, import_peft

    export_peft(_trained(llama_eager(), {"model.layers.0.mlp.up_proj": {"method": "lora", "rank": 2}}), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": "pissa_niter_4"}))
    with pytest.raises(PlanError, match="init_lora_weights='pissa_niter_4'.*path_initial_model_for_weight_conversion"):
        import_peft(llama_eager(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": "someday"}))
    with pytest.raises(PlanError, match="a start peftplan does not know"):
        import_peft(llama_eager(), tmp_path)

"""peft interop against the installed HF peft as the reference: what `export_peft` writes,
``PeftModel.from_pretrained`` loads with the same outputs; what peft saves, `import_peft`
reads with the same outputs."""

from __future__ import annotations

import json

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model

from peftplan.backends import (
    PlanError,
    applied_plan,
    apply,
    export_peft,
    import_peft,
    methods,
    trainable_parameters,
)
from peftplan.backends.peft_interop import to_peft
from tests.backends.adapters import plan_for
from tests.zoo import bert_eager, gpt2_eager, llama_eager, pointwise_cnn, token_ids

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _perturb(model, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * std)


def _out(model):
    with torch.no_grad():
        o = model(token_ids())
    return o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state


def _need(*names):
    missing = [n for n in names if n not in methods()]
    if missing:
        pytest.skip(f"method(s) {missing} not registered")


def _llama_entries(method: str, **hp) -> dict:
    return {
        f"model.layers.{i}.{m}": {"method": method, **hp} for i in range(2) for m in ("self_attn.q_proj", "mlp.up_proj")
    }


def _export(make, entries, tmp_path, **kw):
    """peftplan's outputs and the export of a perturbed model tuned with ``entries``."""
    model = make()
    base = _out(model)
    apply(model, plan_for(model, entries))
    _perturb(model)
    ours = _out(model)
    assert not torch.allclose(ours, base, atol=1e-3)  # the adapters are live
    return ours, export_peft(model, tmp_path, **kw)


# -- export -----------------------------------------------------------------------------------


def test_bert_per_site_ranks_rslora_and_full_head_load_in_peft(tmp_path):
    entries = {}
    for i in range(2):
        p = f"encoder.layer.{i}"
        entries[f"{p}.attention.self.query"] = {"method": "lora", "rank": 2 + i}
        entries[f"{p}.attention.self.value"] = {"method": "lora", "rank": 4, "alpha": 3}
        entries[f"{p}.intermediate.dense"] = {"method": "lora", "rank": 1 + 2 * i, "alpha": 5, "rslora": True}
    entries["embeddings.word_embeddings"] = {"method": "lora", "rank": 3}
    entries["pooler.dense"] = {"method": "full"}
    ours, result = _export(bert_eager, entries, tmp_path)
    assert result.adapters == {"lora": tmp_path} and result.unsupported == []
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["pooler.dense"] and config["rank_pattern"]
    theirs = PeftModel.from_pretrained(bert_eager(), tmp_path)
    torch.testing.assert_close(_out(theirs), ours, atol=1e-5, rtol=1e-5)
    untouched = theirs.base_model.model.encoder.layer[0].attention.self.key
    assert type(untouched) is torch.nn.Linear  # only planned sites get an adapter


def test_llama_lm_head_and_gpt2_conv1d_load_in_peft(tmp_path):
    entries = _llama_entries("lora", rank=3) | {"lm_head": {"method": "lora", "rank": 2, "alpha": 7}}
    ours, _ = _export(llama_eager, entries, tmp_path / "llama")
    torch.testing.assert_close(
        _out(PeftModel.from_pretrained(llama_eager(), tmp_path / "llama")), ours, atol=1e-5, rtol=1e-5
    )
    entries = {
        f"transformer.h.{i}.{m}": {"method": "lora", "rank": 2 + i}
        for i in range(2)
        for m in ("attn.c_attn", "mlp.c_proj")
    }
    ours, _ = _export(gpt2_eager, entries, tmp_path / "gpt2")
    torch.testing.assert_close(
        _out(PeftModel.from_pretrained(gpt2_eager(), tmp_path / "gpt2")), ours, atol=1e-5, rtol=1e-5
    )


def test_dora_loads_in_peft(tmp_path):
    _need("dora")
    ours, result = _export(llama_eager, _llama_entries("dora", rank=2, alpha=4), tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    torch.testing.assert_close(
        _out(PeftModel.from_pretrained(llama_eager(), result.adapters["dora"])), ours, atol=1e-5, rtol=1e-5
    )


def test_ia3_input_and_output_placement_load_in_peft(tmp_path):
    _need("ia3")
    entries = {
        f"transformer.h.{i}.{m}": {"method": "ia3", "placement": p}
        for i in range(2)
        for m, p in (("attn.c_attn", "output"), ("mlp.c_proj", "input"))
    }
    ours, result = _export(gpt2_eager, entries, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["feedforward_modules"]
    torch.testing.assert_close(
        _out(PeftModel.from_pretrained(gpt2_eager(), result.adapters["ia3"])), ours, atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize(
    "method, hp", [("lora", {"rank": 2}), ("dora", {"rank": 2}), ("ia3", {"placement": "input"}), ("ia3", {})]
)
def test_conv2d_sites_and_full_head_round_trip_through_peft(method, hp, tmp_path):
    _need(method)
    x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(0))
    model = pointwise_cnn()
    apply(
        model,
        plan_for(
            model, {"stem": {"method": method, **hp}, "body": {"method": method, **hp}, "head": {"method": "full"}}
        ),
    )
    _perturb(model)
    export_peft(model, tmp_path)
    with torch.no_grad():
        ours, theirs, back = (
            model(x),
            PeftModel.from_pretrained(pointwise_cnn(), tmp_path)(x),
            import_peft(pointwise_cnn(), tmp_path)(x),
        )
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(back, ours, atol=1e-6, rtol=1e-6)


def test_lora_plus_ia3_is_two_adapters_loaded_in_turn(tmp_path):
    _need("ia3")
    entries = _llama_entries("lora", rank=2) | {
        f"model.layers.{i}.mlp.down_proj": {"method": "ia3", "role": "mlp.down"} for i in range(2)
    }
    ours, result = _export(llama_eager, entries, tmp_path)
    assert set(result.adapters) == {"lora", "ia3"}
    merged = PeftModel.from_pretrained(llama_eager(), result.adapters["lora"]).merge_and_unload()
    theirs = PeftModel.from_pretrained(merged, result.adapters["ia3"])
    torch.testing.assert_close(_out(theirs), ours, atol=1e-5, rtol=1e-5)


def test_unsupported_sites_are_named_or_left_out_on_request(tmp_path):
    others = [m for m in ("adapter", "sparse", "moe_lora", "ssf") if m in methods()]
    if not others:
        pytest.skip("no method without a peft counterpart is registered yet")
    model = llama_eager()
    entries = _llama_entries("lora", rank=2)
    odd = {"model.layers.0.mlp.down_proj": {"method": others[0], **methods()[others[0]].example}}
    plan = plan_for(model, entries | odd)
    configs, unsupported = to_peft(plan)
    assert set(configs) == {"lora"} and len(unsupported) == 1 and "model.layers.0.mlp.down_proj" in unsupported[0]
    apply(model, plan)
    with pytest.raises(PlanError, match="model.layers.0.mlp.down_proj"):
        export_peft(model, tmp_path)
    assert export_peft(model, tmp_path, allow_partial=True).unsupported == unsupported


def test_to_peft_configs_target_exactly_the_planned_sites():
    plan = plan_for(
        llama_eager(),
        _llama_entries("lora", rank=4) | {"model.layers.1.self_attn.q_proj": {"method": "lora", "rank": 8}},
    )
    configs, unsupported = to_peft(plan)
    lora = configs["lora"]
    assert isinstance(lora, LoraConfig) and unsupported == [] and lora.r == 4
    assert lora.rank_pattern == {r"model\.layers\.1\.self_attn\.q_proj": 8}
    model = get_peft_model(llama_eager(), lora)
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_modules() if n.endswith(".lora_A")}
    assert wrapped == {"base_model.model." + n for n in plan.sites}


# -- import -----------------------------------------------------------------------------------


def _peft_saved(make, config, tmp_path):
    """A peft model with non-trivial adapter weights, saved; returns its outputs."""
    model = get_peft_model(make(), config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(tmp_path)
    return _out(model)


def test_import_peft_lora_with_patterns_rslora_and_modules_to_save(tmp_path):
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["query", "value", "word_embeddings"],
        use_rslora=True,
        rank_pattern={"layer.1.attention.self.query": 2},
        alpha_pattern={"value": 3},
        modules_to_save=["pooler.dense"],
    )
    theirs = _peft_saved(bert_eager, config, tmp_path)
    model = import_peft(bert_eager(), tmp_path)
    torch.testing.assert_close(_out(model), theirs, atol=1e-5, rtol=1e-5)
    sites = applied_plan(model).sites
    assert sites["encoder.layer.1.attention.self.query"]["rank"] == 2 and sites["pooler.dense"]["method"] == "full"
    assert "encoder.layer.0.attention.self.key" not in sites


def test_import_peft_all_linear_llama_and_dora(tmp_path):
    theirs = _peft_saved(llama_eager, LoraConfig(r=2, target_modules="all-linear"), tmp_path / "lora")
    model = import_peft(llama_eager(), tmp_path / "lora")
    torch.testing.assert_close(_out(model), theirs, atol=1e-5, rtol=1e-5)
    assert "lm_head" not in applied_plan(model).sites  # peft leaves the output layer out
    _need("dora")
    theirs = _peft_saved(
        llama_eager, LoraConfig(r=2, target_modules=["q_proj", "down_proj"], use_dora=True), tmp_path / "dora"
    )
    torch.testing.assert_close(_out(import_peft(llama_eager(), tmp_path / "dora")), theirs, atol=1e-5, rtol=1e-5)


def test_import_peft_ia3(tmp_path):
    _need("ia3")
    config = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    theirs = _peft_saved(llama_eager, config, tmp_path)
    model = import_peft(llama_eager(), tmp_path)
    torch.testing.assert_close(_out(model), theirs, atol=1e-5, rtol=1e-5)
    assert applied_plan(model).sites["model.layers.0.mlp.down_proj"]["placement"] == "input"


def test_export_then_import_round_trips(tmp_path):
    entries = _llama_entries("lora", rank=3, alpha=5) | {"lm_head": {"method": "full"}}
    ours, _ = _export(llama_eager, entries, tmp_path)
    torch.testing.assert_close(_out(import_peft(llama_eager(), tmp_path)), ours, atol=1e-6, rtol=1e-6)


def test_import_rejects_what_it_cannot_express(tmp_path):
    _peft_saved(bert_eager, LoraConfig(r=2, target_modules=["query"], bias="all"), tmp_path)
    model = bert_eager()
    with pytest.raises(PlanError, match="bias"):
        import_peft(model, tmp_path)
    assert not hasattr(model, "peftplan_plan")


def test_full_on_a_tied_weight_is_unsupported(tmp_path):
    model = gpt2_eager()
    apply(
        model,
        plan_for(
            model, {"transformer.wte": {"method": "full"}, "transformer.h.0.attn.c_attn": {"method": "lora", "rank": 2}}
        ),
    )
    with pytest.raises(PlanError, match=r"transformer\.wte \(full\): its weights are shared"):
        export_peft(model, tmp_path)

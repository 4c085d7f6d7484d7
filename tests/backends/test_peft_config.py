"""A plan as the user's own training config, against the installed peft as the reference:
``get_peft_model(model, plan.to_peft_config())`` tunes the same sites with as many trainable
parameters as ``pp.apply(model, plan)`` and, from the same initial adapters, trains to the same
losses; what peft cannot express is named, with the nearest plan it can; the axolotl fragment
builds the same peft model the way axolotl builds one from its config."""

from __future__ import annotations

import pytest
import torch
import yaml
from peft import IA3Config, LoraConfig, get_peft_model, set_peft_model_state_dict
from peft.utils import ModulesToSaveWrapper
from safetensors.torch import load_file

import peftplan as pp
from peftplan.backends import count_trainable, methods, trainable_parameters
from peftplan.ir.modules import fingerprint
from tests.zoo import bert_classifier, llama_eager, token_ids

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

LLAMA = {
    f"model.layers.{i}.{m}": {"method": "lora", "rank": 2 + i, "alpha": 4 + 3 * i}
    for i in range(2)
    for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
}
CASES = {
    "llama-ranks-alphas": (
        llama_eager,
        LLAMA | {"model.layers.0.mlp.up_proj": {"method": "lora", "rank": 3, "alpha": 5, "rslora": True}},
    ),
    "llama-rslora": (llama_eager, {n: {**e, "rslora": True} for n, e in LLAMA.items()}),
    "llama-dora": (llama_eager, {n: {**e, "method": "dora"} for n, e in LLAMA.items()}),
    "bert-lora-and-head": (
        bert_classifier,
        {
            "bert.encoder.layer.1.attention.self.query": {"method": "lora", "rank": 4, "alpha": 8},
            "bert.encoder.layer.0.output.dense": {"method": "lora", "rank": 2, "alpha": 2},
            "classifier": {"method": "full"},
        },
    ),
}


def plan_of(model, entries) -> pp.Plan:
    return pp.Plan(sites=entries, model={"fingerprint": fingerprint(model), "class": type(model).__name__})


def batches(model, n: int = 5) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    vocab = model.config.vocab_size
    out = []
    for _ in range(n):
        ids = torch.randint(1, vocab, (4, 9), generator=g)
        labels = ids if hasattr(model, "lm_head") else torch.randint(0, 2, (4,), generator=g)
        out.append({"input_ids": ids, "labels": labels})
    return out


def train_losses(model, data, lr: float = 1e-2) -> list[float]:
    """A plain loop: AdamW over what requires grad, the model in eval mode (no dropout)."""
    model.eval()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for batch in data:
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def peft_sites(peft_model) -> set[str]:
    """The modules peft gave an adapter, or trains whole, by their name in the base model."""
    prefix = "base_model.model."
    lora = {n[len(prefix) :].rsplit(".lora_A", 1)[0] for n, _ in peft_model.named_modules() if n.endswith(".lora_A")}
    ia3 = {n[len(prefix) :] for n, m in peft_model.named_modules() if hasattr(m, "ia3_l") and n.startswith(prefix)}
    whole = {n[len(prefix) :] for n, m in peft_model.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    return lora | ia3 | whole


@pytest.mark.parametrize("case", list(CASES))
def test_peft_trains_the_plan_like_apply_from_the_same_init(case, tmp_path):
    make, entries = CASES[case]
    if case.endswith("dora") and "dora" not in methods():
        pytest.skip("no dora method registered")
    ours, base = make(), make()  # seeded: the same weights
    plan = plan_of(ours, entries)
    config = plan.to_peft_config()
    assert isinstance(config, LoraConfig) and config.inference_mode is False
    theirs = get_peft_model(base, config)
    pp.apply(ours, plan)
    assert peft_sites(theirs) == set(plan.tuned())
    assert sum(p.numel() for p in theirs.parameters() if p.requires_grad) == count_trainable(ours)
    # the same initial adapters: ours written in peft's format, read by peft's own loader
    pp.export_peft(ours, tmp_path)
    set_peft_model_state_dict(theirs, load_file(tmp_path / "adapter_model.safetensors"))
    data = batches(ours)
    expected, got = train_losses(ours, data), train_losses(theirs, data)
    assert got[-1] < got[0] - 1e-3  # it trains
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_an_ia3_plan_is_an_ia3_config():
    if "ia3" not in methods():
        pytest.skip("no ia3 method registered")
    model = llama_eager()
    plan = plan_of(
        model,
        {f"model.layers.{i}.mlp.down_proj": {"method": "ia3", "placement": "input"} for i in range(2)}
        | {f"model.layers.{i}.self_attn.k_proj": {"method": "ia3", "placement": "output"} for i in range(2)},
    )
    config = plan.to_peft_config()
    assert isinstance(config, IA3Config)
    theirs = get_peft_model(llama_eager(), config)
    assert peft_sites(theirs) == set(plan.tuned())
    assert sum(p.numel() for p in theirs.parameters() if p.requires_grad) == count_trainable(pp.apply(model, plan))


def test_what_peft_cannot_express_is_named_with_the_nearest_plan():
    others = [m for m in ("sparse", "moe_lora", "adapter") if m in methods()]
    if not others:
        pytest.skip("no method without a peft counterpart is registered")
    model = llama_eager()
    graph = pp.lower(model)
    odd = {f"model.layers.{i}.mlp.up_proj": {"method": m, **methods()[m].example} for i, m in enumerate(others[:2])}
    mixed = (
        {"model.layers.1.self_attn.k_proj": {"method": "dora", "rank": 2, "alpha": 4}} if "dora" in methods() else {}
    )
    entries = {n: {**e, **pp.describe.describe(graph[n])} for n, e in (LLAMA | odd | mixed).items()}
    plan = plan_of(model, entries)
    with pytest.raises(pp.PlanError) as error:
        plan.to_peft_config()
    for name in [*odd, *mixed]:
        assert name in str(error.value)
    assert "plan.as_lora()" in str(error.value)

    nearest = plan.as_lora()
    assert {nearest.sites[n]["method"] for n in [*odd, *mixed]} == {"lora"}
    assert all(nearest.sites[n] == plan.sites[n] for n in LLAMA)  # what peft expresses stays
    assert len(nearest.provenance["as_lora"]) == len(odd) + len(mixed)
    for name in odd:  # at no more parameters than the site had
        site = graph[name]
        before = methods()[plan.sites[name]["method"]].param_count(
            site, **methods()[plan.sites[name]["method"]].validate(site, **pp.Plan.hyper(plan.sites[name]))
        )
        assert methods()["lora"].param_count(site, rank=nearest.sites[name]["rank"]) <= max(
            before, site.in_features + site.out_features
        )
    theirs = get_peft_model(llama_eager(), nearest.to_peft_config())
    assert sum(p.numel() for p in theirs.parameters() if p.requires_grad) == count_trainable(
        pp.apply(llama_eager(), nearest)
    )


def test_the_axolotl_fragment_builds_the_same_peft_model():
    model = llama_eager()
    recipe = pp.Recipe(lr=3e-4, steps=120, warmup=0.1, schedule="cosine", weight_decay=0.01, batch_size=8)
    entries = LLAMA | {"lm_head": {"method": "full"}}
    plan = pp.Plan(
        sites=entries, model={"fingerprint": fingerprint(model), "class": type(model).__name__}, recipe=recipe
    )
    cfg = yaml.safe_load(plan.to_axolotl())
    assert (
        cfg["adapter"] == "lora"
        and cfg["lora_target_modules"] == list(LLAMA)
        and cfg["lora_modules_to_save"] == ["lm_head"]
    )
    assert (
        cfg["learning_rate"],
        cfg["max_steps"],
        cfg["lr_scheduler"],
        cfg["warmup_ratio"],
        cfg["weight_decay"],
        cfg["micro_batch_size"],
    ) == (3e-4, 120, "cosine", 0.1, 0.01, 8)
    # what axolotl's loader passes to peft's LoraConfig, read from the fragment
    config = LoraConfig(
        r=cfg["lora_r"],
        lora_alpha=cfg["lora_alpha"],
        lora_dropout=cfg["lora_dropout"],
        target_modules=cfg["lora_target_modules"],
        modules_to_save=cfg["lora_modules_to_save"],
        rank_pattern=cfg["lora_rank_pattern"],
        alpha_pattern=cfg["lora_alpha_pattern"],
        use_rslora=cfg.get("peft_use_rslora", False),
        use_dora=cfg.get("peft_use_dora", False),
        task_type="CAUSAL_LM",
    )
    theirs = get_peft_model(llama_eager(), config)
    ours = pp.apply(model, plan)
    assert peft_sites(theirs) == set(plan.tuned())
    assert sum(p.numel() for p in theirs.parameters() if p.requires_grad) == count_trainable(ours)
    for name, module in theirs.base_model.model.named_modules():  # each site at its own rank and scale
        if name in LLAMA:
            assert module.r["default"] == LLAMA[name]["rank"]
            assert module.scaling["default"] == pytest.approx(LLAMA[name]["alpha"] / LLAMA[name]["rank"])
    with torch.no_grad():
        assert theirs(token_ids()).logits.shape == ours(token_ids()).logits.shape


def test_to_peft_is_made_for_training():
    plan = plan_of(llama_eager(), LLAMA)
    configs, unsupported = pp.to_peft(plan)
    model = get_peft_model(llama_eager(), configs["lora"])
    assert unsupported == [] and sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(
        p.numel() for p in trainable_parameters(pp.apply(llama_eager(), plan)).values()
    )

"""`peftplan export`: a tuned model out of peftplan as a merged Hugging Face folder or a peft
adapter, and a plan as a peft or axolotl training config, each read back by its own tool."""

from __future__ import annotations

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import peftplan as pp
from peftplan.backends import count_trainable, trainable_parameters
from peftplan.cli import main
from tests.zoo import char_tokenizer, llama_eager, token_ids

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def tuned(tmp_path):
    """A local HF model directory (with its tokenizer), a plan for it, and that plan trained
    (adapters moved off their start) and saved as `peftplan apply` saves it."""
    base = tmp_path / "base"
    llama_eager().save_pretrained(base)
    char_tokenizer().save_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    plan = pp.search(model, "5%")
    plan.recipe = pp.Recipe(lr=5e-4, steps=40)
    plan.save(tmp_path / "plan.json")
    pp.apply(model, plan)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    pp.save(model, tmp_path / "adapter")
    with torch.no_grad():
        expected = model(token_ids()).logits
    return base, plan, expected


def logits(model):
    with torch.no_grad():
        return model(token_ids()).logits


def test_merged_folder_and_peft_adapter(tuned, tmp_path, capsys):
    base, plan, expected = tuned
    assert main(["export", str(base), str(tmp_path / "adapter"), "-o", str(tmp_path / "merged")]) == 0
    assert "tokenizer" in capsys.readouterr().out  # the model directory's tokenizer came along
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(merged), expected, atol=1e-5, rtol=1e-5)
    assert (
        AutoTokenizer.from_pretrained(tmp_path / "merged")("a cat")["input_ids"]
        == char_tokenizer()("a cat")["input_ids"]
    )

    assert main(["export", str(base), str(tmp_path / "adapter"), "--peft", "-o", str(tmp_path / "peft")]) == 0
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base).eval(), tmp_path / "peft")
    torch.testing.assert_close(logits(theirs), expected, atol=1e-5, rtol=1e-5)


def test_a_plans_untrained_adapter_and_its_configs(tuned, tmp_path):
    base, plan, _ = tuned
    trainable = count_trainable(pp.apply(llama_eager(), plan))
    # the untrained adapter: where axolotl's lora_model_dir starts training from
    assert (
        main(["export", str(base), "--plan", str(tmp_path / "plan.json"), "--peft", "-o", str(tmp_path / "start")]) == 0
    )
    start = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base).eval(), tmp_path / "start", is_trainable=True
    )
    assert sum(p.numel() for p in start.parameters() if p.requires_grad) == trainable
    torch.testing.assert_close(logits(start), logits(llama_eager()), atol=1e-6, rtol=1e-6)  # B = 0: the base model

    assert main(["export", "--config", "peft", "--plan", str(tmp_path / "plan.json"), "-o", str(tmp_path / "cfg")]) == 0
    config = LoraConfig.from_pretrained(tmp_path / "cfg")
    assert config.inference_mode is False and config.rank_pattern == plan.to_peft_config().rank_pattern
    assert sum(p.numel() for p in get_peft_model(llama_eager(), config).parameters() if p.requires_grad) == trainable

    assert (
        main(["export", "--config", "axolotl", "--plan", str(tmp_path / "plan.json"), "-o", str(tmp_path / "ax.yml")])
        == 0
    )
    fragment = yaml.safe_load((tmp_path / "ax.yml").read_text())
    assert fragment["lora_target_modules"] == [n for n, e in plan.tuned().items() if e["method"] == "lora"]
    assert (fragment["learning_rate"], fragment["max_steps"]) == (5e-4, 40)


def test_export_errors_name_the_problem(tuned, tmp_path, capsys):
    base, _, _ = tuned
    assert (
        main(
            [
                "export",
                str(base),
                str(tmp_path / "adapter"),
                "--plan",
                str(tmp_path / "plan.json"),
                "-o",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "one of them" in capsys.readouterr().err
    odd = pp.Plan(
        sites={"model.layers.0.mlp.up_proj": {"method": "adapter", "bottleneck": 2}},
        model={"class": "LlamaForCausalLM"},
    )
    odd.save(tmp_path / "odd.json")
    assert main(["export", str(base), "--plan", str(tmp_path / "odd.json"), "-o", str(tmp_path / "y")]) == 2
    assert "model.layers.0.mlp.up_proj (adapter)" in capsys.readouterr().err
    assert main(["export", "--config", "peft", "--plan", str(tmp_path / "odd.json"), "-o", str(tmp_path / "z")]) == 2
    assert "plan.as_lora()" in capsys.readouterr().err

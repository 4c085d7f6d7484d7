"""`SFTLoop`: trials trained by TRL's SFTTrainer, on a tiny causal LM with prompt/completion
data. The reference for a trial's score is the trained model's own loss on the held-out
completions, tokenized and masked by hand (no TRL)."""

from __future__ import annotations

import copy
import random

import optuna
import pytest
import torch

import peftplan as pp
from peftplan.backends import adapter_tensors, base_state_dict
from tests.zoo import char_tokenizer, qwen2

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    words = "the cat dog sat ran far home".split()
    return [
        {"prompt": " ".join(rng.sample(words, 3)), "completion": " " + " ".join(rng.sample(words, 2))} for _ in range(n)
    ]


def config(tmp_path, **kw):
    return trl.SFTConfig(
        str(tmp_path / "sft"),
        max_steps=10,
        learning_rate=2e-3,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        report_to=[],
        use_cpu=True,
        bf16=False,
        logging_strategy="no",
        disable_tqdm=True,
        max_length=32,
        seed=0,
        **kw,
    )


def loop(tmp_path, **kw):
    from peftplan.integrations.trl import SFTLoop

    return SFTLoop(
        config(tmp_path),
        datasets.Dataset.from_list(rows(32, 0)),
        datasets.Dataset.from_list(rows(8, 1)),
        char_tokenizer(),
        **kw,
    )


def model():
    torch.manual_seed(0)
    return qwen2()


def held_out_loss(tuned, tokenizer) -> float:
    """Mean next-token loss over the held-out completions (and their end token), by hand."""
    ids, labels = [], []
    for row in rows(8, 1):
        prompt = tokenizer(row["prompt"])["input_ids"]
        answer = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(map(len, ids))
    pad = [[0] * (width - len(i)) for i in ids]
    batch = {
        "input_ids": torch.tensor([i + p for i, p in zip(ids, pad)]),
        "attention_mask": torch.tensor([[1] * len(i) + p for i, p in zip(ids, pad)]),
        "labels": torch.tensor([lab + [-100] * len(p) for lab, p in zip(labels, pad)]),
    }
    tuned.eval()
    with torch.no_grad():
        return tuned(**batch).loss.item()


def test_a_three_trial_search_trains_each_trial_with_sft_trainer(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    sft = loop(tmp_path)
    plan = pp.search(model(), "5%", evaluate=sft, trials=3, refine=1, progress=False, storage=url)
    assert plan.recipe.steps == 10 and plan.objectives["metric"] < 0  # minus the eval loss, at the config's length
    trials = [
        t
        for t in optuna.load_study(study_name=plan.provenance["study"], storage=url).trials
        if t.state == optuna.trial.TrialState.COMPLETE
    ]
    assert len({t.user_attrs["rung"] for t in trials}) == 2 and len(trials) >= 3  # screened at 5%, then in full
    assert all(t.values[0] == pytest.approx(-t.user_attrs["validation_loss"]) for t in trials)
    assert len({t.user_attrs["plan"]["recipe"]["lr"] for t in trials}) > 1  # the refinement trains another rate


def test_a_trial_trains_the_adapters_at_its_rate_and_scores_the_held_out_loss(tmp_path):
    sft, base = loop(tmp_path), model()
    task = sft.task(base)
    assert "forward" not in base.__dict__  # TRL patched the copy it was given, not the search's model
    assert (task.train_batches[0]["labels"][:, :4] == -100).all()  # the prompts are not predicted
    plan = pp.search(base, "5%", task=task, strategy="proxy")
    tuned = pp.apply(copy.deepcopy(base), plan)
    start = {k: v.detach().clone() for k, v in adapter_tensors(tuned).items()}
    before = held_out_loss(copy.deepcopy(tuned), char_tokenizer())
    out = sft(tuned, pp.Fidelity(steps=6), pp.Recipe(lr=1e-2, steps=6))
    moved = [k for k, v in adapter_tensors(tuned).items() if not torch.equal(v, start[k])]
    assert sorted(moved) == sorted(start)  # every adapter trained (under TRL's default gradient checkpointing)
    frozen = base.state_dict()
    assert all(torch.equal(t, frozen[k]) for k, t in base_state_dict(tuned).items())  # the base weights did not move
    assert out["loss"] == pytest.approx(held_out_loss(tuned, char_tokenizer()), rel=1e-4) and out["loss"] < before
    assert out["metric"] == pytest.approx(-out["loss"])

    accuracy = loop(tmp_path, metric="mean_token_accuracy")(
        pp.apply(copy.deepcopy(base), plan), pp.Fidelity(steps=2), pp.Recipe()
    )
    assert 0 <= accuracy["metric"] <= 1


def test_an_adapter_on_the_output_layer_is_refused(tmp_path):
    base = model()
    tuned = pp.apply(copy.deepcopy(base), pp.Plan(sites={"lm_head": {"method": "lora", "rank": 2, "alpha": 4}}))
    with pytest.raises(ValueError, match="lm_head.weight directly"):
        loop(tmp_path)(tuned, pp.Fidelity(steps=1), pp.Recipe())

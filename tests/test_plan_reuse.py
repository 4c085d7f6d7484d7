"""Plans that travel: a plan says which model family and task it was found on, and `peftplan
apply` warns where the target differs in family or in the kind of task."""

import json
import random

import pytest

import peftplan as pp
from peftplan.cli import main
from peftplan.describe import provenance, reuse_warnings
from peftplan.planner.training.evaluate import Fidelity
from tests import zoo
from tests.planner.trials import stand_in, tiny_task


def test_a_plan_records_the_model_family_and_task_it_was_found_on():
    task = tiny_task()
    searched = pp.search(
        zoo.bert_classifier(),
        "5%",
        task,
        strategy="random",
        trials=2,
        seeds=2,
        fidelities=[Fidelity()],
        recipe=pp.Recipe(lr=5e-3, steps=2),
        evaluator=stand_in,
        progress=False,
    )
    assert (searched.provenance["model"], searched.provenance["task"]) == ("bert", task.name)
    assert reuse_warnings(searched.provenance, zoo.bert_classifier(), "classification") == []
    data_free = pp.search(zoo.llama(), "5%")  # no task: the model alone
    assert (data_free.provenance["model"], data_free.provenance["task"]) == ("llama", None)
    assert reuse_warnings(data_free.provenance, zoo.llama(), "causal-lm") == []  # no task, no kind to differ from


@pytest.mark.parametrize(
    "found, kind, says",
    [
        ({"task": "sst2", "model": "bert"}, "classification", ["a bert model and is applied to a qwen2"]),
        ({"task": "sst2", "model": "qwen2"}, "causal-lm", ["a classification task ('sst2')"]),
        ({"task": "chat", "kind": "causal-lm"}, "classification", ["a causal-lm task ('chat')"]),
        ({"task": "subj", "model": "qwen2"}, "classification", []),  # another task of the same kind
        ({"task": None}, "causal-lm", []),  # a plan stored before the model was recorded, found without data
    ],
)
def test_reuse_warnings_name_what_differs(found, kind, says):
    warnings = reuse_warnings(found, zoo.qwen2(), kind)  # applied to a qwen2 model
    assert len(warnings) == len(says) and all(s in w for s, w in zip(says, warnings, strict=True))


def test_provenance_without_a_model_records_no_family():
    assert "model" not in provenance("proxy", 0, task="sst2")


def test_apply_warns_when_the_plan_was_found_on_another_model_family(tmp_path, capsys):
    from tests.zoo import char_tokenizer

    pp.search(zoo.llama(), "5%").save(tmp_path / "plan.json")  # found on a llama
    char_tokenizer().save_pretrained(tmp_path / "tok")
    rng = random.Random(0)
    words = "the cat dog sat ran far home".split()
    rows = [{"q": " ".join(rng.sample(words, 3)), "a": " ".join(rng.sample(words, 2))} for _ in range(16)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["apply", "tests.zoo:qwen2", "--plan", str(tmp_path / "plan.json"), "--task", str(tmp_path / "chat.jsonl")]
    argv += ["--causal-lm", "--prompt-column", "q", "--response-column", "a", "--tokenizer", str(tmp_path / "tok")]
    argv += ["--max-length", "24", "--steps", "1", "--batch-size", "4", "--match", "role+depth", "-q"]
    assert main([*argv, "-o", str(tmp_path / "adapter")]) == 0
    out = capsys.readouterr().out
    assert "warning: the plan was found on a llama model and is applied to a qwen2 model" in out
    assert (tmp_path / "adapter" / "plan.json").exists()  # applied and saved all the same

"""Bad and hostile inputs, each answered by an exception of a stated type whose message names
the problem (and the fix), with nothing on disk or in the model lost or half-changed. The
artifact kill -9 tests are in tests/backends/test_atomic_save.py, the worker allowlist in
tests/planner/test_worker_trust.py."""

from __future__ import annotations

import copy
import json
import time
import warnings
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import peftplan as pp
from peftplan.backends import (
    PlanError,
    export_peft,
    import_peft,
    merge,
    remove,
    unmerge,
)
from peftplan.planner.training.evaluate import Fidelity
from tests.backends.adapters import plan_for, snapshot
from tests.zoo import t5, token_ids


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def _untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    """No plan left on ``model``, every parameter trainable again and every value as before."""
    after = snapshot(model)
    return (
        not hasattr(model, "peftplan_plan")
        and all(p.requires_grad for p in model.parameters())
        and after.keys() == before.keys()
        and all(torch.equal(after[k], before[k]) for k in before)
    )


# -- aliased modules ------------------------------------------------------------------------


class Aliased(nn.Module):
    """One Linear under two names (``b`` is ``a``), both called."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 8)
        self.b = self.a
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(torch.relu(self.a(x))))


def test_an_aliased_module_gets_its_adapter_under_every_name(tmp_path):
    model = Aliased()
    w, bias = model.a.weight.detach().clone(), model.a.bias.detach().clone()
    pp.apply(model, plan_for(model, {"a": {"method": "lora", "rank": 2, "alpha": 2}}))
    assert model.b is model.a
    with torch.no_grad():
        model.a.lora_B.fill_(0.1)
    lora_a, lora_b = model.a.lora_A.detach(), model.a.lora_B.detach()
    x = torch.randn(3, 8)
    tuned = w + lora_b @ lora_a  # scaling alpha / rank = 1
    expected = model.head(F.linear(torch.relu(F.linear(x, tuned, bias)), tuned, bias))  # both calls see the delta
    assert torch.allclose(model(x), expected, atol=1e-6)
    pp.save(model, tmp_path / "run")
    loaded = pp.load(Aliased(), tmp_path / "run")
    assert loaded.b is loaded.a and torch.allclose(loaded(x), expected, atol=1e-6)
    remove(model)
    assert type(model.a) is nn.Linear and model.b is model.a


def test_merging_an_aliased_site_is_not_mistaken_for_a_tied_weight():
    model = Aliased()
    pp.apply(model, plan_for(model, {"a": {"method": "lora", "rank": 2}}))
    with torch.no_grad():
        model.a.lora_B.fill_(0.1)
    x = torch.randn(3, 8)
    expected = model(x)
    report = merge(model)
    assert report.merged == ["a"] and not report.left
    assert torch.allclose(model.eval()(x), expected, atol=1e-6)


# -- inputs never validated -----------------------------------------------------------------


def test_a_negative_fidelity_is_an_error():
    with pytest.raises(ValueError, match=r"Fidelity\(steps=-5\): a trial trains at least one step"):
        Fidelity(steps=-5)


def test_negative_labels_are_an_error(tmp_path):
    (tmp_path / "train.tsv").write_text("0\tfine\n-1\tbad\n1\tgood\n")
    (tmp_path / "dev.tsv").write_text("0\tfine\n")
    model = SimpleNamespace(config=SimpleNamespace(num_labels=2))
    with pytest.raises(ValueError, match="label -1: labels are class numbers 0, 1, …; renumber"):
        pp.Task.for_sequence_classification(
            model, object(), tmp_path / "train.tsv", tmp_path / "dev.tsv", validation=None
        )


@pytest.fixture
def sparse_artifact(tmp_path):
    model = _mlp()
    fresh = copy.deepcopy(model)
    pp.apply(model, plan_for(model, {"0": {"method": "sparse", "density": 0.1}}))
    pp.save(model, tmp_path / "run")
    return fresh, tmp_path / "run" / "adapters.safetensors"


@pytest.mark.parametrize(
    "indices, problem",
    [
        (lambda ix: ix + 1000, r"indices must lie in \[0, 256\)"),
        (lambda ix: -ix - 1, r"indices must lie in \[0, 256\)"),
        (lambda ix: torch.zeros_like(ix), "indices must be distinct"),
        (lambda ix: ix.float(), "dtype mismatch.*0.indices: saved torch.float32, model torch.int64"),
    ],
)
def test_bad_sparse_indices_are_refused_at_load(sparse_artifact, indices, problem):
    fresh, path = sparse_artifact
    tensors = load_file(str(path))
    tensors["0.indices"] = indices(tensors["0.indices"])
    save_file(tensors, str(path))
    before = snapshot(fresh)
    with pytest.raises(PlanError, match=problem):
        pp.load(fresh, path.parent)
    assert _untouched(fresh, before)


@pytest.mark.parametrize("rank", [17, 2**40])
def test_a_rank_above_the_weight_size_is_refused_before_allocating(tmp_path, rank):
    model = _mlp()
    plan = plan_for(model, {"0": {"method": "lora", "rank": rank}}).to_dict()
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    before = snapshot(model)
    with pytest.raises(PlanError, match=f"rank {rank} exceeds max\\(in, out\\) = 16.*at most 16"):
        pp.apply(model, pp.Plan.load(tmp_path / "plan.json"))
    assert _untouched(model, before)


# -- merge, then train ----------------------------------------------------------------------


def _merged_mlp() -> nn.Module:
    model = _mlp()
    pp.apply(model, plan_for(model, {"0": {"method": "lora", "rank": 2}, "2": {"method": "full"}}))
    merge(model)
    return model


def test_training_a_merged_model_is_an_error_saying_unmerge_first():
    model = _merged_mlp()
    loss = model(torch.randn(4, 16)).sum()
    with pytest.raises(PlanError, match=r"merged site \(LoRALinear.*unmerge\(model\) before training"):
        loss.backward()
    assert model[0].lora_A.grad is None
    with torch.no_grad():  # inference on a merged model is what merging is for
        model(torch.randn(4, 16))
    unmerge(model)
    model(torch.randn(4, 16)).sum().backward()
    assert model[0].lora_B.grad is not None and model[0].lora_B.grad.abs().sum() > 0


def test_train_refuses_a_merged_model_up_front():
    from peftplan.planner.training.train import train

    task = SimpleNamespace(train_batches=[{}], name="t")
    with pytest.raises(PlanError, match=r"sites \['0'\] are merged.*unmerge\(model\) before training"):
        train(_merged_mlp(), task)


# -- a site that is never called ------------------------------------------------------------


def test_a_tuned_site_the_forward_never_calls_is_warned_about_when_applied():
    model = t5()
    assert "shared" not in {s.name for s in pp.lower(model).sites}  # reached only through its tied copies
    with pytest.warns(
        UserWarning,
        match=r"the plan tunes 1 site\(s\) the model's forward never calls.*\n  shared \(its "
        r"weight is tied to .*encoder.embed_tokens",
    ):
        pp.apply(
            model, plan_for(model, {"shared": {"method": "lora", "rank": 2}, "lm_head": {"method": "lora", "rank": 2}})
        )
    ids = token_ids()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(input_ids=ids, decoder_input_ids=ids)  # said once, when applied


class Spare(nn.Module):
    """An MLP holding a layer its forward never calls, tied to nothing: `apply` cannot tell."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.spare = _mlp(), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_an_unused_module_is_warned_about_on_the_first_forward():
    model = Spare()
    pp.apply(model, plan_for(model, {"body.0": {"method": "lora", "rank": 2}, "spare": {"method": "lora", "rank": 2}}))
    with pytest.warns(UserWarning, match=r"first forward never called 1 tuned site\(s\).*\n  spare\n"):
        model(torch.randn(2, 16))


def test_a_plan_made_by_lowering_is_applied_without_lowering_again(monkeypatch):
    import importlib

    from peftplan.backends import uncalled
    from tests.zoo import gpt2

    applying = importlib.import_module("peftplan.backends.apply")  # the module, not the function it exports

    model = gpt2()  # lm_head's weight is tied to wte; both are called
    plan = pp.search(model, pp.Budget(params="5%"), roles=["attn", "head"])
    assert any(site.get("role") == "head" for site in plan.sites.values())
    for module in (applying, uncalled):  # uncalled.py lowers to check tied sites
        monkeypatch.setattr(module, "lower", lambda *a, **k: pytest.fail("apply lowered a plan that lowering made"))
    pp.apply(model, plan)


def test_no_warning_when_every_tuned_site_is_called():
    model = _mlp()
    pp.apply(model, plan_for(model, {"0": {"method": "lora", "rank": 2}, "2": {"method": "full"}}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.randn(2, 16))
    remove(model)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


# -- untrusted peft configs -----------------------------------------------------------------


@pytest.fixture
def peft_dir(tmp_path):
    model = _mlp()
    pp.apply(model, plan_for(model, {"0": {"method": "lora", "rank": 2}}))
    export_peft(model, tmp_path / "peft")
    return tmp_path / "peft"


def _edit_config(directory, **changes) -> None:
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_a_catastrophic_target_regex_does_not_hang(peft_dir):
    _edit_config(peft_dir, target_modules=r"([\w.]+)+X")  # Python's re takes minutes on a 32-character name
    model = nn.Sequential(OrderedDict(attention_query_projection_layer=nn.Linear(16, 16)))
    start = time.perf_counter()
    with pytest.raises(PlanError, match="matches no tunable module"):
        import_peft(model, peft_dir)
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize(
    "field, value, problem",
    [
        ("target_modules", "(unclosed", r"target_modules '\(unclosed' is not a valid regular expression"),
        ("rank_pattern", {"[": 4}, r"rank/alpha pattern '\[' is not a valid regular expression"),
        ("target_modules", 5, "target_modules must be a regex string or a list of module names, got 5"),
        ("modules_to_save", "0", "modules_to_save must be a list of module names"),
    ],
)
def test_malformed_peft_config_fields_are_named(peft_dir, field, value, problem):
    _edit_config(peft_dir, **{field: value})
    model = _mlp()
    before = snapshot(model)
    with pytest.raises(PlanError, match=problem):
        import_peft(model, peft_dir)
    assert _untouched(model, before)


def test_slow_patterns_are_cut_off(monkeypatch):
    from peftplan.backends import peft_interop

    monkeypatch.setattr(peft_interop, "REGEX_SECONDS", 1e-9)
    with pytest.raises(PlanError, match=r"takes over 1e-09s to match 'a.b' \(catastrophic backtracking\?\)"):
        peft_interop._fullmatch(r"(?:a|b|\.)*c", "a.b" * 1, what="target_modules")


# -- errors that name the problem and the fix ----------------------------------------------


class KeywordsOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.fc(inputs["x"])


def _quantized() -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(4, 4)), {nn.Linear}, dtype=torch.qint8)


@pytest.mark.parametrize(
    "model, problem",
    [
        (_quantized, "holds quantized modules .*plan and apply on the floating-point model, then quantize"),
        (
            lambda: torch.jit.script(nn.Sequential(nn.Linear(4, 4))),
            "TorchScript module.*lower and apply the eager model",
        ),
        (lambda: nn.Linear(32, 32), r"the model is a single Linear.*nn.Sequential\(layer\)"),
    ],
)
def test_lowering_what_cannot_be_tuned_says_why(model, problem):
    from peftplan.ir.lower import LoweringError

    with pytest.raises(LoweringError, match=problem):
        pp.lower(model())


def test_a_keyword_only_model_is_told_how_to_pass_inputs_to_search():
    from peftplan.ir.capture import CaptureError

    with pytest.raises(CaptureError, match=r"search\(\.\.\., graph=lower\(model, example_inputs=\.\.\.\)\)"):
        pp.search(KeywordsOnly(), pp.Budget(params="5%"))
    graph = pp.lower(KeywordsOnly(), {"x": torch.randn(2, 4)})
    assert [s.name for s in graph.sites] == ["fc"]


def test_failed_capture_attempts_print_no_traceback(capfd):
    from peftplan.ir.capture import CaptureError

    with pytest.raises(CaptureError):  # torch.fx's ShapeProp fails first, and used to print its traceback
        pp.lower(KeywordsOnly())
    assert "Traceback" not in capfd.readouterr().err


def test_an_int8_weight_under_lora_is_refused():
    model = nn.Sequential(nn.Linear(4, 4))
    model[0].weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    before = snapshot(model)
    with pytest.raises(PlanError, match="torch.int8 weight; adapters need a floating-point base weight"):
        pp.apply(model, pp.Plan(sites={"0": {"method": "lora", "rank": 2}}))
    assert not hasattr(model, "peftplan_plan") and all(torch.equal(v, before[k]) for k, v in snapshot(model).items())


def test_training_on_the_meta_device_says_materialise_first():
    from peftplan.planner.training.train import train

    with torch.device("meta"):
        model = _mlp()
    pp.apply(model, plan_for(model, {"0": {"method": "lora", "rank": 2}}))
    with pytest.raises(ValueError, match="meta device.*to_empty"):
        train(model, SimpleNamespace(train_batches=[{}], name="t"))


@pytest.mark.parametrize("text", ["infk", "nank", "-5k", "lots"])
def test_unreadable_budgets(text):
    from peftplan.planner.budget import BudgetError

    with pytest.raises(BudgetError, match=f"cannot read budget '{text}': use a count"):
        pp.Budget.parse(text)


def test_plan_load_on_binary_files_and_directories(tmp_path):
    (tmp_path / "plan.json").write_bytes(bytes(range(256)))
    with pytest.raises(PlanError, match="plan.json is not a plan file: it is not UTF-8 text"):
        pp.Plan.load(tmp_path / "plan.json")
    model = _mlp()
    pp.apply(model, plan_for(model, {"0": {"method": "lora", "rank": 2}}))
    pp.save(model, tmp_path / "artifact")
    with pytest.raises(PlanError, match=r"is a directory, not a plan file.*peftplan.load\(model, directory\)"):
        pp.apply(_mlp(), tmp_path / "artifact")


@pytest.mark.parametrize(
    "field, value, problem",
    [
        ("shape", 5, r"'shape' must be \[in_features, out_features\] \(two positive ints\), got 5"),
        ("depth", "deep", r"'depth' must be a number in \[0, 1\].*got 'deep'"),
        ("role", 3, "'role' must be a string"),
    ],
)
def test_mistyped_site_descriptions(field, value, problem):
    with pytest.raises(PlanError, match=problem):
        pp.Plan(sites={"0": {"method": "lora", "rank": 2, field: value}})


@pytest.mark.parametrize(
    "name, content, loader",
    [
        ("adapters.safetensors", b"random bytes" * 10, "load"),
        ("adapter_model.safetensors", b"random bytes" * 10, "import"),
        ("adapter_config.json", b'{"peft_type": "LO', "import"),
    ],
)
def test_damaged_artifact_files_are_named(tmp_path, name, content, loader):
    model = _mlp()
    pp.apply(model, plan_for(model, {"0": {"method": "lora", "rank": 2}}))
    (pp.save if loader == "load" else export_peft)(model, tmp_path)
    (tmp_path / name).write_bytes(content)
    fresh = _mlp()
    before = snapshot(fresh)
    with pytest.raises(PlanError, match=f"{name} is not (a readable safetensors file|valid JSON).*again"):
        (pp.load if loader == "load" else import_peft)(fresh, tmp_path)
    assert _untouched(fresh, before)


def test_a_peft_tensor_of_the_wrong_shape_is_named(peft_dir):
    path = peft_dir / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    save_file({**tensors, key: torch.zeros(3, 16)}, str(path))
    model = _mlp()
    before = snapshot(model)
    with pytest.raises(PlanError, match=f"shape mismatch.*{key}: saved \\(3, 16\\), expected \\(2, 16\\)"):
        import_peft(model, peft_dir)
    assert _untouched(model, before)


@pytest.mark.parametrize(
    "url, problem",
    [
        ("notaurl", "'notaurl' is not a database URL: use sqlite:///study.db"),
        ("sqlite:///{tmp}/missing/study.db", "folder of the SQLite storage .* does not exist: create"),
        ("sqlite:///{tmp}/junk.db", "cannot open the study storage .*not a database"),
    ],
)
def test_bad_storages(tmp_path, url, problem):
    from peftplan.planner.study import StudyError, open_storage

    (tmp_path / "junk.db").write_bytes(b"not sqlite" * 100)
    start = time.perf_counter()
    with pytest.raises(StudyError, match=problem):
        open_storage(url.format(tmp=tmp_path))
    assert time.perf_counter() - start < 2  # no retries for what cannot succeed
    assert not (tmp_path / "missing").exists()


def test_cli_front_on_a_missing_database_creates_nothing(tmp_path, capsys):
    from peftplan.cli import main

    assert main(["front", f"sqlite:///{tmp_path / 'none.db'}", "--csv", str(tmp_path / "f.csv")]) == 2
    assert "no SQLite database at" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert main(["worker", "notaurl"]) == 2
    assert "not a database URL" in capsys.readouterr().err


def test_cli_lower_on_a_directory_without_config(tmp_path, capsys):
    from peftplan.cli import main

    (tmp_path / "pytorch_model.bin").write_bytes(b"\0")
    assert main(["lower", str(tmp_path)]) == 2
    assert "directory without config.json (it holds ['pytorch_model.bin'])" in capsys.readouterr().err


def test_no_trial_fitting_the_limits_names_them():
    import optuna

    from peftplan.planner.study import StudyError
    from peftplan.planner.study.config import ATTR, StudyConfig
    from peftplan.planner.study.run import best_plan

    config = StudyConfig(
        "random",
        1,
        ("metric", "memory"),
        {"metric": "max", "memory": "min"},
        (Fidelity(),),
        {"memory": 1000.0},
        pp.Budget.coerce("1%").to_dict(),
    )
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.set_user_attr(ATTR, config.to_dict())
    with pytest.raises(
        StudyError, match=r"none failed: plans over the limits \{'memory': 1000.0\} are never trained.*raise the"
    ):
        best_plan(study)

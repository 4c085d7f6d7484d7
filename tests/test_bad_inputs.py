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
    return (not hasattr(model, "peftplan_plan") and all(p.requires_grad for p in model.parameters())
            and after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before))  # fmt: skip


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
        pp.Task.for_sequence_classification(model, object(), tmp_path / "train.tsv", tmp_path / "dev.tsv", validation=None)


@pytest.fixture
def sparse_artifact(tmp_path):
    model = _mlp()
    fresh = copy.deepcopy(model)
    pp.apply(model, plan_for(model, {"0": {"method": "sparse", "density": 0.1}}))
    pp.save(model, tmp_path / "run")
    return fresh, tmp_path / "run" / "adapters.safetensors"


@pytest.mark.parametrize("indices, problem", [
    (lambda ix: ix + 1000, r"indices must lie in \[0, 256\)"),
    (lambda ix: -ix - 1, r"indices must lie in \[0, 256\)"),
    (lambda ix: torch.zeros_like(ix), "indices must be distinct"),
    (lambda ix: ix.float(), "dtype mismatch.*0.indices: saved torch.float32, model torch.int64"),
])  # fmt: skip
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


def test_a_tuned_site_the_forward_never_calls_is_warned_about():
    model = t5()
    assert "shared" not in {s.name for s in pp.lower(model).sites}  # reached only through its tied copies
    pp.apply(model, plan_for(model, {"shared": {"method": "lora", "rank": 2}, "lm_head": {"method": "lora", "rank": 2}}))
    ids = token_ids()
    with pytest.warns(UserWarning, match=r"never called 1 tuned site.*\n  shared \(its weight is tied to .*encoder.embed_tokens"):
        model(input_ids=ids, decoder_input_ids=ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(input_ids=ids, decoder_input_ids=ids)  # said once, on the first forward


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


@pytest.mark.parametrize("field, value, problem", [
    ("target_modules", "(unclosed", r"target_modules '\(unclosed' is not a valid regular expression"),
    ("rank_pattern", {"[": 4}, r"rank/alpha pattern '\[' is not a valid regular expression"),
    ("target_modules", 5, "target_modules must be a regex string or a list of module names, got 5"),
    ("modules_to_save", "0", "modules_to_save must be a list of module names"),
])  # fmt: skip
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

"""`export_merged`: the tuned model merged into a plain Hugging Face folder. The reference is
plain transformers in a fresh interpreter that cannot import peftplan: it loads the folder with
``AutoModel*.from_pretrained`` and must give the tuned model's logits."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftplan as pp
from peftplan.backends import count_trainable, methods, trainable_parameters
from tests.backends.adapters import plan_for, snapshot
from tests.zoo import bert_classifier, char_tokenizer, gpt2_eager, llama_eager, token_ids

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# runs with `python -I -S`: no site hooks (so not the editable install's), no current directory;
# only the environment's site-packages folder is put on the path
RELOAD = textwrap.dedent("""
    import sys
    sys.path.append(sys.argv[1])
    try:
        import peftplan
        sys.exit("peftplan is importable here; the check would prove nothing")
    except ModuleNotFoundError:
        pass
    import json, torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    inputs = load_file(sys.argv[3])
    out, ids = {}, {}
    for kind, folder in json.loads(sys.argv[2]).items():
        cls = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
        model = cls.from_pretrained(folder).eval()
        with torch.no_grad():
            out[kind] = model(inputs[kind]).logits.contiguous()
        if kind == "causal":
            ids["text"] = AutoTokenizer.from_pretrained(folder)("merged, at last!")["input_ids"]
    save_file(out, sys.argv[4])
    print(json.dumps(ids))
""")


def reload_elsewhere(folders: dict[str, str], inputs: dict[str, torch.Tensor], tmp_path) -> tuple[dict, dict]:
    save_file(inputs, str(tmp_path / "inputs.safetensors"))
    site_packages = sysconfig.get_paths()["purelib"]
    args = [
        sys.executable,
        "-I",
        "-S",
        "-c",
        RELOAD,
        site_packages,
        json.dumps(folders),
        str(tmp_path / "inputs.safetensors"),
        str(tmp_path / "out.safetensors"),
    ]
    done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(str(tmp_path / "out.safetensors")), json.loads(done.stdout.strip().splitlines()[-1])


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def trained(model, std: float = 0.1) -> None:
    """Every trainable tensor moved off its initial value, as training would (B leaves zero)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * std)


def llama_plan(model):
    entries = {f"model.layers.{i}.self_attn.q_proj": {"method": "lora", "rank": 2 + i, "alpha": 5} for i in range(2)}
    entries |= {
        f"model.layers.{i}.mlp.down_proj": {"method": "dora", "rank": 2, "alpha": 4}
        for i in range(2)
        if "dora" in methods()
    }
    entries |= {
        f"model.layers.{i}.mlp.up_proj": {"method": "ia3", "placement": "input"} for i in range(2) if "ia3" in methods()
    }
    entries |= (
        {"model.layers.1.self_attn.o_proj": {"method": "sparse", "density": 0.1}} if "sparse" in methods() else {}
    )
    return plan_for(model, entries | {"lm_head": {"method": "full"}})


def test_the_merged_folder_loads_with_plain_transformers_and_gives_the_same_logits(tmp_path):
    llama, bert = llama_eager(), bert_classifier().eval()
    pp.apply(llama, llama_plan(llama))
    pp.apply(
        bert,
        plan_for(
            bert,
            {
                "bert.encoder.layer.1.attention.self.value": {"method": "lora", "rank": 4, "alpha": 8},
                "classifier": {"method": "full"},
            },
        ),
    )
    for model in (llama, bert):
        trained(model)
    inputs = {"causal": token_ids(), "classifier": token_ids(vocab=50)}
    expected = {"causal": logits(llama, inputs["causal"]), "classifier": logits(bert, inputs["classifier"])}
    state = snapshot(llama)

    tokenizer = char_tokenizer()
    pp.export_merged(llama, tmp_path / "llama", tokenizer=tokenizer, max_shard_size="20KB")
    pp.export_merged(bert, tmp_path / "bert")
    shards = sorted(p.name for p in (tmp_path / "llama").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "llama" / "model.safetensors.index.json").exists()
    assert not any(
        "lora" in k or ".base." in k for p in (tmp_path / "llama").glob("*.safetensors") for k in load_file(str(p))
    )

    got, ids = reload_elsewhere(
        {"causal": str(tmp_path / "llama"), "classifier": str(tmp_path / "bert")}, inputs, tmp_path
    )
    for kind in expected:
        torch.testing.assert_close(got[kind], expected[kind], atol=1e-5, rtol=1e-5)
    assert ids["text"] == tokenizer("merged, at last!")["input_ids"]
    # the tuned model is unmerged again: the same outputs, its adapters still training
    assert not any(getattr(m, "merged", False) for m in llama.modules())
    torch.testing.assert_close(logits(llama, inputs["causal"]), expected["causal"], atol=1e-6, rtol=1e-6)
    assert all(torch.allclose(v, llama.state_dict()[k], atol=1e-6) for k, v in state.items())
    assert count_trainable(llama) > 0


def test_sites_that_cannot_merge_are_refused_by_name(tmp_path):
    odd = {m: e for m, e in (("adapter", {"bottleneck": 2}), ("moe_lora", {"experts": 2, "rank": 2})) if m in methods()}
    if not odd:
        pytest.skip("no unmergeable method registered")
    model = llama_eager()
    names = {m: f"model.layers.{i}.mlp.gate_proj" for i, m in enumerate(odd)}
    pp.apply(
        model,
        plan_for(
            model,
            {"model.layers.0.self_attn.q_proj": {"method": "lora", "rank": 2, "alpha": 4}}
            | {names[m]: {"method": m, **hp} for m, hp in odd.items()},
        ),
    )
    trained(model)
    before = snapshot(model)
    with pytest.raises(pp.PlanError, match="cannot be merged") as error:
        pp.export_merged(model, tmp_path / "out")
    for method, name in names.items():
        assert f"{name} ({method})" in str(error.value)
    assert not (tmp_path / "out").exists()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # nothing merged, nothing moved


@pytest.mark.skipif("ssf" not in methods(), reason="no ssf method registered")
def test_a_merge_that_adds_a_tensor_the_architecture_lacks_is_refused(tmp_path):
    model = llama_eager()  # its projections have no bias: SSF's shift would merge into a new one
    pp.apply(model, plan_for(model, {"model.layers.1.mlp.gate_proj": {"method": "ssf"}}))
    trained(model)
    expected = logits(model, token_ids())
    with pytest.raises(pp.PlanError, match=r"model.layers.1.mlp.gate_proj \(ssf\): merging gives it 'bias'"):
        pp.export_merged(model, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not model.get_submodule("model.layers.1.mlp.gate_proj").merged
    torch.testing.assert_close(logits(model, token_ids()), expected, atol=1e-6, rtol=1e-6)


def test_a_tied_weight_plain_modules_and_foreign_folders_are_refused(tmp_path):
    gpt2 = gpt2_eager()
    pp.apply(gpt2, plan_for(gpt2, {"lm_head": {"method": "lora", "rank": 2, "alpha": 4}}))
    with pytest.raises(pp.PlanError, match=r"lm_head \(lora\): its weight is shared"):
        pp.export_merged(gpt2, tmp_path / "gpt2")
    plain = pp.apply(torch.nn.Sequential(torch.nn.Linear(4, 4)), pp.Plan(sites={"0": {"method": "lora", "rank": 1}}))
    with pytest.raises(TypeError, match="not a transformers model"):
        pp.export_merged(plain, tmp_path / "plain")

    bert = pp.apply(bert_classifier(), plan_for(bert_classifier(), {"classifier": {"method": "full"}}))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(pp.PlanError, match="notes.txt"):
        pp.export_merged(bert, tmp_path / "mine")
    pp.export_merged(bert, tmp_path / "again")
    pp.export_merged(bert, tmp_path / "again")  # an earlier export is replaced as a whole
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == ["config.json", "model.safetensors"]

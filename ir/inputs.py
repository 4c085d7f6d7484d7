"""Example inputs: normalise what the user gave, or synthesise them from the model.

HF configs know their vocabulary and image sizes; a plain module is fed according to its
first tunable module (features for a Linear, an image for a Conv2d, ids for an Embedding).

    >>> import torch.nn as nn
    >>> args, kwargs = example_inputs(nn.Sequential(nn.Linear(4, 2)))
    >>> args[0].shape
    torch.Size([1, 4])
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

SEQ_LEN = 16


class InputError(ValueError):
    pass


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def normalise(example: Any) -> tuple[tuple, dict]:
    """User inputs as (args, kwargs): a tensor, a tuple of args, or a dict of keyword inputs."""
    if isinstance(example, dict):
        return (), dict(example)
    if isinstance(example, torch.Tensor):
        return (example,), {}
    if isinstance(example, (tuple, list)):
        if len(example) == 2 and isinstance(example[0], tuple) and isinstance(example[1], dict):
            return tuple(example[0]), dict(example[1])
        return tuple(example), {}
    raise InputError(
        f"example_inputs must be a tensor, a tuple of arguments or a dict of keyword inputs, got {type(example).__name__}"
    )


def batch_shape(args: tuple, kwargs: dict) -> tuple[int, int]:
    """(batch, sequence length) of one forward's inputs: of ``input_ids`` (or ``inputs_embeds``),
    else (the first tensor's leading size, 1). Activations grow with both, which is how a cost
    measured at the lowering's example is scaled to a training batch (`Site.tokens_at`).

    >>> batch_shape((), {"input_ids": torch.zeros(8, 64, dtype=torch.long)}), batch_shape((torch.zeros(4, 3),), {})
    ((8, 64), (4, 1))
    """
    for key in ("input_ids", "inputs_embeds"):
        if isinstance(kwargs.get(key), torch.Tensor) and kwargs[key].dim() >= 2:
            return int(kwargs[key].shape[0]), int(kwargs[key].shape[1])
    first = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.dim()), None)
    return (int(first.shape[0]), 1) if first is not None else (1, 1)


def example_inputs(model: nn.Module) -> tuple[tuple, dict]:
    """Synthesised (args, kwargs) for one small batch (batch 1, sequence 16 for text), drawn
    from a generator of its own: lowering leaves torch's global random state as it was."""
    device = model_device(model)
    g = torch.Generator().manual_seed(0)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        return (), _hf_inputs(model, config, device, g)
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            return (torch.randn(1, mod.in_features, generator=g).to(device),), {}
        if isinstance(mod, nn.Conv2d):
            return (torch.randn(1, mod.in_channels, 32, 32, generator=g).to(device),), {}
        if isinstance(mod, nn.Conv1d):
            return (torch.randn(1, mod.in_channels, 32, generator=g).to(device),), {}
        if isinstance(mod, nn.Embedding):
            return (torch.randint(0, mod.num_embeddings, (1, SEQ_LEN), generator=g).to(device),), {}
    raise InputError(
        f"cannot synthesise example inputs for {type(model).__name__}: pass "
        "lower(model, example_inputs=...) with a tensor, a tuple of arguments or a dict of keyword inputs"
    )


def _hf_inputs(model: nn.Module, config, device: torch.device, g: torch.Generator) -> dict[str, Any]:
    main = getattr(model, "main_input_name", "input_ids")
    kwargs: dict[str, Any] = {}
    if main == "pixel_values":
        size = getattr(config, "image_size", 32)
        size = size[0] if isinstance(size, (tuple, list)) else size
        kwargs["pixel_values"] = torch.randn(1, getattr(config, "num_channels", 3), size, size, generator=g).to(device)
    else:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        vocab = getattr(text, "vocab_size", None)
        if not vocab:
            raise InputError(
                f"{type(model).__name__}: its config has no vocab_size to synthesise input_ids from; "
                "pass lower(model, example_inputs={...})"
            )
        ids = torch.randint(0, min(vocab, 1000), (1, SEQ_LEN), generator=g).to(device)
        kwargs["input_ids"] = ids
        if getattr(config, "is_encoder_decoder", False):
            kwargs["decoder_input_ids"] = ids[:, : SEQ_LEN // 2].clone()
    if getattr(config, "use_cache", False):
        kwargs["use_cache"] = False
    return kwargs

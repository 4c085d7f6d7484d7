"""Where and how a model runs: `resolve` turns ``device=`` (None, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, a
`torch.device`) into a device this machine has, `autocast` is the optional bf16 mixed
precision around forward passes, and `inference` the eval-mode, gradient-free scoring context.

    >>> resolve("cpu")
    device(type='cpu')
    >>> resolve("tpu")
    Traceback (most recent call last):
    ...
    ValueError: device='tpu' is not a torch device: give cpu, cuda, cuda:N or mps
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn


def resolve(device: str | torch.device | None = None, model: nn.Module | None = None) -> torch.device:
    """``device`` checked against this machine; None: the model's device when it is not the CPU,
    else CUDA when torch sees a GPU, else the CPU."""
    if device is None:
        here = _device_of(model)
        if here is not None and here.type not in ("cpu", "meta"):
            return here
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a torch device: give cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={str(device)!r}: torch sees no CUDA GPU on this machine (torch {torch.__version__}, "
                f"CUDA build {torch.version.cuda or 'none'}); use device='cpu' (--device cpu)"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                f"cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device='mps': torch sees no Apple GPU here; use device='cpu'")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device={str(device)!r}: peftplan trains on cpu, cuda or mps")
    return device


def check_bf16(device: torch.device, model: nn.Module | None = None) -> None:
    """bf16 autocast where the device cannot run it is an error, not a silent fp32 run; so is
    a float16 ``model`` under CPU autocast, which torch cannot mix with bf16.

    >>> check_bf16(torch.device("cpu"), nn.Linear(2, 2).half())
    Traceback (most recent call last):
    ...
    ValueError: bf16=True on the CPU with Linear's float16 weights: CPU autocast runs bf16 and cannot mix float16 weights into it (torch says "mixed dtype (CPU)"); load the model in float32 (model.float()) or bfloat16 (model.to(torch.bfloat16)), or drop bf16 (--bf16)
    """
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"bf16=True: {torch.cuda.get_device_name(device)} has no bf16 support; train in fp32 (drop --bf16)"
        )
    if device.type == "cpu" and model is not None and any(p.dtype == torch.float16 for p in model.parameters()):
        raise ValueError(
            f"bf16=True on the CPU with {type(model).__name__}'s float16 weights: CPU autocast runs bf16 and "
            'cannot mix float16 weights into it (torch says "mixed dtype (CPU)"); load the model in float32 '
            "(model.float()) or bfloat16 (model.to(torch.bfloat16)), or drop bf16 (--bf16)"
        )


def autocast(device: torch.device, bf16: bool) -> Any:
    """bf16 autocast on ``device`` with ``bf16``, else a no-op context. Weights stay fp32 (the
    optimizer's copies too); matrix products run in bf16."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def release(device: torch.device) -> None:
    """Hand a trial's cached GPU memory back, so the next trial starts from the same free memory."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def inference(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode without gradients; its mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def _device_of(model: nn.Module | None) -> torch.device | None:
    if model is None:
        return None
    p = next(iter(model.parameters()), None)
    return None if p is None else p.device

"""Which modules are tunable, what op each one is, and the model fingerprint.

This is a module walk only (no tracing), so it is cheap enough for ``apply`` to call.

    >>> import torch.nn as nn
    >>> module_op(nn.Linear(4, 2)), module_op(nn.ReLU())
    ('linear', None)
"""

from __future__ import annotations

import hashlib

import torch.nn as nn

from .site import Site


def is_hf_conv1d(module: nn.Module) -> bool:
    """GPT-2 style ``Conv1D``: a linear layer whose weight is stored as (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def is_norm(module: nn.Module) -> bool:
    """LayerNorm, RMSNorm and look-alikes (T5LayerNorm, LlamaRMSNorm, …): a leaf named *Norm*
    with a 1-D weight."""
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)):
        return True
    if next(module.children(), None) is not None:
        return False
    weight = getattr(module, "weight", None)
    return "Norm" in type(module).__name__ and isinstance(weight, nn.Parameter) and weight.dim() == 1


def is_affine_norm(module: nn.Module) -> bool:
    """A torch ``LayerNorm`` or ``GroupNorm`` (or a subclass) with a bias: its output is the
    normalised input times ``weight`` plus ``bias``, so a per-channel scale and shift fold into
    them. Look-alikes may use their weight otherwise (Gemma scales by ``1 + weight``).

    >>> is_affine_norm(nn.LayerNorm(4)), is_affine_norm(nn.LayerNorm(4, bias=False)), is_affine_norm(nn.RMSNorm(4))
    (True, False, False)
    """
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) and getattr(module, "bias", None) is not None


def module_op(module: nn.Module) -> str | None:
    """The site op of a module, or None when it is not tunable."""
    if isinstance(module, nn.Linear) or is_hf_conv1d(module):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Conv1d):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if is_norm(module):
        return "norm"
    return None


def module_features(module: nn.Module) -> tuple[int, int]:
    """(in, out) channel sizes of a tunable module."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_hf_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return module.in_channels, module.out_channels
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    n = module.weight.shape[0]
    return n, n


HEAD_NAMES = ("classifier", "score")  # top-level modules HF classification models add, freshly initialised


def tunable_modules(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """Every tunable module as (path, module, op), in definition order."""
    out = []
    for name, mod in model.named_modules():
        op = module_op(mod)
        if op is not None and name:
            out.append((name, mod, op))
        elif op is not None:
            out.append(("", mod, op))
    return out


def signature(name: str, module: nn.Module, op: str) -> str:
    i, o = module_features(module)
    kernel = "x".join(str(k) for k in getattr(module, "kernel_size", ()))
    return f"{name}|{op}|{i}|{o}|{kernel}"


def fingerprint(model: nn.Module) -> str:
    """Hash of every tunable module's path, op and shape: equal for two models of one layout."""
    h = hashlib.sha256()
    for name, mod, op in tunable_modules(model):
        h.update(signature(name, mod, op).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def count_params(model: nn.Module) -> int:
    """Unique parameters (shared tensors counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def static_site(name: str, module: nn.Module, op: str, **known):
    """A `Site` from the module alone (no tracing): shapes, params and op, no flops or role
    unless given in ``known``. ``apply`` uses it so that applying a plan never re-lowers."""
    i, o = module_features(module)
    own = {id(p): p for p in module.parameters(recurse=False)}
    return Site(
        name=name,
        op=op,
        role=known.pop("role", "other"),
        module_type=type(module).__name__,
        in_features=i,
        out_features=o,
        params=sum(p.numel() for p in own.values()),
        kernel=tuple(getattr(module, "kernel_size", ())),
        groups=getattr(module, "groups", 1),
        bias=getattr(module, "bias", None) is not None,
        affine_norm=is_affine_norm(module),
        **known,
    )

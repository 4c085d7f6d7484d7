"""Independent references the backend tests compare against: what autograd saves for
backward, what torch's FLOP counter counts, and HF peft's layers holding our adapter values."""

from __future__ import annotations

import copy
import re

import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model
from torch.utils.flop_counter import FlopCounterMode

from peftplan.backends import apply, merge
from tests.backends.adapters import perturb, plan_for


def saved_elements(module: nn.Module, x: torch.Tensor) -> int:
    """Reference: elements autograd saves for backward during one forward of ``module``,
    excluding parameters (they live in memory anyway)."""
    params = {p.data_ptr() for p in module.parameters()}
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in params:
            total += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x).sum()
    return total


def matmul_flops(module: nn.Module, x: torch.Tensor) -> int:
    """FLOPs torch's counter sees in one forward (matmuls and convolutions)."""
    with FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops()


def assert_matches_reference(
    got: torch.Tensor, expected: torch.Tensor, base: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor]]
) -> None:
    """Our output equals the reference's and differs from the base model's; so do the gradients
    of each (ours, reference) parameter pair, under a random projection of the output (not
    sum(y²), which is constant after BERT's final LayerNorm)."""
    assert not torch.allclose(got, base, atol=1e-3)  # the adapters are live
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    direction = torch.randn(got.shape, generator=torch.Generator().manual_seed(1))
    (got * direction).sum().backward()
    (expected * direction).sum().backward()
    for mine, theirs in pairs:
        assert mine.grad.abs().max() > 1e-4
        torch.testing.assert_close(mine.grad, theirs.grad.view_as(mine.grad), atol=1e-5, rtol=1e-4)


def copy_lora_weights(ours, theirs, names):
    """Our LoRA values into peft's layers at ``names``; their scalings must equal ours."""
    with torch.no_grad():
        for name in names:
            mine = ours.get_submodule(name)
            other = theirs.base_model.model.get_submodule(name)
            if "default" in other.lora_embedding_A:
                other.lora_embedding_A["default"].copy_(mine.lora_A)
                other.lora_embedding_B["default"].copy_(mine.lora_B)
            else:
                other.lora_A["default"].weight.copy_(mine.lora_A)
                other.lora_B["default"].weight.copy_(mine.lora_B)
            assert other.scaling["default"] == mine.scaling


def _peft_twin(model: nn.Module, ours: nn.Module, entries: dict[str, dict], **options) -> nn.Module:
    """peft's DoRA on the untouched ``model``, holding our adapter values; ``options`` go to
    `LoraConfig` (``use_rslora=True``, say)."""
    config = LoraConfig(
        r=8,
        lora_alpha=8,
        target_modules=list(entries),
        use_dora=True,
        rank_pattern={re.escape(n): e["rank"] for n, e in entries.items()},
        alpha_pattern={re.escape(n): e.get("alpha", 2 * e["rank"]) for n, e in entries.items()},
        **options,
    )
    theirs = get_peft_model(copy.deepcopy(model), config)
    with torch.no_grad():
        for name in entries:
            mine, other = ours.get_submodule(name), theirs.base_model.model.get_submodule(name)
            assert other.scaling["default"] == mine.scaling
            other.lora_A["default"].weight.copy_(mine.lora_A)
            other.lora_B["default"].weight.copy_(mine.lora_B)
            magnitude = other.lora_magnitude_vector["default"].weight
            magnitude.copy_(mine.magnitude.view_as(magnitude))
    return theirs


def compare_dora_with_peft(
    model: nn.Module, entries: dict[str, dict], inputs: torch.Tensor, out=lambda o: o, **options
) -> None:
    """Outputs, gradients and merged weights of our DoRA and peft's on ``model``."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        base = out(model(inputs))
    ours = apply(model, plan_for(model, {n: {"method": "dora", **e} for n, e in entries.items()}))
    perturb(ours)
    theirs = _peft_twin(twin, ours, entries, **options)

    pairs = []
    for name in entries:
        mine, other = ours.get_submodule(name), theirs.base_model.model.get_submodule(name)
        pairs += [
            (mine.lora_A, other.lora_A["default"].weight),
            (mine.lora_B, other.lora_B["default"].weight),
            (mine.magnitude, other.lora_magnitude_vector["default"].weight),
        ]
    # peft treats the column norm as a constant for autograd, and so must we
    got = out(ours(inputs))
    assert_matches_reference(got, out(theirs(inputs)), base, pairs)

    with torch.no_grad():
        merge(ours)
        theirs.merge_adapter()
        torch.testing.assert_close(out(ours(inputs)), got, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out(theirs(inputs)), got, atol=1e-5, rtol=1e-5)
        for name in entries:
            torch.testing.assert_close(
                ours.get_submodule(name).base.weight,
                theirs.base_model.model.get_submodule(name).base_layer.weight,
                atol=1e-6,
                rtol=1e-5,
            )


def assert_same_lora_function(ours: nn.Module, theirs: nn.Module, sites, inputs: torch.Tensor) -> torch.Tensor:
    """Our LoRA model and peft's give the same logits on ``inputs`` and the same gradients of A
    and B at every one of ``sites`` (a loss of their logits' squares); our logits."""
    got, expected = ours(inputs).logits, theirs(inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    got.square().mean().backward()
    expected.square().mean().backward()
    for name in sites:
        mine, other = ours.get_submodule(name), theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(mine.lora_A.grad, other.lora_A["default"].weight.grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(mine.lora_B.grad, other.lora_B["default"].weight.grad, atol=1e-5, rtol=1e-4)
    return got

"""Plans and adapter tensors for the backend tests: a plan with a model's fingerprint,
non-zero or perturbed adapter values, a copy of the weights, a frozen module."""

from __future__ import annotations

import torch
import torch.nn as nn

from peftplan.backends import adapter_tensors
from peftplan.ir.modules import fingerprint
from peftplan.plan import Plan


def plan_for(model: nn.Module, entries: dict[str, dict]) -> Plan:
    """A plan with the model's fingerprint; entries map site names to {"method": ..., hp...}."""
    return Plan(sites=entries, model={"fingerprint": fingerprint(model)})


def randomize(model: nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Give every adapter tensor non-zero values, so the delta actually changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_tensors(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def perturb(model: nn.Module, std: float = 0.1) -> None:
    """Move every adapter tensor off its initial value (B leaves zero, m leaves ||W||)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in adapter_tensors(model).values():
            t.add_(torch.randn(t.shape, generator=g) * std)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def frozen(module: nn.Module) -> nn.Module:
    """``module`` with every parameter frozen, as `apply` leaves the base before wrapping."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module

"""What `apply` leaves on a model, read back: its plan, the adapters' tensors, the base state
dict, the auxiliary loss, the trainable parameters. ``PLAN_ATTR`` and ``UNDO_ATTR`` name the
attributes `apply` sets.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..plan import Plan
from .base import PlanError
from .wrapper import Wrapper

PLAN_ATTR = "peftplan_plan"  # the applied Plan, public: `save` and users read it
UNDO_ATTR = "_peftplan_undo"  # what `remove` needs to restore the model exactly


def applied_plan(model: nn.Module) -> Plan:
    """The plan `apply` put on ``model``; `PlanError` when there is none.

    >>> from peftplan import apply
    >>> plan = Plan(sites={"classifier": {"method": "full"}})
    >>> applied_plan(apply(tiny_bert(), plan)) is plan
    True
    >>> applied_plan(tiny_bert())
    Traceback (most recent call last):
    ...
    peftplan.backends.base.PlanError: this model has no peftplan plan applied; call peftplan.apply(model, plan) first
    """
    plan = getattr(model, PLAN_ATTR, None)
    if plan is None:
        raise PlanError("this model has no peftplan plan applied; call peftplan.apply(model, plan) first")
    return plan


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors of every tuned site, keyed ``"<site>.<name>"``: parameters and
    buffers (a sparse delta's indices, say), base weights of wrapped sites excluded; merged
    sites still give their adapter values.

    >>> from peftplan import apply
    >>> query = "bert.encoder.layer.0.attention.self.query"
    >>> model = apply(tiny_bert(), Plan(sites={query: {"method": "lora", "rank": 2}}))
    >>> sorted(adapter_tensors(model))
    ['bert.encoder.layer.0.attention.self.query.lora_A', 'bert.encoder.layer.0.attention.self.query.lora_B']
    >>> sum(t.numel() for t in adapter_tensors(model).values())  # rank 2 * (32 in + 32 out)
    128
    """
    swapped = set(getattr(model, UNDO_ATTR).swapped) if hasattr(model, UNDO_ATTR) else set()
    out = {}
    for name in applied_plan(model).tuned():
        module = model.get_submodule(name)
        for pname, t in [*module.named_parameters(), *module.named_buffers()]:
            if name in swapped and pname.startswith("base."):
                continue
            out[f"{name}.{pname}"] = t
    return out


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict as the model without peftplan would have it: each wrapped
    site's base module under the site's own name, the adapters' tensors left out. After
    `merge`, the merged weights: what a plain checkpoint of the tuned model holds.

    >>> from peftplan import apply
    >>> model = apply(nn.Sequential(nn.Linear(4, 4)), Plan(sites={"0": {"method": "lora", "rank": 1}}))
    >>> sorted(model.state_dict()), sorted(base_state_dict(model))
    (['0.base.bias', '0.base.weight', '0.lora_A', '0.lora_B'], ['0.bias', '0.weight'])
    """
    swapped = getattr(model, UNDO_ATTR).swapped if hasattr(model, UNDO_ATTR) else []
    out = {}
    for key, t in model.state_dict().items():
        site = next((s for s in swapped if key.startswith(s + ".")), None)
        if site is None:
            out[key] = t
        elif key.startswith(site + ".base."):
            out[site + key[len(site) + len(".base") :]] = t
    return out


def aux_loss(model: nn.Module) -> torch.Tensor | float:
    """The sum of the auxiliary losses of the last forward (a MoE-LoRA router's load-balancing
    loss, say), to add to the task loss while training; 0.0 when no site has one.

    Each site's `Wrapper.aux_loss` gives its own (None by default).

    >>> from peftplan import apply
    >>> moe = {"method": "moe_lora", "experts": 2, "rank": 2, "top_k": 2}
    >>> model = apply(tiny_bert(), Plan(sites={f"bert.encoder.layer.{i}.attention.self.query": moe for i in (0, 1)}))
    >>> aux_loss(model)  # no forward yet
    0.0
    >>> task_loss = model(torch.tensor([[5, 6, 7]]), labels=torch.tensor([1])).loss
    >>> loss = task_loss + 0.01 * aux_loss(model)
    >>> round(aux_loss(model).item(), 4)  # each token uses both experts: each site's balance loss is at its minimum, 1
    2.0
    """
    total: torch.Tensor | float = 0.0
    for module in model.modules():
        if isinstance(module, Wrapper) and module is not model and (value := module.aux_loss()) is not None:
            total = total + value
    return total


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters that require grad, each shared tensor once (what to give the optimizer).

    >>> from peftplan import apply
    >>> query = "bert.encoder.layer.0.attention.self.query"
    >>> plan = Plan(sites={query: {"method": "lora", "rank": 2}, "classifier": {"method": "full"}})
    >>> model = apply(tiny_bert(), plan)
    >>> sorted(trainable_parameters(model))  # doctest: +NORMALIZE_WHITESPACE
    ['bert.encoder.layer.0.attention.self.query.lora_A', 'bert.encoder.layer.0.attention.self.query.lora_B',
     'classifier.bias', 'classifier.weight']
    >>> opt = torch.optim.AdamW(trainable_parameters(model).values(), lr=1e-3)
    >>> len(opt.param_groups[0]["params"])
    4
    """
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def count_trainable(model: nn.Module) -> int:
    """Number of trainable parameter elements, each shared tensor once.

    >>> count_trainable(nn.Linear(4, 2))
    10
    """
    return sum(p.numel() for p in trainable_parameters(model).values())


def _names_by_module(model: nn.Module) -> dict[int, list[str]]:
    """Every name each module is reachable by (one module held as two attributes has two)."""
    out: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        out.setdefault(id(module), []).append(name)
    return out

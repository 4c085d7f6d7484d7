"""`apply` a plan to a model in place; `merge`, `unmerge` and `remove` (``merging.py``) undo it.

``apply`` checks the whole plan against the model before it touches anything, then freezes
every base parameter and swaps each tuned module for its wrapper on the parent module, so HF
model classes, ``generate()`` and ``Trainer`` keep working on the same object:

    >>> import torch.nn as nn
    >>> from peftplan.plan import Plan
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> model = apply(model, Plan(sites={"0": {"method": "lora", "rank": 2}, "2": {"method": "full"}}))
    >>> count_trainable(model)  # 2 * (8 + 8) for the LoRA, 8 * 2 + 2 for the head
    50
    >>> remove(model)[0]
    Linear(in_features=8, out_features=8, bias=True)
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..ir import lower
from ..ir.modules import fingerprint, module_features, module_op, static_site
from ..ir.site import Site
from ..plan import Plan
from .base import Method, PlanError, get_method, listing
from .inspection import (  # noqa: F401  (the helpers and attribute names, importable from here as before)
    PLAN_ATTR,
    UNDO_ATTR,
    _names_by_module,
    adapter_tensors,
    applied_plan,
    aux_loss,
    base_state_dict,
    count_trainable,
    trainable_parameters,
)
from .merging import MergeReport, merge, remove, unmerge, unmergeable  # noqa: F401  (likewise)
from .retarget import by_base_model, retarget
from .uncalled import CALLED_ATTR, _mark_called, _uncalled_tied, _warn, _warn_uncalled  # noqa: F401  (CALLED_ATTR likewise)
from .wrapper import restoring as rebuilding

log = logging.getLogger("peftplan")


@dataclass
class _Undo:
    swapped: list[str]  # names (sites and their aliases) whose module was replaced by a wrapper holding it as `.base`
    trainable_before: set[str]  # parameter names that required grad before `apply`
    watch: list = field(default_factory=list)  # hooks checking that the first forward calls every tuned site
    trained: bool = False  # the adapters hold trained values (`load`, `train`), not a fresh plan's
    said: set[str] = field(default_factory=set)  # sites already warned about as never called (at apply)


def apply(
    model: nn.Module,
    plan: Plan | dict | str | os.PathLike,
    *,
    check: bool = True,
    scores: dict[str, torch.Tensor] | None = None,
    match: str = "name",
    gradients: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Tune ``model`` in place as ``plan`` says and return it.

    ``match="name"`` (default) applies each entry to the site of that name, on a model whose
    fingerprint matches the plan's. ``match="role+depth"`` re-targets the plan onto a model of
    the same family with another depth: each site takes the entry of the same role at the
    nearest relative depth; the mapping is logged and kept in
    ``applied_plan(model).provenance["mapping"]``.

    Every site entry is resolved and validated first, so a bad plan raises `PlanError` with the
    model untouched. ``check=False`` skips the fingerprint and the per-site op/shape comparison
    (sites must still exist and suit their method).

    ``scores`` maps site names to per-element scores shaped like the site's weight (grad² from
    the planner, say), for methods that choose entries by them (``sparse`` with
    ``selection="sensitivity"``): where `Method.needs_scores` says so, ``wrap`` receives
    ``scores=<tensor>``; a site that needs scores and has none is a `PlanError`. Scores for
    other sites are ignored. ``gradients`` maps site names to the weight's mean gradient on a
    few training batches (`peftplan.planner.proxy.scores.mean_gradients` computes them), for a
    LoRA start from them (``init="lora_ga"``, where `Method.needs_gradient` says so); likewise
    a site that needs one and has none is a `PlanError`.

    >>> qv = [f"bert.encoder.layer.{i}.attention.self.{p}" for i in (0, 1) for p in ("query", "value")]
    >>> Plan(sites={name: {"method": "lora", "rank": 4} for name in qv}).save("plan.json")
    PosixPath('plan.json')
    >>> model = apply(tiny_bert(), Plan.load("plan.json"))
    >>> count_trainable(model)  # 4 sites * rank 4 * (32 in + 32 out)
    1024

    Sparse entries chosen by grad² of one labelled batch:

    >>> model, site = tiny_bert(), "bert.encoder.layer.0.output.dense"
    >>> model(torch.tensor([[5, 6, 7]]), labels=torch.tensor([1])).loss.backward()
    >>> grad2 = model.get_submodule(site).weight.grad ** 2
    >>> sparse_plan = Plan(sites={site: {"method": "sparse", "density": 0.01, "selection": "sensitivity"}})
    >>> model = apply(model, sparse_plan, scores={site: grad2})
    >>> count_trainable(model)  # round(0.01 * 64 * 32) entries of the 64-in, 32-out weight
    20
    >>> sorted(model.get_submodule(site).indices.tolist()) == sorted(grad2.flatten().topk(20).indices.tolist())
    True
    """
    if match == "role+depth":
        plan, mapping = retarget(_as_plan(plan), lower(model))
        plan.provenance["mapping"] = mapping
        log.info("re-targeted %d sites by role and depth: %s", len(mapping), mapping)
    elif match != "name":
        raise PlanError(f"match must be 'name' or 'role+depth', got {match!r}")
    return _apply(model, plan, check=check, scores=scores or {}, restoring=False, gradients=gradients or {})


def _apply(
    model: nn.Module,
    plan: Any,
    *,
    check: bool,
    scores: dict[str, torch.Tensor],
    restoring: bool,
    gradients: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """`apply`; ``restoring`` (from `load`) gives sites that need scores a placeholder of zeros,
    as their selection is about to be overwritten from the artifact, and sites that need a
    gradient none (their start is copied in)."""
    plan = _as_plan(plan)
    if hasattr(model, PLAN_ATTR):
        raise PlanError("this model already has a plan applied; call peftplan.remove(model) first")
    moved = by_base_model(plan, model)
    if moved is not None:
        plan = moved
        log.info("%s", plan.provenance["retargeted"])
    todo = _wraps(plan, _resolve(model, plan, check), scores, gradients or {}, restoring)
    uncalled = _uncalled_tied(model, plan, [name for name, *_ in todo]) if not restoring else []
    if uncalled:
        _warn(
            model,
            uncalled,
            f"peftplan: the plan tunes {len(uncalled)} site(s) the model's forward never calls; their "
            "adapters would change nothing and get no gradient",
            stacklevel=4,
        )
    trainable_before = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    for p in model.parameters():
        p.requires_grad_(False)
    setattr(model, PLAN_ATTR, plan)
    setattr(model, UNDO_ATTR, _Undo([], trainable_before, said=set(uncalled)))
    undo = getattr(model, UNDO_ATTR)
    names = _names_by_module(model)
    token = rebuilding.set(restoring)  # the wrappers' own starts are about to be overwritten
    try:
        for _name, module, site, method, hp in todo:
            wrapped = method.wrap(module, site, **hp)
            if wrapped is not module:
                for alias in names[id(module)]:  # `self.b = self.a`: every name calls the adapter
                    parent, _, child = alias.rpartition(".")
                    if getattr(model.get_submodule(parent), child) is module:
                        setattr(model.get_submodule(parent), child, wrapped)
                        undo.swapped.append(alias)
    except BaseException:
        remove(model)  # a method failing half-way must not leave a half-tuned model
        raise
    finally:
        rebuilding.reset(token)
    undo.watch = [model.get_submodule(name).register_forward_pre_hook(_mark_called) for name, *_ in todo]
    undo.watch.append(model.register_forward_hook(_warn_uncalled))
    return model


def _wraps(
    plan: Plan,
    resolved: dict[str, tuple[nn.Module, Site]],
    scores: dict[str, torch.Tensor],
    gradients: dict[str, torch.Tensor],
    restoring: bool,
) -> list[tuple[str, nn.Module, Site, Method, dict[str, Any]]]:
    """(name, module, site, method, its ``wrap`` arguments) of every tuned site of ``plan``,
    each entry validated first; `PlanError` listing every invalid one."""
    errors, todo = [], []
    for name, (module, site) in resolved.items():
        entry = plan.sites[name]
        try:
            method = get_method(entry["method"])
            hp = method.validate(site, **plan.hyper(entry))
            extra = _scores_for(name, module, method, hp, scores, restoring)
            extra |= _gradient_for(name, module, method, hp, gradients, restoring)
        except PlanError as e:
            errors.append(str(e))
            continue
        if method.name != "none":
            todo.append((name, module, site, method, {**hp, **extra}))
    if errors:
        raise PlanError(listing(f"{len(errors)} site entr(ies) of the plan are invalid", errors))
    return todo


def _as_plan(plan: Any) -> Plan:
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, dict):
        return Plan.from_dict(plan)
    if isinstance(plan, (str, os.PathLike)):
        return Plan.load(plan)
    raise TypeError(f"apply() needs a Plan, a plan dict or a path to plan.json, got {type(plan).__name__}")


def _scores_for(
    name: str, module: nn.Module, method: Method, hp: dict[str, Any], scores: dict[str, torch.Tensor], restoring: bool
) -> dict[str, torch.Tensor]:
    """``{"scores": tensor}`` for a site whose method needs scores, ``{}`` otherwise."""
    if not method.needs_scores(**hp):
        return {}
    weight = module.weight
    if name not in scores:
        if restoring:
            return {"scores": torch.zeros(weight.shape, device=weight.device)}
        raise PlanError(
            f"site {name!r}: method {method.name!r} with these hyper-parameters selects entries by "
            f"per-element scores; pass apply(..., scores={{{name!r}: tensor shaped {tuple(weight.shape)}}}) "
            "or use selection='magnitude'"
        )
    return {"scores": _weight_shaped(name, scores[name], weight, "its scores")}


def _gradient_for(
    name: str,
    module: nn.Module,
    method: Method,
    hp: dict[str, Any],
    gradients: dict[str, torch.Tensor],
    restoring: bool,
) -> dict[str, torch.Tensor]:
    """``{"gradient": tensor}`` for a site whose method starts from its weight's gradient, ``{}`` otherwise."""
    if restoring or not method.needs_gradient(**hp):
        return {}
    weight = module.weight
    if name not in gradients:
        raise PlanError(
            f"site {name!r}: {method.name} init {hp.get('init')!r} starts from the weight's mean gradient; pass "
            f"apply(..., gradients={{{name!r}: tensor shaped {tuple(weight.shape)}}}) (mean_gradients in "
            "peftplan.planner.proxy.scores computes them from a task) or use init 'zero'"
        )
    return {"gradient": _weight_shaped(name, gradients[name], weight, "its gradient")}


def _weight_shaped(name: str, given: torch.Tensor, weight: torch.Tensor, what: str) -> torch.Tensor:
    """``given``, or `PlanError` where it is not shaped like site ``name``'s ``weight``."""
    if tuple(given.shape) != tuple(weight.shape):
        raise PlanError(f"site {name!r}: {what} has shape {tuple(given.shape)}, the weight {tuple(weight.shape)}")
    return given


def _resolve(model: nn.Module, plan: Plan, check: bool) -> dict[str, tuple[nn.Module, Site]]:
    """Each plan site's module and static `Site`; `PlanError` listing every site that does not fit."""
    resolved, problems = {}, []
    for name, entry in plan.sites.items():
        try:
            module = model.get_submodule(name) if name else None
        except AttributeError:
            module = None
        op = module_op(module) if module is not None else None
        if module is None or op is None:
            what = "not found in the model" if module is None else f"a {type(module).__name__}, not a tunable module"
            if "quantized" in type(module).__module__:
                what = (
                    f"a quantized {type(module).__name__} ({type(module).__module__}), which adapters cannot wrap: plan "
                    "and apply on the floating-point model, then quantize"
                )
            problems.append(f"{name or '<root>'}: {what}")
            continue
        shape = list(module_features(module))
        if check and entry.get("op", op) != op:
            problems.append(f"{name}: plan says op {entry['op']!r}, model has {op!r} ({type(module).__name__})")
            continue
        if check and list(entry.get("shape", shape)) != shape:
            problems.append(f"{name}: plan says shape {list(entry['shape'])}, model has {shape} (in, out)")
            continue
        known = {k: entry[k] for k in ("role", "depth") if k in entry}
        resolved[name] = (module, static_site(name, module, op, **known))
    expected = plan.model.get("fingerprint")
    actual = fingerprint(model) if check and expected else expected
    if problems or actual != expected:
        head = "the plan does not fit this model"
        if actual != expected:
            head += f" (plan fingerprint {expected}, model {actual})"
        if "retargeted" in plan.provenance:
            head += f"; {plan.provenance['retargeted']}"
        if not problems:
            problems = ["every plan site matches, but the model's other tunable modules differ"]
        hint = "Apply a plan made for this model" + (
            ", or pass check=False to apply to matching sites anyway." if check else "."
        )
        raise PlanError(listing(head, problems) + "\n" + hint)
    return resolved

"""`save` a tuned model as one artifact and `load` it back: ``plan.json`` (the plan, JSON) and
``adapters.safetensors`` (every tuned site's tensors, keyed ``"<site>.<param>"``; no pickle).

    >>> import copy
    >>> from peftplan import apply, search
    >>> base = tiny_llama()
    >>> tuned = apply(copy.deepcopy(base), search(base, "2%"))
    >>> save(tuned, "out/run1")
    PosixPath('out/run1')
    >>> model = load(base, "out/run1")
    >>> applied_plan(model).sites == applied_plan(tuned).sites
    True

The artifact is written as a whole (a temporary directory, fsync, one rename; see
`peftplan.backends.atomic`): a crash or a kill -9 during a re-save leaves the old artifact or
the new one, never the plan of one save beside the tensors of another.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import safetensors.torch
import torch
import torch.nn as nn
from safetensors.torch import save_file

from ..plan import Plan
from .apply import _apply
from .atomic import read_files, replace_dir
from .base import PlanError
from .inspection import UNDO_ATTR, adapter_tensors, applied_plan
from .labels import check_labels
from .merging import remove
from .wrapper import Wrapper

PLAN_FILE = "plan.json"
ADAPTERS_FILE = "adapters.safetensors"


def save(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the applied plan and the adapter tensors of ``model`` into ``directory``.

    A merged model saves its adapter values (not the merged base weights), so `load` on the
    original base model rebuilds it.

    >>> from peftplan import apply
    >>> plan = Plan(sites={"model.layers.0.self_attn.q_proj": {"method": "lora", "rank": 2, "alpha": 4}})
    >>> save(apply(tiny_llama(), plan), "adapter_dir")
    PosixPath('adapter_dir')
    """
    directory = Path(directory)
    plan = applied_plan(model)
    tensors, seen = {}, set()
    for key, t in adapter_tensors(model).items():
        if t.device.type == "meta":
            raise PlanError(f"{key} is on the meta device; load real weights before saving")
        t = t.detach().contiguous()
        if t.untyped_storage().data_ptr() in seen:  # safetensors refuses shared storage (tied weights)
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[key] = t.cpu()
    with replace_dir(directory, names={PLAN_FILE, ADAPTERS_FILE}) as tmp:
        plan.save(tmp / PLAN_FILE)
        save_file(tensors, str(tmp / ADAPTERS_FILE), metadata={"format": "peftplan.adapters", "version": "1"})
    return directory


def load(
    model: nn.Module, directory: str | os.PathLike, *, check: bool = True, labels: Sequence[str] | None = None
) -> nn.Module:
    """Apply the plan saved in ``directory`` to ``model`` and load its adapter tensors.

    ``model`` must carry the same base weights as the one saved. Selections saved as buffers
    (a sparse site's indices) are restored as saved, so no scores are needed here. Missing,
    unexpected or mis-shaped tensors raise `PlanError` and leave ``model`` as it was; so do
    ``labels`` (the class names by id of the task it is for, ``task.labels``) other than the
    ones the artifact was trained with. The loaded weights count as trained: a task's metric
    and `train` check its class names against the artifact's (`peftplan.backends.labels`).

    >>> from peftplan import apply
    >>> _ = save(apply(tiny_bert(), Plan(sites={"classifier": {"method": "full"}})), "adapter_dir")
    >>> model = load(tiny_bert(), "adapter_dir", labels=None)
    >>> applied_plan(model).sites["classifier"]["method"]
    'full'
    """

    directory = Path(directory)
    files = read_files(directory, [PLAN_FILE, ADAPTERS_FILE])
    plan = Plan.from_json(files[PLAN_FILE], directory / PLAN_FILE)
    check_labels(plan.provenance.get("labels"), labels, f"the artifact {directory}")
    path = directory / ADAPTERS_FILE
    saved = read_safetensors(files[ADAPTERS_FILE], path)
    _apply(model, plan, check=check, scores={}, restoring=True)  # saved selections (sparse indices) are copied in below
    try:
        _copy_into(adapter_tensors(model), saved, path)
        _check_states(model, plan, path)
    except BaseException:
        remove(model)
        raise
    getattr(model, UNDO_ATTR).trained = True
    return model


def read_safetensors(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file's bytes; `PlanError` naming ``path`` when it is not one."""
    try:
        return safetensors.torch.load(data)
    except Exception as e:  # safetensors raises its own error type (or OSError) on a bad header
        raise PlanError(
            f"{path} is not a readable safetensors file ({type(e).__name__}: {str(e)[:200]}); "
            "it is damaged or was not written by peftplan: save the artifact again"
        ) from None


def _copy_into(params: dict[str, torch.Tensor], saved: dict[str, torch.Tensor], path: Path) -> None:
    missing = sorted(set(params) - set(saved))
    unexpected = sorted(set(saved) - set(params))
    wrong = [
        f"{k}: saved {tuple(saved[k].shape)}, model {tuple(p.shape)}"
        for k, p in params.items()
        if k in saved and saved[k].shape != p.shape
    ]
    kinds = [
        f"{k}: saved {saved[k].dtype}, model {p.dtype}"
        for k, p in params.items()
        if k in saved and _kind(saved[k].dtype) != _kind(p.dtype)
    ]
    if missing or unexpected or wrong or kinds:
        parts = [
            f"missing {missing[:10]}" if missing else "",
            f"unexpected {unexpected[:10]}" if unexpected else "",
            f"shape mismatch {wrong[:10]}" if wrong else "",
            f"dtype mismatch {kinds[:10]}" if kinds else "",
        ]
        raise PlanError(f"{path} does not match its plan: " + "; ".join(p for p in parts if p))
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(saved[k])


def _kind(dtype: torch.dtype) -> str:
    """Integer, boolean or floating: values of one kind copy into another without meaning."""
    return "bool" if dtype == torch.bool else "float" if dtype.is_floating_point or dtype.is_complex else "int"


def _check_states(model: nn.Module, plan: Plan, path: Path) -> None:
    for name in plan.tuned():
        module = model.get_submodule(name)
        if isinstance(module, Wrapper):
            try:
                module.check_state()
            except PlanError as e:
                raise PlanError(
                    f"{path}: site {name!r}: {e}; the file is damaged or edited: save the artifact again"
                ) from None

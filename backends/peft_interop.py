"""Hugging Face peft interop: write a tuned model as a peft adapter, read a peft adapter back.

What peft expresses, and the configs, are `peftplan.backends.peft_config`'s. A plan mixing
LoRA, DoRA and (IA)³ needs one peft adapter per kind (a LoraConfig cannot hold IA3 sites, and
``use_dora`` is per adapter).

    >>> import copy
    >>> from peft import PeftModel
    >>> base = tiny_bert()
    >>> plan = Plan(sites={"bert.encoder.layer.0.attention.self.query": {"method": "lora", "rank": 4, "alpha": 8}})
    >>> configs, unsupported = to_peft(plan)
    >>> configs["lora"].r, unsupported
    (4, [])
    >>> export_peft(apply(copy.deepcopy(base), plan), "peft_dir").adapters
    {'lora': PosixPath('peft_dir')}
    >>> peft_model = PeftModel.from_pretrained(copy.deepcopy(base), "peft_dir")
    >>> model = import_peft(base, "peft_dir")

One adapter is written at the top of the directory; several go to one sub-directory each
(``dir/lora``, ``dir/ia3``). Load them one after the other: ``PeftModel.from_pretrained(base,
dir/"lora").merge_and_unload()``, then ``PeftModel.from_pretrained(that, dir/"ia3")`` (the
sites are disjoint, so the order does not matter). Only JSON and safetensors are read; peft
itself is needed only for `to_peft`, which returns its config objects, made for training
(``get_peft_model(model, configs["lora"])`` trains the plan's LoRA sites; the written
``adapter_config.json`` is in inference mode, as peft writes its own).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import save_file

from ..ir.modules import fingerprint, module_op, static_site, tunable_modules
from ..ir.site import Site
from ..plan import Plan
from .apply import apply
from .artifact import read_safetensors
from .atomic import read_files, replace_dir
from .base import PlanError, get_method, listing, methods
from .inspection import adapter_tensors, applied_plan
from .merging import remove
from .peft_config import config_object, configs, plan_sites

__all__ = ["PeftExport", "export_peft", "import_peft", "to_peft"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


@dataclass
class PeftExport:
    """What `export_peft` wrote: one directory per peft adapter, and the sites it left out."""

    adapters: dict[str, Path] = field(default_factory=dict)
    unsupported: list[str] = field(default_factory=list)


def to_peft(plan: Plan) -> tuple[dict[str, Any], list[str]]:
    """peft configs for training the parts of ``plan`` peft can express, keyed by adapter
    name (``"lora"``, ``"dora"``, ``"ia3"``), and one reason per site it cannot. One config
    for the whole plan, or an error saying why not: `Plan.to_peft_config`.

    >>> configs, unsupported = to_peft(Plan(sites={"fc": {"method": "lora", "rank": 4}}))
    >>> configs["lora"].target_modules, configs["lora"].inference_mode, unsupported
    ('(?:fc)', False, [])
    """
    dicts, unsupported = configs(plan, plan_sites(plan))
    return {n: config_object(d, plan) for n, d in dicts.items()}, unsupported


def export_peft(model: nn.Module, directory: str | os.PathLike, *, allow_partial: bool = False) -> PeftExport:
    """Write the plan applied to ``model`` and its adapter weights as peft adapter(s).

    Sites peft cannot express raise `PlanError` naming them; ``allow_partial=True`` writes the
    rest and lists them in the result's ``unsupported``.

    >>> plan = Plan(sites={"model.layers.0.self_attn.q_proj": {"method": "lora", "rank": 2, "alpha": 4}})
    >>> export_peft(apply(tiny_llama(), plan), "peft_dir")
    PeftExport(adapters={'lora': PosixPath('peft_dir')}, unsupported=[])
    """
    plan = applied_plan(model)
    sites = {n: _model_site(model, n, e) for n, e in plan.tuned().items()}
    plan, tensors = _from_unchanged_weights(plan, adapter_tensors(model), sites)
    dicts, unsupported = configs(plan, sites, model)
    if unsupported and not allow_partial:
        raise PlanError(
            listing(f"peft cannot express {len(unsupported)} site(s)", unsupported)
            + "\nPass allow_partial=True to export the rest."
        )
    if not dicts:
        raise PlanError("no site of this plan can be expressed in peft; nothing to export")
    result = PeftExport(unsupported=unsupported)
    root = Path(directory)
    with replace_dir(root, names={CONFIG_FILE, WEIGHTS_FILE, "README.md", *dicts}) as tmp:
        for name, config in dicts.items():
            out = Path() if len(dicts) == 1 else Path(name)
            weights = {}
            for site in _config_sites(plan, config):
                entry = plan.sites[site]
                for ours, theirs in _key_map(entry["method"], site, sites[site], model).items():
                    weights[PREFIX + theirs] = (
                        tensors[ours]
                        .detach()
                        .reshape(_peft_shape(theirs, sites[site], entry, tensors[ours]))
                        .contiguous()
                        .cpu()
                    )
            (tmp / out).mkdir(exist_ok=True)
            (tmp / out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
            save_file(_unshared(weights), str(tmp / out / WEIGHTS_FILE), metadata={"format": "pt"})
            result.adapters[name] = root / out
    return result


def _from_unchanged_weights(
    plan: Plan, tensors: dict[str, torch.Tensor], models_site: dict[str, Site]
) -> tuple[Plan, dict[str, torch.Tensor]]:
    """``plan`` and its adapter ``tensors`` with every site started from the weight or its
    gradient (PiSSA, LoRA-GA) as the plain LoRA of
    twice its rank that peft loads onto the unchanged base weight: ``[B, −B0]·[A; A0] = B·A −
    B0·A0`` at the same scaling (alpha doubled, or times sqrt 2 under rsLoRA), as peft converts
    its own PiSSA adapters (``path_initial_model_for_weight_conversion``)."""
    sites, tensors, lora = dict(plan.sites), dict(tensors), get_method("lora")
    for name, entry in plan.tuned().items():
        if entry["method"] != "lora" or plan.hyper(entry).get("init", "zero") == "zero":
            continue
        hp = lora.validate(models_site[name], **plan.hyper(entry))
        if 2 * hp["rank"] > max(models_site[name].in_features, models_site[name].out_features):
            raise PlanError(
                f"site {name!r}: its {hp['init']} start at rank {hp['rank']} exports as a plain LoRA of rank "
                f"{2 * hp['rank']}, above this layer's {models_site[name].in_features}x"
                f"{models_site[name].out_features} weight: export the merged model instead (peftplan.merge, then "
                "save_pretrained)"
            )
        alpha = hp["alpha"] * (math.sqrt(2) if hp["rslora"] else 2)  # the same scaling at twice the rank
        sites[name] = {**entry, "rank": 2 * hp["rank"], "alpha": alpha, "init": "zero"}
        a0, b0 = tensors.pop(f"{name}.lora_A0"), tensors.pop(f"{name}.lora_B0")
        tensors[f"{name}.lora_A"] = torch.cat([tensors[f"{name}.lora_A"], a0.to(tensors[f"{name}.lora_A"].dtype)])
        tensors[f"{name}.lora_B"] = torch.cat([tensors[f"{name}.lora_B"], -b0.to(tensors[f"{name}.lora_B"].dtype)], 1)
    return replace(plan, sites=sites), tensors


def import_peft(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Read a peft LoRA/DoRA or IA3 adapter (``adapter_config.json`` + ``adapter_model.safetensors``)
    into a `Plan` applied to ``model`` with the adapter's weights; returns ``model``.

    >>> import copy
    >>> base = tiny_llama()
    >>> plan = Plan(sites={f"model.layers.{i}.self_attn.{p}_proj": {"method": "lora", "rank": 4, "alpha": 8}
    ...                    for i in (0, 1) for p in "qv"})
    >>> _ = export_peft(apply(copy.deepcopy(base), plan), "peft_dir")
    >>> model = import_peft(base, "peft_dir")
    >>> applied_plan(model).summary()
    'lora: 4 sites, rank 4'
    """

    directory = Path(directory)
    if not (directory / CONFIG_FILE).exists():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {directory}; is it a peft adapter directory?")
    files = read_files(directory, [CONFIG_FILE, WEIGHTS_FILE])
    config = _read_config(files[CONFIG_FILE], directory / CONFIG_FILE)
    saved = read_safetensors(files[WEIGHTS_FILE], directory / WEIGHTS_FILE)
    entries = _entries_from_config(model, config)
    plan = Plan(
        sites=entries,
        model={"fingerprint": fingerprint(model), "class": type(model).__name__},
        provenance={"imported_from": str(directory), "peft_type": config.get("peft_type")},
    )
    apply(model, plan)
    try:
        tensors = adapter_tensors(model)
        wanted = {}
        for site, entry in plan.tuned().items():
            wanted.update(
                {
                    PREFIX + theirs: ours
                    for ours, theirs in _key_map(entry["method"], site, _model_site(model, site, entry), model).items()
                }
            )
        missing, unexpected = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
        if missing or unexpected:
            raise PlanError(
                f"{directory / WEIGHTS_FILE} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        wrong = [
            f"{theirs}: saved {tuple(saved[theirs].shape)}, expected {tuple(tensors[ours].shape)}"
            for theirs, ours in wanted.items()
            if saved[theirs].numel() != tensors[ours].numel()
        ]
        if wrong:
            raise PlanError(
                f"{directory / WEIGHTS_FILE} does not match its config (r, rank_pattern) or this model: "
                f"shape mismatch {wrong[:5]}"
            )
        with torch.no_grad():
            for theirs, ours in wanted.items():
                tensors[ours].copy_(saved[theirs].reshape(tensors[ours].shape))
    except BaseException:
        remove(model)
        raise
    return model


def _read_config(data: bytes, path: Path) -> dict[str, Any]:
    try:
        config = json.loads(data.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PlanError(f"{path} is not valid JSON ({e}); it is damaged: export the adapter again") from None
    if not isinstance(config, dict):
        raise PlanError(f"{path} must hold a JSON object (a peft config), got {type(config).__name__}")
    return config


# -- plan → peft config dicts (adapter_config.json) ------------------------------------------


def _model_site(model: nn.Module, name: str, entry: dict[str, Any]) -> Site:
    module = model.get_submodule(name)
    base = getattr(module, "base", module)
    return static_site(name, base, module_op(base), **{k: entry[k] for k in ("role", "depth") if k in entry})


def _config_sites(plan: Plan, config: dict[str, Any]) -> list[str]:
    targets = config["target_modules"]
    sites = [n for n in plan.tuned() if targets and re.fullmatch(targets, n)]
    return sites + list(config.get("modules_to_save") or [])


# -- weight names -----------------------------------------------------------------------------


def _key_map(method: str, name: str, site: Site, model: nn.Module) -> dict[str, str]:
    """Our adapter tensor key → peft's key (without ``base_model.model.``) for one site."""
    if method == "full":
        return {f"{name}.{p}": f"{name}.{p}" for p, _ in model.get_submodule(name).named_parameters()}
    if method == "ia3":
        return {f"{name}.scale": f"{name}.ia3_l"}
    if site.op == "embedding":
        out = {f"{name}.lora_A": f"{name}.lora_embedding_A", f"{name}.lora_B": f"{name}.lora_embedding_B"}
    else:
        out = {f"{name}.lora_A": f"{name}.lora_A.weight", f"{name}.lora_B": f"{name}.lora_B.weight"}
    if method == "dora":
        out[f"{name}.magnitude"] = f"{name}.lora_magnitude_vector"
    return out


def _peft_shape(key: str, site: Site, entry: dict[str, Any], t: torch.Tensor) -> tuple[int, ...]:
    """peft keeps (IA)³ vectors and DoRA's magnitude of a convolution with singleton axes."""
    n = t.numel()
    if key.endswith("ia3_l"):
        if site.op == "conv2d":
            return (1, n, 1, 1)
        return (1, n) if _is_input(entry, site) else (n, 1)
    if key.endswith("lora_magnitude_vector") and site.op == "conv2d":
        return (1, n, 1, 1)
    return tuple(t.shape)


def _is_input(entry: dict[str, Any], site: Site) -> bool:
    return (
        get_method("ia3").validate(site, **{k: v for k, v in entry.items() if k == "placement"})["placement"] == "input"
    )


def _unshared(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    seen, out = set(), {}
    for k, t in weights.items():
        ptr = t.untyped_storage().data_ptr()
        out[k] = t.clone() if ptr in seen else t  # safetensors refuses shared storage
        seen.add(ptr)
    return out


# -- peft config → plan entries ---------------------------------------------------------------

_KEEPS_BASE_WEIGHTS = ("gaussian", "eva", "orthogonal", "mica")  # peft's named starts that change no base weight
_CHANGES_BASE_WEIGHTS = ("pissa", "corda", "olora", "loftq", "lora_ga")  # (pissa_niter_4 and the like too)
_UNSUPPORTED_FIELDS = (
    "layers_to_transform",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "lora_bias",
)


def _entries_from_config(model: nn.Module, config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    kind = config.get("peft_type")
    if kind not in ("LORA", "IA3"):
        raise PlanError(f"import_peft reads LORA and IA3 adapters, this one is {kind!r}")
    used = [f for f in _UNSUPPORTED_FIELDS if config.get(f)]
    if config.get("bias", "none") != "none":
        used.append(f"bias={config['bias']!r}")
    _check_start(config.get("init_lora_weights", True))
    if used:
        raise PlanError(f"this peft adapter uses {used}, which peftplan cannot import")
    modules = {n: (m, op) for n, m, op in tunable_modules(model)}
    keep = [n for n in modules if _matches_save(config.get("modules_to_save"), n)]
    entries = {n: {"method": "full"} for n in keep}
    exclude = config.get("exclude_modules")
    targets = (
        _all_linear(model, modules)
        if str(config.get("target_modules")).lower() == "all-linear"
        else config.get("target_modules")
    )
    for name, (_, op) in modules.items():
        if name in entries or not _matches(targets, name) or _matches(exclude, name, "exclude_modules"):
            continue
        if kind == "IA3":
            ff = config.get("feedforward_modules") or []
            is_ff = (
                _matches(ff, name, "feedforward_modules") if isinstance(ff, str) else any(name.endswith(k) for k in ff)
            )
            entries[name] = {"method": "ia3", "placement": "input" if is_ff else "output"}
        else:
            entries[name] = _lora_entry(config, name, op)
    if not entries:
        raise PlanError(
            f"target_modules {config.get('target_modules')!r} matches no tunable module of {type(model).__name__}"
        )
    return entries


def _check_start(start: Any) -> None:
    """`PlanError` for an adapter trained from a start that changed its base weights (on the
    unchanged model it would compute something else), or from one peftplan does not know."""
    if not isinstance(start, str) or start.lower() in _KEEPS_BASE_WEIGHTS:
        return
    if start.lower().startswith(_CHANGES_BASE_WEIGHTS):
        raise PlanError(
            f"this peft adapter was trained from init_lora_weights={start!r}, which changes the base weights it "
            "trains against, so on the unchanged model it would compute something else: save it with peft's "
            "save_pretrained(..., path_initial_model_for_weight_conversion=...) (a plain LoRA of twice the rank "
            "on the unchanged weights) and import that"
        )
    raise PlanError(
        f"this peft adapter was trained from init_lora_weights={start!r}, a start peftplan does not know, so it "
        f"cannot tell whether the adapter needs changed base weights; it imports adapters started with True, "
        f"False or {list(_KEEPS_BASE_WEIGHTS)}"
    )


def _lora_entry(config: dict[str, Any], name: str, op: str) -> dict[str, Any]:
    method = "dora" if config.get("use_dora") else "lora"
    if method not in methods():
        raise PlanError(f"this adapter uses DoRA; peftplan has no {method!r} method registered")
    rank = _pattern(config.get("rank_pattern"), name, config.get("r", 8))
    alpha = _pattern(config.get("alpha_pattern"), name, config.get("lora_alpha", 8))
    entry = {"method": method, "rank": rank, "alpha": alpha, "dropout": config.get("lora_dropout", 0.0)}
    if config.get("use_rslora"):
        if "rslora" in get_method(method).hyper:
            entry["rslora"] = True
        else:
            entry["alpha"] = alpha / math.sqrt(rank)
    return entry


def _pattern(patterns: dict[str, Any] | None, name: str, default: Any) -> Any:
    """peft's rank_pattern/alpha_pattern lookup: the first key matching a suffix of the name."""
    for key, value in (patterns or {}).items():
        if _fullmatch(rf"(?:.*\.)?(?:{key})", name, what=f"rank/alpha pattern {key!r}"):
            return value
    return default


def _matches(targets: Any, name: str, field: str = "target_modules") -> bool:
    """peft's target rule: a string full-matches as a regex, a list matches whole name suffixes."""
    if not targets:
        return False
    if isinstance(targets, str):
        return _fullmatch(targets, name, what=f"{field} {targets!r}")
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise PlanError(f"{field} must be a regex string or a list of module names, got {targets!r}")
    return any(name == t or name.endswith("." + t) for t in targets)


REGEX_SECONDS = 0.5  # per module name: ample for any sane pattern, short for a pathological one


def _fullmatch(pattern: str, name: str, *, what: str) -> bool:
    """Whether ``pattern`` full-matches ``name``, for patterns from an untrusted config: the
    ``regex`` engine (which avoids most catastrophic backtracking) with a time limit."""
    import regex

    try:
        return regex.fullmatch(pattern, name, timeout=REGEX_SECONDS) is not None
    except regex.error as e:
        raise PlanError(f"the peft config's {what} is not a valid regular expression ({e}); fix or remove it") from None
    except TimeoutError:
        raise PlanError(
            f"the peft config's {what} takes over {REGEX_SECONDS}s to match {name!r} (catastrophic "
            "backtracking?); use a list of module names or a simpler pattern"
        ) from None


def _matches_save(names: list[str] | None, name: str) -> bool:
    """peft's modules_to_save rule (a name suffix), applied to the module or a container of it."""
    if names is not None and (not isinstance(names, list) or not all(isinstance(m, str) for m in names)):
        raise PlanError(f"modules_to_save must be a list of module names, got {names!r}")
    parts = name.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(p.endswith(m) for m in names or [] for p in prefixes)


def _all_linear(model: nn.Module, modules: dict[str, tuple[nn.Module, str]]) -> list[str]:
    """peft's ``"all-linear"``: every linear layer except the output embedding (an LM head)."""
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    return [n for n, (m, op) in modules.items() if op == "linear" and m is not head]

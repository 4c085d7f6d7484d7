"""A plan as the config of the user's own training stack, before any training: `peft_config`
(one peft config that trains under ``get_peft_model``), `lora_entries` (the nearest plan peft
can express in one config), `axolotl_yaml` (an axolotl config fragment), and the peft config
dicts `peftplan.backends.peft_interop` writes (`configs`).

peft expresses LoRA (per-site ranks and alphas through ``rank_pattern``/``alpha_pattern``,
rsLoRA), DoRA (``use_dora``), (IA)³ (``feedforward_modules`` for input scaling) and full
training of whole modules (``modules_to_save``). Every planned site is targeted by its exact
name, so no other module gets an adapter; ``adapter``, ``sparse``, ``moe_lora`` and ``ssf``
have no peft counterpart.

    >>> from peftplan.plan import Plan
    >>> plan = Plan(sites={"fc": {"method": "lora", "rank": 4, "alpha": 8, "shape": [16, 8]},
    ...                    "norm": {"method": "ssf", "op": "norm", "shape": [8, 8]}})
    >>> lora_entries(plan)[1]
    ['norm: ssf → full (peft trains a norm only whole, through modules_to_save)']

This module reads plans but does not import `peftplan.plan` (which calls it), so that
`Plan.to_peft_config` and `Plan.as_lora` live on the plan.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections import Counter
from typing import Any

import torch.nn as nn

from ..ir.modules import is_hf_conv1d
from ..ir.site import Site
from .base import PlanError, get_method, listing
from .lora import START_LABELS

LORA_OPS = {"linear", "conv2d", "embedding"}
NO_PEFT = {
    "adapter": "bottleneck adapters have no peft counterpart",
    "sparse": "peft has no sparse-delta method",
    "moe_lora": "peft has no mixture-of-LoRA-experts method",
    "ssf": "peft has no scale-and-shift method (its IA3 has no shift)",
}
_ONE_START = "peft starts every site of one adapter alike (init_lora_weights)"
KINDS = ("lora", "dora", "ia3")  # one peft adapter each; ``full`` sites join the first as modules_to_save


def peft_config(plan: Any) -> Any:
    """The one peft config (a ``LoraConfig``, or an ``IA3Config`` for an (IA)³ plan) that
    trains ``plan`` under ``peft.get_peft_model``: the same sites, ranks, alphas, rsLoRA and
    DoRA flags, fully trained modules as ``modules_to_save``, ``inference_mode=False``.

    A plan peft cannot hold in one config is a `PlanError` listing each site it cannot
    express and the changes of the nearest plan it can (`Plan.as_lora`).

    >>> from peftplan.plan import Plan
    >>> peft_config(Plan(sites={"fc": {"method": "lora", "rank": 4, "alpha": 8}})).target_modules
    '(?:fc)'
    """
    dicts, unsupported = configs(plan, plan_sites(plan))
    if len(dicts) > 1:
        keep = next(iter(dicts))
        unsupported += [
            f"{n} ({e['method']}): one peft config holds one kind of adapter, and this plan mixes {' and '.join(dicts)}"
            for n, e in plan.tuned().items()
            if e["method"] in dicts and e["method"] != keep
        ]
    if unsupported:
        _, changes = lora_entries(plan)
        raise PlanError(
            listing(f"peft cannot express {len(unsupported)} site(s) of this plan in one config", unsupported)
            + "\n"
            + listing("The nearest plan it can is plan.as_lora(), which changes", changes)
        )
    if not dicts:
        raise PlanError("the plan tunes no site, so there is no peft config to make")
    return config_object(next(iter(dicts.values())), plan)


def config_object(d: dict[str, Any], plan: Any) -> Any:
    """A config dict of `configs` as peft's config object, made for training: not in
    inference mode, the task type of a causal LM plan set (peft then wraps the model in its
    causal-LM class; other task types would add modules of their own to ``modules_to_save``)."""
    import peft

    cls = {"LORA": peft.LoraConfig, "IA3": peft.IA3Config}[d["peft_type"]]
    task = "CAUSAL_LM" if str(plan.model.get("class", "")).endswith("ForCausalLM") else None
    extra = {"lora_ga_config": peft.LoraGAConfig()} if d.get("init_lora_weights") == "lora_ga" else {}  # its defaults
    return cls(
        **{**{k: v for k, v in d.items() if k != "peft_type"}, "inference_mode": False, "task_type": task, **extra}
    )


def lora_entries(plan: Any) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The site entries of the nearest plan one peft config expresses, and one line per change.

    Sites peft expresses stay (DoRA and (IA)³ where the whole plan is of that kind); the others
    become LoRA at the largest rank whose parameters do not exceed the site's (at least 1),
    a norm becomes ``full`` (peft trains it whole, through ``modules_to_save``), and a site no
    peft method tunes is left out.
    """
    kinds = {e["method"] for e in plan.tuned().values()} - {"full"}
    entries, changes = {}, []
    for name, entry in plan.sites.items():
        method, site = entry["method"], plan_sites(plan, [name]).get(name)
        kept = method in ("none", "lora", "full") or method in ("dora", "ia3") and kinds == {method}
        if kept and (site is None or _why_not(method, site, None) is None):
            entries[name] = dict(entry)
            continue
        new, why = _nearest(site, plan.hyper(entry), method)
        entries[name] = {**{k: v for k, v in entry.items() if k in ("role", "depth", "op", "shape")}, **new}
        changes.append(f"{name}: {method} → {_short(new)} ({why})")
    lora = {n: e for n, e in entries.items() if e["method"] == "lora"}
    if one_start(lora) is None:  # mixed: every site from zero, peft's default
        for name in _started(lora):
            start = entries[name]["init"]
            entries[name] = {**entries[name], "init": "zero"}
            changes.append(f"{name}: lora from a {START_LABELS[start]} start → from zero ({_ONE_START})")
    return entries, changes


def _nearest(site: Site, hp: dict[str, Any], method: str) -> tuple[dict[str, Any], str]:
    if site.op == "norm":
        return {"method": "full"}, "peft trains a norm only whole, through modules_to_save"
    if site.op not in LORA_OPS:
        return {"method": "none"}, f"no peft method tunes a {site.op} layer"
    width = site.in_features + site.out_features
    if width:
        params = get_method(method).param_count(site, **get_method(method).validate(site, **hp))
        rank = max(1, min(params // width, site.in_features, site.out_features))
        why = f"at most its {params:,} params"
    else:  # a plan entry without its shape: keep the rank it has
        rank, why = int(hp.get("rank", 1)), "the same rank"
    alpha = hp["alpha"] if method == "dora" and "alpha" in hp else 2 * rank
    return {"method": "lora", "rank": rank, "alpha": alpha}, why


def _short(entry: dict[str, Any]) -> str:
    return entry["method"] + (f" rank {entry['rank']}" if "rank" in entry else "")


def axolotl_yaml(plan: Any) -> str:
    """An axolotl config fragment (YAML) for ``plan``: the LoRA keys (``adapter``, ``lora_r``,
    ``lora_alpha``, ``lora_dropout``, ``lora_target_modules`` by exact module name,
    ``lora_rank_pattern``/``lora_alpha_pattern`` for the sites that differ,
    ``lora_modules_to_save``, ``peft_use_dora``/``peft_use_rslora``, ``peft_init_lora_weights``
    for a PiSSA start) and, from ``plan.recipe``, the learning rate, schedule, warm-up, length,
    weight decay, clipping and LoRA+'s ``loraplus_lr_ratio``. What axolotl cannot train as
    planned is refused (`_axolotl_can`).

    >>> from peftplan.plan import Plan
    >>> print(axolotl_yaml(Plan(sites={"fc": {"method": "lora", "rank": 4, "alpha": 8}})))  # doctest: +ELLIPSIS
    adapter: lora
    lora_r: 4
    lora_alpha: 8
    ...
    """
    config = _axolotl_can(peft_config(plan))
    tuned = [n for n, e in plan.tuned().items() if e["method"] != "full"]
    fields: dict[str, Any] = {
        "adapter": "lora",
        "lora_r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "lora_target_modules": tuned,
    }
    if config.rank_pattern or config.alpha_pattern:
        fields |= {"lora_rank_pattern": dict(config.rank_pattern), "lora_alpha_pattern": dict(config.alpha_pattern)}
    if config.modules_to_save:
        fields["lora_modules_to_save"] = list(config.modules_to_save)
    if config.init_lora_weights is not True:  # a start from the weights: axolotl hands it to peft
        fields["peft_init_lora_weights"] = config.init_lora_weights
    fields |= {
        k: True
        for k, on in (
            ("peft_use_dora", config.use_dora),
            ("peft_use_rslora", config.use_rslora),
            ("lora_fan_in_fan_out", config.fan_in_fan_out),
        )
        if on
    }
    fields |= _recipe_fields(plan.recipe)
    head = (
        []
        if "lora_rank_pattern" not in fields
        else [
            "# lora_rank_pattern / lora_alpha_pattern are peft's rank_pattern / alpha_pattern (regexes of module names).",
            "# An axolotl that does not pass them on to peft trains every target at lora_r: start it instead from the",
            "# plan's initial adapter, lora_model_dir: <the folder `peftplan export MODEL --plan plan.json --peft` writes>.",
        ]
    )
    return "\n".join(head + [line for key, value in fields.items() for line in _yaml(key, value)]) + "\n"


def _recipe_fields(recipe: Any) -> dict[str, Any]:
    """axolotl's names (those of transformers' TrainingArguments) for a `Recipe`'s fields."""
    if recipe is None:
        return {}
    schedule = "constant_with_warmup" if recipe.schedule == "constant" and recipe.warmup else recipe.schedule
    out = {
        "learning_rate": recipe.lr,
        "lr_scheduler": schedule,
        "warmup_ratio": recipe.warmup,
        "weight_decay": recipe.weight_decay,
        "max_grad_norm": recipe.clip or 0.0,
    }
    out |= {"max_steps": recipe.steps} if recipe.steps else {"num_epochs": recipe.epochs or 1}
    out |= {"loraplus_lr_ratio": recipe.lr_ratio} if recipe.lr_ratio != 1.0 else {}
    return out | ({"micro_batch_size": recipe.batch_size} if recipe.batch_size else {})


def _yaml(key: str, value: Any) -> list[str]:
    """``key: value`` as block YAML; strings and numbers as JSON scalars, which YAML reads alike."""
    if isinstance(value, dict):
        return (
            [f"{key}:"] + [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in value.items()]
            if value
            else [f"{key}: {{}}"]
        )
    if isinstance(value, list):
        return [f"{key}:"] + [f"  - {json.dumps(v)}" for v in value]
    return [f"{key}: {json.dumps(value) if not isinstance(value, str) or not value.isidentifier() else value}"]


# -- plan → peft config dicts (adapter_config.json) ------------------------------------------


def plan_sites(plan: Any, names: list[str] | None = None) -> dict[str, Site]:
    """Sites built from plan entries alone (op, shape, role), for configs without a model."""
    out = {}
    for name, e in plan.tuned().items():
        if names is None or name in names:
            n_in, n_out = e.get("shape", (0, 0))  # unknown: no rank limit to check
            out[name] = Site(
                name=name,
                op=e.get("op", "linear"),
                role=e.get("role", "other"),
                module_type="",
                in_features=n_in,
                out_features=n_out,
                params=0,
            )
    return out


def configs(plan: Any, sites: dict[str, Site], model: nn.Module | None = None) -> tuple[dict[str, dict], list[str]]:
    """peft config dicts by adapter kind (`KINDS`, in that order) for the sites peft can
    express, and one reason per site it cannot."""
    groups: dict[str, dict[str, dict]] = {k: {} for k in KINDS}
    full, unsupported = [], []
    for name, entry in plan.tuned().items():
        method, site = entry["method"], sites[name]
        hp = get_method(method).validate(site, **plan.hyper(entry))
        why = _why_not(method, site, model)
        if why:
            unsupported.append(f"{name} ({method}): {why}")
        elif method == "full":
            full.append(name)
        else:
            groups[method][name] = hp
    unsupported += _mixed_starts(groups["lora"])
    dicts = {
        k: _ia3_config(v, model) if k == "ia3" else _lora_config(v, k == "dora", model) for k, v in groups.items() if v
    }
    if full:
        if not dicts:
            dicts["lora"] = _lora_config({}, False, model)  # a LoRA adapter with only modules_to_save
        next(iter(dicts.values()))["modules_to_save"] = full
    return dicts, unsupported


def _axolotl_can(config: Any) -> Any:
    """``config``, or `PlanError` where axolotl cannot train it as planned: an (IA)³ plan, or
    a LoRA-GA start (axolotl never runs peft's ``preprocess_loraga``, so peft would start
    those sites at random)."""
    if config.peft_type != "LORA":
        raise PlanError(
            "axolotl's adapters are LoRA and DoRA; this is an (IA)³ plan: use plan.as_lora(), or train it "
            "with peft (plan.to_peft_config())"
        )
    if config.init_lora_weights == "lora_ga":
        raise PlanError(
            "this plan starts its LoRA sites from their gradients (init 'lora_ga'), which peft computes only when "
            "peft.preprocess_loraga runs before get_peft_model; axolotl does not run it and would start "
            "them at random: train it with peft (plan.to_peft_config() and preprocess_loraga) or with peftplan"
        )
    return config


def one_start(lora: dict[str, dict]) -> str | None:
    """How every one of ``lora``'s sites (entries or hyper-parameters) starts ("zero" when
    there are none), or None where they differ: peft starts every site of one adapter alike
    (``init_lora_weights``)."""
    starts = {hp.get("init", "zero") for hp in lora.values()} or {"zero"}
    return starts.pop() if len(starts) == 1 else None


def _started(lora: dict[str, dict]) -> list[str]:
    """The sites of ``lora`` that do not start at zero."""
    return [n for n, hp in lora.items() if hp.get("init", "zero") != "zero"]


def _mixed_starts(lora: dict[str, dict]) -> list[str]:
    """Where ``lora`` mixes starts (`one_start`), the sites that do not start at zero, taken out
    of it (in place) and named: peft cannot hold them in the same adapter."""
    if one_start(lora) is not None:
        return []
    said = [
        f"{n} (lora): {_ONE_START}, and this plan mixes zero and {START_LABELS[lora[n]['init']]} starts"
        for n in _started(lora)
    ]
    for name in _started(lora):
        del lora[name]
    return said


def _why_not(method: str, site: Site, model: nn.Module | None) -> str | None:
    if method in NO_PEFT:
        return NO_PEFT[method]
    if method in ("lora", "dora", "ia3"):
        ops = LORA_OPS if method == "lora" else {"linear", "conv2d"}
        return None if site.op in ops else f"peft's {method} does not tune {site.op} layers"
    if method == "full":
        if model is not None and _shares_weights(model, site.name):
            return "its weights are shared with another module; peft's modules_to_save would untie them"
        return None
    return f"no peft counterpart is known for method {method!r}"


def _shares_weights(model: nn.Module, name: str) -> bool:
    own = {id(p) for p in model.get_submodule(name).parameters()}
    return any(
        id(p) in own
        for n, m in model.named_modules()
        if n != name and not n.startswith(name + ".") and not name.startswith(n + ".")
        for p in m.parameters(recurse=False)
    )


def exact(names: list[str]) -> str:
    """A regex peft full-matches against module names: exactly these sites."""
    return "(?:" + "|".join(re.escape(n) for n in names) + ")"


def _lora_config(sites: dict[str, dict], dora: bool, model: nn.Module | None) -> dict[str, Any]:
    rslora = {hp.get("rslora", False) for hp in sites.values()} == {True}
    # peft's scaling is alpha/r (alpha/sqrt(r) with use_rslora); a mixed plan folds rsLoRA into alpha
    alphas = {
        n: hp["alpha"] * (math.sqrt(hp["rank"]) if hp.get("rslora") and not rslora else 1) for n, hp in sites.items()
    }
    ranks = {n: hp["rank"] for n, hp in sites.items()}
    r = Counter(ranks.values()).most_common(1)[0][0] if sites else 8
    alpha = Counter(alphas.values()).most_common(1)[0][0] if sites else 8
    dropouts = Counter(hp.get("dropout", 0.0) for hp in sites.values())
    if len(dropouts) > 1:
        warnings.warn(
            f"peft has one lora_dropout per adapter; the plan has {sorted(dropouts)}, exporting the most common",
            stacklevel=3,
        )
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropouts.most_common(1)[0][0] if sites else 0.0,
        "target_modules": exact(list(sites)) if sites else [],
        "rank_pattern": {re.escape(n): v for n, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(n): v for n, v in alphas.items() if v != alpha},
        "use_rslora": rslora,
        "use_dora": dora,
        "bias": "none",
        "init_lora_weights": True if one_start(sites) == "zero" else one_start(sites),
        "fan_in_fan_out": _all_conv1d(model, sites),
        "modules_to_save": None,
    }


def _ia3_config(sites: dict[str, dict], model: nn.Module | None) -> dict[str, Any]:
    inputs = [n for n, hp in sites.items() if hp["placement"] == "input"]
    return {
        "peft_type": "IA3",
        "task_type": None,
        "base_model_name_or_path": None,
        "inference_mode": True,
        "target_modules": exact(list(sites)),
        "feedforward_modules": exact(inputs) if inputs else [],
        "fan_in_fan_out": _all_conv1d(model, sites),
        "init_ia3_weights": True,
        "modules_to_save": None,
    }


def _all_conv1d(model: nn.Module | None, sites: dict) -> bool:
    """peft flips fan_in_fan_out per layer anyway; setting it right avoids a warning per layer."""
    if model is None or not sites:
        return False
    return all(is_hf_conv1d(getattr(m := model.get_submodule(n), "base", m)) for n in sites)

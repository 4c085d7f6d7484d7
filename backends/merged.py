"""`export_merged`: a tuned model merged into its base weights and written as a plain Hugging
Face folder — ``config.json``, safetensors shards (with their index when there are several),
the tokenizer when it is known — that ``AutoModel*.from_pretrained`` loads with no peftplan
installed, with the same outputs: for serving, or for training on elsewhere.

    >>> import peftplan as pp
    >>> from transformers import AutoModelForCausalLM
    >>> model = tiny_llama()
    >>> export_merged(pp.apply(model, pp.search(model, "2%")), "merged", tokenizer=chat_tokenizer())
    PosixPath('merged')
    >>> type(AutoModelForCausalLM.from_pretrained("merged")).__name__
    'LlamaForCausalLM'

The model is merged only while it is written: afterwards its sites are unmerged again (as
`peftplan.unmerge` does, up to float rounding), so it trains on or is saved with
`peftplan.save` as before. A site whose method cannot merge (a
bottleneck adapter, MoE-LoRA with several experts, SSF on a norm without a bias) or whose
weight is tied to another module is refused by name before anything is written.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch.nn as nn

from .atomic import replace_dir
from .base import PlanError, listing
from .inspection import applied_plan, base_state_dict
from .merging import merge, unmergeable

__all__ = ["export_merged"]

# what save_pretrained of a model and its tokenizer write: an earlier export may be replaced
HF_FILE = re.compile(
    r"config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json"
    r"|tokenizer(_config)?\.json|special_tokens_map\.json|added_tokens\.json|chat_template\.(jinja|json)"
    r"|vocab\.(json|txt)|merges\.txt|[\w.-]+\.model"
)


def export_merged(
    model: nn.Module, directory: str | os.PathLike, *, tokenizer: Any = None, max_shard_size: int | str | None = None
) -> Path:
    """Write ``model`` (a transformers model with a plan applied and trained) with every
    site merged into its base weights, as a Hugging Face folder at ``directory``.

    ``tokenizer``: a tokenizer (or processor) to save beside it, or the directory to load one
    from; by default the model's own directory's (``model.name_or_path``) when it holds one,
    else none. ``max_shard_size``: passed to ``save_pretrained`` (default: transformers').
    The folder is written as a whole (a temporary directory and one rename); a directory
    holding files other than a model's is refused rather than replaced.

    >>> import peftplan as pp
    >>> from transformers import AutoModelForCausalLM
    >>> tiny_llama().save_pretrained("base")
    >>> base = AutoModelForCausalLM.from_pretrained("base")
    >>> _ = pp.save(pp.apply(base, pp.search(base, "2%")), "adapter")
    >>> export_merged(pp.load(AutoModelForCausalLM.from_pretrained("base"), "adapter"), "merged")
    PosixPath('merged')
    """
    plan = applied_plan(model)
    if not callable(getattr(model, "save_pretrained", None)):
        raise TypeError(
            f"export_merged writes a Hugging Face folder, and {type(model).__name__} is not a transformers model "
            "(it has no save_pretrained): save its adapters with peftplan.save(model, dir), or "
            "peftplan.merge(model) and save its state_dict yourself"
        )
    left = unmergeable(model)
    if left:
        reasons = [f"{n} ({plan.sites[n]['method']}): {why}" for n, why in left.items()]
        raise PlanError(
            listing(f"{len(reasons)} site(s) cannot be merged into the base weights", reasons)
            + "\nA merged export needs every site merged: re-plan without them (plan.as_lora() maps them to LoRA), "
            "or export the adapters instead (peftplan.save, peftplan.export_peft)"
        )
    saver = _tokenizer(model, tokenizer)
    before = {n for n in plan.tuned() if getattr(model.get_submodule(n), "merged", False)}
    keys = set(base_state_dict(model))
    report = merge(model)
    try:
        state = base_state_dict(model)
        _check_architecture(plan, sorted(set(state) - keys))
        target = Path(directory)
        existing = {p.name for p in target.iterdir() if HF_FILE.fullmatch(p.name)} if target.is_dir() else set()
        with replace_dir(target, names=existing) as tmp:
            options = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
            model.save_pretrained(tmp, state_dict=state, **options)
            if saver is not None:
                saver.save_pretrained(tmp)
    finally:
        for name in report.merged:
            module = model.get_submodule(name)
            if name not in before and hasattr(module, "unmerge"):
                module.unmerge()
    return target


def _check_architecture(plan: Any, added: list[str]) -> None:
    """Merging must not add tensors (SSF's shift gives a layer without a bias one): the model's
    class has no place for them, so ``from_pretrained`` would drop them and compute otherwise."""
    if not added:
        return
    sites = [
        f"{site} ({plan.sites[site]['method']}): merging gives it {key.rsplit('.', 1)[-1]!r}, which its layer does not have"
        for key in added
        for site in [key.rsplit(".", 1)[0]]
        if site in plan.sites
    ]
    raise PlanError(
        listing(
            f"merging adds {len(added)} tensor(s) the model's architecture has no place for; "
            "from_pretrained would drop them",
            sites or added,
        )
        + "\nPlan these sites without a shift (or with LoRA), or export the adapters instead (peftplan.save)"
    )


def _tokenizer(model: nn.Module, tokenizer: Any) -> Any:
    """What saves the tokenizer: the one given, the one in the directory given, or the one in
    the model's own directory; None when there is none to find."""
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        if not callable(getattr(tokenizer, "save_pretrained", None)):
            raise TypeError(f"tokenizer= takes a Hugging Face tokenizer or a directory, got {type(tokenizer).__name__}")
        return tokenizer
    spec = tokenizer if tokenizer is not None else getattr(model, "name_or_path", None)
    where = Path(spec) if spec else None
    known = (
        where is not None
        and where.is_dir()
        and any((where / f).exists() for f in ("tokenizer_config.json", "tokenizer.json"))
    )
    if not known:
        if tokenizer is not None:
            raise FileNotFoundError(f"no tokenizer in {tokenizer} (no tokenizer_config.json or tokenizer.json)")
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(where)

"""peftplan.backends — rewriting: HOW a model is tuned (model + `Plan` → tuned model).

One module per method, each registering a `Method` by name; importing this package registers
them all. The verbs work in place on the model:

    >>> import peftplan as pp
    >>> model = tiny_llama()
    >>> model = pp.apply(model, pp.search(model, "2%"))
    >>> pp.save(model, "adapter_dir")
    PosixPath('adapter_dir')
    >>> pp.merge(model).left  # sites left unmerged, with the reason
    {}
    >>> model = pp.remove(model)
"""

from . import adapter, dora, full, ia3, lora, moe_lora, none, sparse, ssf  # noqa: F401  (registers the methods)
from .apply import apply
from .artifact import load, save
from .base import Method, PlanError, get_method, methods, register
from .inspection import adapter_tensors, applied_plan, aux_loss, base_state_dict, count_trainable, trainable_parameters
from .merged import export_merged
from .merging import MergeReport, merge, remove, unmerge, unmergeable
from .peft_interop import export_peft, import_peft, to_peft

__all__ = [
    "Method",
    "MergeReport",
    "PlanError",
    "adapter_tensors",
    "aux_loss",
    "applied_plan",
    "apply",
    "base_state_dict",
    "count_trainable",
    "export_merged",
    "export_peft",
    "get_method",
    "import_peft",
    "load",
    "merge",
    "methods",
    "register",
    "remove",
    "save",
    "to_peft",
    "trainable_parameters",
    "unmerge",
    "unmergeable",
]

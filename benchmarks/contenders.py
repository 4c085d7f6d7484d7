"""The quality study's contenders: the final recipe, peft's baselines and full fine-tuning
(`build`), peftplan's probe plans (`PROBES`, `probe_plan`), and how one is trained and scored
(`train_and_score`). benchmarks/quality.py runs them."""

from __future__ import annotations

import copy

from common import all_linear_ranks, fully_trainable

# scored as every search trial is: the product's own scoring
from peftplan.planner.training.evaluate import metric_and_loss

BUDGET = 74_498  # peft LoRA r=8 on query/value of MiniLM-L6 plus the 2-way head
QV, QKVO = ["query", "value"], ["query", "key", "value", "attention.output.dense"]


def recipe(steps: int, lr: float, lr_ratio: float = 1.0):
    from peftplan.recipe import Recipe

    return Recipe(lr=lr, steps=steps, warmup=0.06, schedule="linear", batch_size=32, lr_ratio=lr_ratio)


PROBES = {  # peftplan plans of methods the default space leaves out (first task only): kind -> (label, lr grid)
    "lora-qv-r7+ssf-norms": ("peftplan probe: LoRA r7 q,v + SSF on every LayerNorm", (2e-3, 5e-3)),
    "lora-qv-r4+ssf-rest": ("peftplan probe: LoRA r4 q,v + SSF on k, o, MLP, pooler", (5e-3,)),
    "ssf-all": ("peftplan probe: SSF on every linear layer, LayerNorm, the pooler", (1e-2,)),
    "sparse-linear": (
        "peftplan probe: sparse (0.69% of entries by magnitude) on every linear layer",
        (5e-4, 2e-3, 5e-3),
    ),
    "lora-qv+loraplus": ("peftplan probe: LoRA r8 q,v with LoRA+ (B at 16x the rate)", (5e-4, 1e-3, 2e-3)),
}
LR_RATIO = {"lora-qv+loraplus": 16.0}  # probes trained with LoRA+ (`Recipe.lr_ratio`)


def probe_plan(graph, kind: str, lr: float, steps: int):
    """The plan of probe ``kind`` (`PROBES`) on the model lowered to ``graph``, the fresh head
    trained in full, at the final recipe."""
    import peftplan as pp

    by = {s.name: s for s in graph.sites}
    linear = [s for s in graph.sites if s.op == "linear" and s.role.startswith(("attn", "mlp"))]
    qv = [s for s in linear if s.role in ("attn.q", "attn.v")]
    norms, pooler = [s for s in graph.sites if s.op == "norm"], [by["bert.pooler.dense"]]
    lora = lambda r: [(s, {"method": "lora", "rank": r, "alpha": 2 * r}) for s in qv]  # noqa: E731
    ssf = lambda sites: [(s, {"method": "ssf"}) for s in sites]  # noqa: E731
    parts = {
        "lora-qv-r7+ssf-norms": lambda: lora(7) + ssf(norms),
        "lora-qv-r4+ssf-rest": lambda: lora(4) + ssf([s for s in linear if s not in qv] + pooler),
        "ssf-all": lambda: ssf(linear + norms + pooler),
        "sparse-linear": lambda: [(s, {"method": "sparse", "density": 0.0069}) for s in linear],
        "lora-qv+loraplus": lambda: lora(8),
    }[kind]()
    head = by["classifier"]
    sites = {
        s.name: {**entry, "role": s.role, "depth": s.depth, "op": s.op}
        for s, entry in [*parts, (head, {"method": "full"})]
    }
    return pp.Plan(sites=sites, recipe=recipe(steps, lr, LR_RATIO.get(kind, 1.0)))


def peft_lora(base, targets: list[str] | None = None, r: int = 8, **extra):
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets, task_type=TaskType.SEQ_CLS, **extra
    )
    return get_peft_model(copy.deepcopy(base), config, low_cpu_mem_usage=extra.get("init_lora_weights") == "eva")


def build(kind: str, base, task, lr: float, steps: int):
    """(model ready to train, its training loss, on_step hook or None) for contender ``kind``."""
    import torch

    from peftplan.planner.training.task import classification_loss

    hook = None
    loss = classification_loss
    if kind == "lora-qv":
        model = peft_lora(base, QV)
    elif kind == "lora-qv-r2":
        model = peft_lora(base, QV, r=2)
    elif kind == "lora-qkvo":
        model = peft_lora(base, QKVO, r=4)
    elif kind == "lora-qv-pooler":  # r7 on q,v and r12 on the pooler before the head: 64,512 + 9,216 = r8 q,v's 73,728
        model = peft_lora(
            base, [*QV, "pooler.dense"], r=7, rank_pattern={"pooler.dense": 12}, alpha_pattern={"pooler.dense": 24}
        )
    elif kind == "lora-all":
        ranks = all_linear_ranks(base, BUDGET)
        top = max(ranks.values())
        model = peft_lora(
            base, sorted(ranks), r=top, rank_pattern=ranks, alpha_pattern={n: 2 * r for n, r in ranks.items()}
        )
    elif kind == "adalora":
        from peft import AdaLoraConfig, TaskType, get_peft_model

        config = AdaLoraConfig(
            init_r=12,
            target_r=8,
            lora_alpha=16,
            target_modules=QV,
            task_type=TaskType.SEQ_CLS,
            total_step=steps,
            tinit=steps // 10,
            tfinal=steps * 3 // 10,
            deltaT=max(1, steps // 40),
        )
        model = get_peft_model(copy.deepcopy(base), config)
        hook = lambda step: model.base_model.update_and_allocate(step)  # noqa: E731
        loss = lambda m, b: m(**b).loss  # noqa: E731 — the model's loss carries AdaLoRA's orthogonality term
    elif kind == "eva":
        from peft import EvaConfig, initialize_lora_eva_weights

        model = peft_lora(base, QV, init_lora_weights="eva", eva_config=EvaConfig(rho=2.0))
        calibration = [{k: v for k, v in b.items() if k != "labels"} for b in task.train_batches[:16]]
        with torch.no_grad():
            initialize_lora_eva_weights(model, dataloader=calibration, show_progress_bar=False)
    elif kind == "full":
        model = fully_trainable(base)
    else:
        raise ValueError(f"unknown contender kind {kind!r}")
    return model, loss, hook


def train_and_score(model, task, rec, seed: int, loss=None, hook=None, bf16: bool = False) -> dict:
    """Train ``model`` by ``rec`` (under bf16 autocast with ``bf16``), then score it in fp32 on
    the validation and evaluation batches."""
    from dataclasses import replace

    from peftplan.planner.training.train import train

    sub = task if loss is None else replace(task, loss=loss)
    run = train(model, sub, rec, seed=seed, on_step=hook, bf16=bf16)
    val_metric, val_loss = metric_and_loss(model, task, task.validation_batches)
    dev_metric, _ = metric_and_loss(model, task, task.eval_batches)
    return {
        "params": trainable_after(model),
        "val_metric": val_metric,
        "val_loss": val_loss,
        "dev_metric": dev_metric,
        "seconds": round(run.seconds, 1),
        "steps": run.steps,
    }


def trainable_after(model) -> int:
    """Trainable params at the end of training; for AdaLoRA the ranks left after pruning (an
    entry of E set to 0 is a pruned rank), counted like LoRA's: rank x (in + out) per layer."""
    pruned = 0
    for module in model.modules():
        e = getattr(module, "lora_E", None)
        if isinstance(e, dict) or hasattr(e, "keys"):
            for name in e.keys():
                a, b = module.lora_A[name], module.lora_B[name]
                zero = int((e[name].detach() == 0).sum())
                pruned += zero * (a.shape[1] + b.shape[0] + 1)  # a row of A, a column of B, an entry of E
    return sum(p.numel() for p in model.parameters() if p.requires_grad) - pruned

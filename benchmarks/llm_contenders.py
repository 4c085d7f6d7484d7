"""The language-model study's contenders on SmolLM2-135M-Instruct: what LLM fine-tuners do by
default (peft, Unsloth, axolotl), the methods and initialisations users reach for (DoRA,
rsLoRA, PiSSA, EVA, LoRA-GA, LoRA+), full fine-tuning as the ceiling, and peftplan's plans.

At the budget every contender has peft LoRA r8 on q,v's trainable parameters (460,800) within
2%: placements on more projections mix ranks per layer (peft's ``rank_pattern``) to land on it.
`build` returns a peft (or plain) model ready to train with its optimizer; every contender
trains with peftplan's trainer and loss (the output layer at labelled positions), so they differ
only in what they tune and how it starts."""

from __future__ import annotations

import copy

from common import fully_trainable

QV = ["q_proj", "v_proj"]
ALL = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
]  # Unsloth's seven; axolotl's all linear
BUDGET = 460_800  # peft LoRA r8 on q_proj and v_proj of SmolLM2-135M (30 layers x 8 x (576+576 + 576+192))

EARLIER = {  # searches stored under an earlier rule, reported beside today's where stored: key suffix -> (row, cap)
    "uncapped": ("peftplan search before its cost cap", None),  # trainable again: runs=None keeps that rule
    "by-loss": ("peftplan search, the cap's first rule (the two best screened in full)", 3.0),  # stored only
    "mixed": ("peftplan search, every baseline screened at three rates", 3.0),  # stored only: 14 of 16 screens seeds
    "followers": ("peftplan search, its screens telling the sampler their accuracy", 3.0),  # stored only
    "extended": ("peftplan search, its seed sweep extended past its best edge", 3.0),  # stored only: reverted
    "front": ("peftplan search, its proposals choosing their rate and budget share", 3.0),  # stored only
    "edge": ("peftplan search, its seed sweep stopped at its edge", 3.0),  # stored only
}
LORAPLUS = ("peftplan search, LoRA+ in its recipe (B's rate 16x A's)", 16.0)  # row, lr_ratio: a recipe a user may give
KINDS = {  # kind -> (label, what it is)
    "lora-qv": ("peft LoRA r8 q,v", "peft's default placement and rank (alpha 8)"),
    "unsloth": ("Unsloth placement at the budget", "q,k,v,o,gate,up,down, alpha = rank, ranks 1-2 per layer"),
    "axolotl": ("axolotl placement at the budget", "every linear layer, alpha = rank / 2, ranks 1-2 per layer"),
    "unsloth-r16": ("Unsloth default (r16, alpha 16)", "its own rank: 10.6x the budget"),
    "axolotl-r32": ("axolotl default (r32, alpha 16)", "its own rank: 21x the budget"),
    "dora": ("peft DoRA q,v", "r8, a few layers at r7 to pay for the magnitudes"),
    "rslora": ("peft rsLoRA q,v r8", "alpha / sqrt(r) scaling"),
    "pissa": ("peft PiSSA q,v r8", "principal singular directions of the weight (4 subspace iterations)"),
    "eva": ("peft EVA q,v r8", "activation principal directions from 16 training batches"),
    "loraga": ("peft LoRA-GA q,v r8", "gradient directions from 8 training batches"),
    "loraplus": ("peft LoRA+ q,v r8", "B's learning rate 16x A's (create_loraplus_optimizer)"),
    "full": ("full fine-tuning", "every weight (134.5M), the ceiling"),
}


def ranks_within(model, targets: list[str], budget: int, alpha_ratio: float) -> tuple[int, dict, dict]:
    """(top rank, rank_pattern, alpha_pattern) of LoRA on ``targets`` of every layer whose
    params are ``budget`` within 2%: rank r+1 on the first layers and r on the rest, r the
    largest uniform rank within budget; alpha = ``alpha_ratio`` x rank."""
    import torch.nn as nn

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in targets]
    per_rank = sum(m.in_features + m.out_features for _, m in layers)
    r = max(1, budget // per_rank)
    ranks = {n: r for n, _ in layers}
    spent = r * per_rank
    for n, m in layers:  # one rank more, layer by layer in order, while the budget lasts
        if spent + m.in_features + m.out_features > budget:
            break
        ranks[n], spent = r + 1, spent + m.in_features + m.out_features
    if abs(spent - budget) > 0.02 * budget:
        raise ValueError(f"LoRA on {targets} cannot land within 2% of {budget:,} params (got {spent:,})")
    top = max(ranks.values())
    return top, ranks, {n: alpha_ratio * k for n, k in ranks.items()}


def peft_lora(base, targets, r: int, alpha: float, **extra):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, **extra)
    return get_peft_model(copy.deepcopy(base), config, low_cpu_mem_usage=extra.get("init_lora_weights") == "eva")


def _placement(base, alpha_ratio: float, **extra):
    top, ranks, alphas = ranks_within(base, ALL, BUDGET, alpha_ratio)
    return peft_lora(base, ALL, top, alpha_ratio * top, rank_pattern=ranks, alpha_pattern=alphas, **extra)


def _dora(base):
    import torch.nn as nn

    qv = [(n, m) for n, m in base.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in QV]
    magnitudes = sum(m.out_features for _, m in qv)
    top, ranks, alphas = ranks_within(base, QV, BUDGET - magnitudes, 1.0)
    return peft_lora(base, QV, top, top, rank_pattern=ranks, alpha_pattern=alphas, use_dora=True)


def _eva(base, task):
    import torch
    from peft import EvaConfig, initialize_lora_eva_weights

    model = peft_lora(base, QV, 8, 8, init_lora_weights="eva", eva_config=EvaConfig(rho=2.0))
    calibration = [
        {k: v for k, v in b.items() if k in ("input_ids", "attention_mask")} for b in task.train_batches[:16]
    ]
    with torch.no_grad():
        initialize_lora_eva_weights(model, dataloader=calibration, show_progress_bar=False)
    return model


def _loraga(base, task):
    from peft import LoraConfig, LoraGAConfig, get_peft_model, preprocess_loraga

    from peftplan.planner.training.lm import causal_lm_loss

    model = copy.deepcopy(base)
    config = LoraConfig(
        r=8,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=QV,
        init_lora_weights="lora_ga",
        lora_ga_config=LoraGAConfig(),
    )

    def train_step() -> None:
        for batch in task.train_batches[:8]:
            causal_lm_loss(model, batch).backward()

    preprocess_loraga(model, config, train_step)
    return get_peft_model(model, config)


def build(kind: str, base, task):
    """(model ready to train, make_optimizer or None) for contender ``kind``."""
    make_optimizer = None
    if kind == "lora-qv":
        model = peft_lora(base, QV, 8, 8)
    elif kind in ("unsloth", "axolotl"):
        model = _placement(base, 1.0 if kind == "unsloth" else 0.5)
    elif kind in ("unsloth-r16", "axolotl-r32"):
        model = peft_lora(base, ALL, 16, 16) if kind == "unsloth-r16" else peft_lora(base, ALL, 32, 16)
    elif kind == "dora":
        model = _dora(base)
    elif kind == "rslora":
        model = peft_lora(base, QV, 8, 8, use_rslora=True)
    elif kind == "pissa":
        model = peft_lora(base, QV, 8, 8, init_lora_weights="pissa_niter_4")
    elif kind == "eva":
        model = _eva(base, task)
    elif kind == "loraga":
        model = _loraga(base, task)
    elif kind == "loraplus":
        import torch
        from peft.optimizers import create_loraplus_optimizer

        model = peft_lora(base, QV, 8, 8)
        make_optimizer = lambda m, r: create_loraplus_optimizer(m, torch.optim.AdamW, lr=r.lr, loraplus_lr_ratio=16)  # noqa: E731
    elif kind == "full":
        model = fully_trainable(base)
    else:
        raise ValueError(f"unknown contender kind {kind!r}; one of {sorted(KINDS)}")
    return model, make_optimizer

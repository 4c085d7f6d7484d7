"""A training step of SmolLM2-135M-Instruct at the language-model study's shapes, peftplan's
way against the plain Hugging Face loss path and against peft on the same sites (LoRA r8 on
q_proj and v_proj, the study's budget).

Each variant runs in a process of its own (one torch thread, as the study's runs do), on the
same batches of the sst2 chat task, from the same initial adapters: warm-up steps, then timed
steps (median); peak memory is the process's maximum resident set. The fp32 losses of
peftplan's path and the plain path are compared step by step (they must agree to 1e-4).

    python benchmarks/llm_speed.py                       # the table
    python benchmarks/llm_speed.py --results benchmarks/RESULTS.md

Variants: ``hf`` (the model's own ``labels=`` loss: the output layer over every position, fp32),
``peftplan`` (the output layer at labelled positions only), ``+bf16`` (under bf16 autocast),
``+checkpointing`` (gradient checkpointing too), ``peft`` and ``peft+bf16`` (peft's LoRA, the
model's own loss).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import write_section

HERE = Path(__file__).resolve().parent
VARIANTS = ("hf", "peftplan", "peftplan+bf16", "peftplan+bf16+checkpointing", "peft", "peft+bf16")
SCORING = ("score-rows", "score-shared")  # choice scoring of validation batches: every row whole, or prompts once
BATCH, MAX_LENGTH = 8, 96  # the study's shapes (benchmarks/llm.py)


def model_and_batches(steps: int):
    import llm_tasks

    model, _, task = llm_tasks.load(
        "sst2", batch_size=BATCH, max_length=MAX_LENGTH, validation=8, max_train=BATCH * steps, max_dev=0
    )
    return model, task


def build(variant: str, base):
    """(model, loss function, bf16, checkpointing) of ``variant``, its adapters seeded alike."""
    import torch

    import peftplan as pp
    from peftplan.planner.training.lm import causal_lm_loss

    torch.manual_seed(0)
    bf16, checkpointing = "bf16" in variant, "checkpointing" in variant
    hf_loss = lambda m, b: m(**b).loss  # noqa: E731 — the model's own loss: logits at every position
    if variant.startswith("peft+") or variant == "peft":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
        return get_peft_model(base, config), hf_loss, bf16, checkpointing
    graph = pp.lower(base)
    sites = {s.name: {"method": "lora", "rank": 8, "alpha": 16} for s in graph.sites if s.role in ("attn.q", "attn.v")}
    model = pp.apply(base, pp.Plan(sites=sites))
    return model, (hf_loss if variant == "hf" else causal_lm_loss), bf16, checkpointing


def run_scoring(variant: str, warmup: int, steps: int) -> dict:
    """Score ``warmup`` + ``steps`` validation batches of the sst2 chat task (two answers each)
    under bf16 autocast, every candidate row whole or each prompt once; seconds per batch."""
    import llm_tasks
    import torch

    from peftplan.planner.training import answers
    from peftplan.planner.training.device import autocast, inference

    torch.set_num_threads(1)
    model, _, task = llm_tasks.load(
        "sst2", batch_size=BATCH, max_length=MAX_LENGTH, validation=BATCH * (warmup + steps), max_train=BATCH, max_dev=0
    )
    if variant == "score-rows":
        answers.shared_prompt_logits = lambda model, batch: None  # this process only: every row whole
    times, hits = [], 0
    with inference(model), autocast(torch.device("cpu"), True):
        for batch in task.validation_batches[: warmup + steps]:
            start = time.perf_counter()
            scores, _, _ = answers.choice_scores(model, batch)
            times.append(time.perf_counter() - start)
            hits += int((scores.argmax(1) == batch["choice"]).sum())
    return {
        "variant": variant,
        "step_s": statistics.median(times[warmup:]),
        "losses": [hits],
        "tokens_per_step": 0,
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_variant(variant: str, warmup: int, steps: int) -> dict:
    """Train ``variant`` for ``warmup`` + ``steps`` steps in this process; its timings and losses."""
    import torch

    if variant in SCORING:
        return run_scoring(variant, warmup, steps)

    from peftplan.planner.training.device import autocast
    from peftplan.planner.training.train import checkpointed, trainable

    torch.set_num_threads(1)
    base, task = model_and_batches(warmup + steps)
    model, loss_fn, bf16, checkpointing = build(variant, base)
    optimizer = torch.optim.AdamW(trainable(model), lr=1e-3)
    model.train()
    times, losses = [], []
    device = torch.device("cpu")
    with checkpointed(model) if checkpointing else contextlib.nullcontext():
        for batch in task.train_batches[: warmup + steps]:
            start = time.perf_counter()
            with autocast(device, bf16):
                loss = loss_fn(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
            losses.append(loss.item())
    tokens = sum(int(b["attention_mask"].sum()) for b in task.train_batches[warmup:])
    return {
        "variant": variant,
        "step_s": statistics.median(times[warmup:]),
        "losses": losses,
        "tokens_per_step": tokens / steps,
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def measure(variants: tuple[str, ...], warmup: int, steps: int, rounds: int) -> dict[str, dict]:
    """Each variant in a fresh process, ``rounds`` times interleaved; per variant the round of
    the shortest median step."""
    best: dict[str, dict] = {}
    for r in range(rounds):
        for v in variants:
            out = subprocess.run(
                [sys.executable, __file__, "--one", v, "--warmup", str(warmup), "--steps", str(steps)],
                capture_output=True,
                text=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
            if out.returncode:
                raise SystemExit(f"{v} failed:\n{out.stderr[-3000:]}")
            result = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"round {r + 1}: {v:30s} {result['step_s']:.3f} s/step, peak {result['peak_mib']:.0f} MiB", flush=True
            )
            if v not in best or result["step_s"] < best[v]["step_s"]:
                best[v] = result
    return best


def table(results: dict[str, dict]) -> str:
    hf = results["hf"]
    peft = {v: results[v]["step_s"] for v in ("peft", "peft+bf16") if v in results}
    lines = [
        "| variant | s/step | × plain HF fp32 | × peft (same precision) | peak MiB | first losses |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for v, r in results.items():
        if v in SCORING:
            continue
        same = peft.get("peft+bf16" if "bf16" in v else "peft")
        vs_peft = f"{r['step_s'] / same:.2f}" if same and not v.startswith("peft") else "–"
        lines.append(
            f"| {v} | {r['step_s']:.3f} | {r['step_s'] / hf['step_s']:.2f} | {vs_peft} | {r['peak_mib']:.0f} | "
            f"{', '.join(f'{x:.4f}' for x in r['losses'][:3])} |"
        )
    diff = max(abs(a - b) for a, b in zip(results["peftplan"]["losses"], hf["losses"]))
    rows, shared = results["score-rows"], results["score-shared"]
    return "\n".join(lines) + (
        f"\n\nLargest fp32 loss difference, peftplan vs plain HF path, over every step: {diff:.2e}.\n\n"
        f"Choice scoring of a validation batch ({BATCH} examples, 2 answers, bf16): every row whole "
        f"{rows['step_s']:.3f} s, each prompt once {shared['step_s']:.3f} s "
        f"({shared['step_s'] / rows['step_s']:.2f}×); right answers {shared['losses'][0]} and "
        f"{rows['losses'][0]} of the same examples."
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--results", type=Path, help="write the table into this RESULTS.md")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_variant(args.one, args.warmup, args.steps)))
        return
    start = time.time()
    results = measure(VARIANTS + SCORING, args.warmup, args.steps, args.rounds)
    text = table(results)
    hf, fast = results["hf"]["step_s"], results["peftplan+bf16"]["step_s"]
    goal = (
        f"peftplan's step (bf16, labelled positions only) is {fast / hf:.2f}× the plain HF fp32 path (goal ≤ 0.5: "
        f"{'PASS' if fast / hf <= 0.5 else 'MISS'}) and {fast / results['peft+bf16']['step_s']:.2f}× peft's bf16 step, "
        f"{fast / results['peft']['step_s']:.2f}× its fp32 step (goal ≤ 1: "
        f"{'PASS' if fast <= results['peft+bf16']['step_s'] else 'MISS'})."
    )
    print(text + "\n\n" + goal)
    if args.results:
        header = (
            f"## Language-model training step (SmolLM2-135M-Instruct, LoRA r8 q,v)\n\n`python benchmarks/llm_speed.py "
            f"--results benchmarks/RESULTS.md` ({(time.time() - start) / 60:.1f} min): batches of {BATCH} sst2 chat "
            f"examples (about {results['hf']['tokens_per_step'] / BATCH:.0f} tokens each, the one-word answer and "
            f"its end-of-turn token labelled), one thread per process, median of {args.steps} steps after "
            f"{args.warmup} of warm-up, the best of {args.rounds} interleaved rounds; peak = maximum resident set."
        )
        write_section(args.results, "llm-speed", f"{header}\n\n{text}\n\n{goal}")


if __name__ == "__main__":
    main()

"""Lowering and apply benchmark.

1. ``lower`` time and peak RSS for every zoo model, the real MiniLM, and Llama 7B / 70B
   layouts on the meta device — each in its own process, so peak RSS is that model's alone
   (it includes the ~0.4 GiB of importing torch and transformers).
2. ``apply`` of one LoRA plan against peft's ``get_peft_model`` with the same LoRA, timed in
   the same run on fresh copies of the same model (median of N, interleaved).

Goals: the 70B layout lowered in < 2 s and < 1 GiB RSS; apply ≤ 1.0x peft.

    python benchmarks/lowering.py            # prints markdown tables
    python benchmarks/lowering.py --repeat 20
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODELS = [
    "bert",
    "roberta_cls",
    "distilbert_cls",
    "gpt2",
    "llama",
    "mistral",
    "qwen2",
    "t5",
    "vit",
    "MLP",
    "CNN",
    "SharedTwice",
    "TiedLM",
    "OddNet",
    "minilm",
    "llama_7b_meta",
    "llama_70b_meta",
]


def build(name: str):
    from tests import zoo

    if name.endswith("_meta"):
        return zoo.llama_meta(name.split("_")[1]), None
    if name == "OddNet":
        return zoo.OddNet(), zoo.odd_input()
    return getattr(zoo, name)(), None


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one(name: str) -> dict:
    """Runs in a child process: lower ``name`` twice (cold, then warm) and report."""
    import warnings

    import torch

    from peftplan.ir import lower

    torch.set_num_threads(2)
    model, inputs = build(name)
    before = rss_mib()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        g = lower(model, inputs)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        lower(model, inputs)
        warm = time.perf_counter() - t0
    return {
        "model": name,
        "class": g.model_class,
        "sites": len(g),
        "blocks": len(g.blocks),
        "edges": g.graph.number_of_edges(),
        "params": g.total_params,
        "capture": g.capture,
        "cold_s": cold,
        "warm_s": warm,
        "rss_before_mib": before,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def lowering_table() -> list[str]:
    rows = [
        "| model | class | sites | blocks | edges | params | capture | lower (cold) | lower (warm) | peak RSS |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for name in MODELS:
        out = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            raise SystemExit(f"{name} failed:\n{out.stderr[-2000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(
            f"| {r['model']} | {r['class']} | {r['sites']} | {r['blocks']} | {r['edges']} | {r['params']:,} | {r['capture']} "
            f"| {r['cold_s']:.3f} s | {r['warm_s']:.3f} s | {r['peak_rss_mib']:.0f} MiB |"
        )
        print(rows[-1], file=sys.stderr)
    return rows


def apply_table(repeat: int) -> list[str]:
    import torch
    from peft import LoraConfig, get_peft_model

    import peftplan as pp
    from tests import zoo

    torch.set_num_threads(2)
    cases = {
        "minilm, r=8 on query,value": (zoo.minilm, ["query", "value"], 8),
        "llama (2 layers), r=16 on all linears": (
            zoo.llama,
            ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            16,
        ),
    }
    rows = [
        "| model and LoRA | peftplan apply (median) | peft get_peft_model (median) | ratio |",
        "|---|---:|---:|---:|",
    ]
    for label, (factory, targets, r) in cases.items():
        base = factory()
        graph = pp.lower(base)
        sites = {
            s.name: {"method": "lora", "rank": r, "alpha": 2 * r} for s in graph if s.name.split(".")[-1] in targets
        }
        plan = pp.Plan(sites=sites, model={"fingerprint": graph.fingerprint})
        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets)
        ours, theirs = [], []
        for _ in range(repeat):
            for fn, times in (
                (lambda m, p=plan: pp.apply(m, p), ours),
                (lambda m, c=config: get_peft_model(m, c), theirs),
            ):
                m = copy.deepcopy(base)
                t0 = time.perf_counter()
                fn(m)
                times.append(time.perf_counter() - t0)
        a, b = statistics.median(ours), statistics.median(theirs)
        rows.append(f"| {label} | {a * 1e3:.1f} ms | {b * 1e3:.1f} ms | {a / b:.2f}x |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--repeat", type=int, default=10, help="apply timings per case (median)")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one)))
        return
    print("\n".join(lowering_table()))
    print()
    print("\n".join(apply_table(args.repeat)))


if __name__ == "__main__":
    main()

"""Methods benchmark on the real MiniLM-L6 classifier, batch 32, sequence 64, CPU.

Every registered method at a comparable number of trainable parameters (LoRA r=8 on query and
value, 73,728, is the reference; the table prints each method's sites and count):

1. train step time (median of the steps after warm-up) and peak memory against peft's own
   LoRA, DoRA and IA3 on the same modules, as ratios measured in the same run: all models
   step in one process, round-robin, so load from other processes hits them alike;
2. unmerged inference time against the unmodified model, alternated the same way, beside the
   cost model's prediction (`PlanCost.unmerged_latency_fraction`) with this machine's
   constants (`Machine.measure`, its per-kernel time taken on one activation, batch x
   sequence x hidden) and with the planner's `DEFAULT_MACHINE`; then merged inference time;
3. ``sparse`` at density 0.01 against dense fine-tuning of the same matrices: AdamW state
   bytes (exp_avg + exp_avg_sq) after a step;
4. the cost model's whole-model training-memory estimate against the measured peak.

Peak memory: each (method, implementation) runs in a fresh process. After the model is loaded
and tuned, one batch-1 forward and backward loads every kernel; then the resident set is the
baseline, the kernel's high-water mark is reset (``/proc/self/clear_refs``), and the steps run.
Peak growth = ``VmHWM`` - baseline: gradients, AdamW states, activations. The process runs
with glibc's mmap threshold fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``), so every tensor
above it is its own mapping, returned to the system when freed: the high-water mark then
follows the tensors alive at the peak. With glibc's default (dynamic) threshold freed
activations stay cached in the heap and the mark measures that caching as well (about 1.8x
the tensors for LoRA here, varying from run to run). The measured whole = the model's
parameter bytes + the peak growth.

Goals: train step and peak memory ≤ 1.0x peft; predicted unmerged latency within 10% of the
measured; merged inference 1.00x ± 2%; sparse optimizer memory ≥ 10x below dense; estimate
within 20% of the measured peak.

    python benchmarks/methods.py            # prints markdown tables (15 min on 2 shared cores)
    python benchmarks/methods.py --quick    # fewer repeats
    python benchmarks/methods.py --latency  # the inference tables only (a few minutes)
    python benchmarks/methods.py --latency --rounds 30 --results benchmarks/RESULTS.md

Inference ratios are paired: each round calls the base model and every tuned model in turn,
and a model's ratio is the median over rounds of its time over the base model's time in the
same round, so load that changes between rounds cancels. The load average before and after
is printed with the tables; judge the latency goals only on a run that started idle.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

BATCH, SEQ = 32, 64
QV = r"attention\.self\.(query|value)$"
LINEARS = r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)$"
FFN_DOWN = r"layer\.\d+\.output\.dense$"
# method -> (sites, hyper-parameters, what the choice is)
CONFIGS = {
    "lora": (QV, {"rank": 8, "alpha": 16}, "r=8 on query, value (the reference)"),
    "dora": (QV, {"rank": 8, "alpha": 16}, "r=8 on query, value (+ a magnitude vector per site)"),
    "ia3": (LINEARS, {}, "every encoder linear (input scaling on the FFN down), the most IA3 can take"),
    "ssf": (LINEARS + r"|LayerNorm$", {}, "every encoder linear and norm, the most SSF can take"),
    "adapter": (
        r"(attention\.output\.dense|layer\.\d+\.output\.dense)$",
        {"bottleneck": 8},
        "serial, bottleneck 8, after attention and FFN (Houlsby)",
    ),
    "sparse": (
        r"(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense)$",
        {"density": 0.01},
        "density 0.01 on q, k, v, o, FFN up",
    ),
    "moe_lora": (QV, {"experts": 3, "rank": 2, "top_k": 1}, "3 experts of r=2, top-1, on query, value"),
}
PEFT = ("lora", "dora", "ia3")


def model_and_graph():
    import torch

    import peftplan as pp
    from peftplan.models import load_minilm

    torch.manual_seed(0)
    model = load_minilm(num_labels=2)
    return model, pp.lower(model)


def plan_for(method: str, graph):
    import peftplan as pp

    pattern, hp, _ = CONFIGS["sparse" if method == "dense" else method]
    sites = {}
    for s in graph:
        if re.search(pattern, s.name):
            entry = {"method": "full"} if method == "dense" else {"method": method, **hp}
            if method == "ia3":
                entry["placement"] = "input" if re.search(FFN_DOWN, s.name) else "output"
            sites[s.name] = entry
    return pp.Plan(sites=sites, model={"fingerprint": graph.fingerprint})


def build(model, graph, method: str, impl: str):
    """A tuned deep copy of ``model``: peftplan's plan or peft's equivalent config."""
    import peftplan as pp

    plan = plan_for(method, graph)
    m = copy.deepcopy(model)
    if impl == "ours":
        return pp.apply(m, plan)
    from peft import IA3Config, LoraConfig, get_peft_model

    names = list(plan.sites)
    if method == "ia3":
        config = IA3Config(target_modules=names, feedforward_modules=[n for n in names if re.search(FFN_DOWN, n)])
    else:
        config = LoraConfig(r=8, lora_alpha=16, target_modules=names, use_dora=method == "dora")
    return get_peft_model(m, config)


def batch_of(n: int = BATCH):
    import torch

    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(1000, 30000, (n, SEQ), generator=g),
        "attention_mask": torch.ones(n, SEQ, dtype=torch.long),
        "labels": torch.randint(0, 2, (n,), generator=g),
    }


class Trainer:
    """One model with its AdamW; ``step`` is a full training step."""

    def __init__(self, model):
        import torch

        self.model = model.train()
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(self, batch) -> float:
        from peftplan.backends import aux_loss

        t0 = time.perf_counter()
        loss = self.model(**batch).loss + 0.01 * aux_loss(self.model)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    def adamw_bytes(self) -> int:
        return sum(
            s[k].numel() * s[k].element_size() for s in self.opt.state.values() for k in ("exp_avg", "exp_avg_sq")
        )


def status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one(method: str, impl: str, steps: int) -> dict:
    """Runs in a fresh process: peak memory of training steps, AdamW bytes, the estimate."""
    import gc

    import torch

    from peftplan.planner.cost import train_memory_estimate

    torch.set_num_threads(2)
    base, graph = model_and_graph()
    estimate = (
        train_memory_estimate(base, graph, plan_for(method, graph), batch=BATCH, seq_len=SEQ)
        if impl == "ours"
        else None
    )
    trainer = Trainer(build(base, graph, method, impl))
    del base
    small = {k: v[:1] for k, v in batch_of().items()}
    trainer.model(**small).loss.backward()  # loads the kernels; its grads are dropped below
    trainer.opt.zero_grad(set_to_none=True)
    gc.collect()
    baseline = status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    batch = batch_of()
    times = [trainer.step(batch) for _ in range(steps)]
    peak = status_mib("VmHWM")
    params = {p.data_ptr(): p.numel() * p.element_size() for p in trainer.model.parameters()}
    return {
        "growth_mib": peak - baseline,
        "param_mib": sum(params.values()) / 2**20,
        "adamw_bytes": trainer.adamw_bytes(),
        "step_s": statistics.median(times[1:] or times),
        "estimate": None
        if estimate is None
        else {
            "weights": estimate.base_weights,
            "frozen": estimate.frozen_activations,
            "plan": estimate.plan.train_bytes,
            "total": estimate.total,
        },
    }


def run_one(method: str, impl: str, steps: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    out = subprocess.run(
        [sys.executable, __file__, "--one", method, impl, "--steps", str(steps)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    if out.returncode:
        raise SystemExit(f"{method}/{impl} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def round_robin(fns: dict, rounds: int) -> dict[str, float]:
    """Median seconds of each function, called in turn once per round."""
    return {k: statistics.median(v) for k, v in timings(fns, rounds).items()}


def timings(fns: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds of each call, per function, the functions called in turn once per round."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(fn())
    return times


def paired_ratio(times: dict[str, list[float]], key: str, reference: str = "base") -> float:
    """Median over rounds of key's time over the reference's time in the same round: a load
    change between rounds moves both sides of each ratio, so it cancels where medians of the
    two columns would not."""
    return statistics.median(t / r for t, r in zip(times[key], times[reference]))


def main() -> None:
    args = parse_args()
    if args.one:
        print(json.dumps(one(*args.one, args.steps)))
        return
    import torch

    import peftplan as pp
    from peftplan.planner.cost import plan_cost

    torch.set_num_threads(2)
    train_rounds, infer_rounds, mem_steps = (3, 6, 2) if args.quick else (6, 15, 3)
    available = [m for m in CONFIGS if m in pp.methods()]
    missing = [m for m in CONFIGS if m not in available]
    base, graph = model_and_graph()
    costs = {m: plan_cost(graph, plan_for(m, graph), batch_shape=(BATCH, SEQ)) for m in available}
    infer_rounds = args.rounds or infer_rounds
    if args.latency:
        latency_only(base, graph, available, infer_rounds, args.results)
        return

    mem = {(m, i): run_one(m, i, mem_steps) for m in available for i in ("ours", "peft") if i == "ours" or m in PEFT}
    if "sparse" in available:
        mem[("dense", "ours")] = run_one("dense", "ours", 1)

    models = {(m, i): build(base, graph, m, i) for (m, i) in mem if m != "dense"}
    trainers = {k: Trainer(v) for k, v in models.items()}
    batch = batch_of()
    for t in trainers.values():
        t.step(batch)  # warm-up: kernels, AdamW states
    step = round_robin({k: (lambda t=t: t.step(batch)) for k, t in trainers.items()}, train_rounds)

    print(sites_table(models, costs, missing), end="\n\n")
    print(step_table(available, step, mem), end="\n\n")
    print(estimate_table(available, mem), end="\n\n")
    if "sparse" in available:
        s, d = mem[("sparse", "ours")]["adamw_bytes"], mem[("dense", "ours")]["adamw_bytes"]
        print("| AdamW state after one step | bytes | ratio |\n|---|---:|---:|")
        print(f"| sparse, density 0.01 | {s:,} | 1 |\n| dense (full) on the same matrices | {d:,} | {d / s:.1f}x |\n")

    latency_tables(base, graph, {m: models[(m, "ours")] for m in available}, infer_rounds)
    if missing:
        print(f"\nnot available (not registered): {', '.join(missing)}")


def parse_args() -> argparse.Namespace:
    """The command line: which tables, how many rounds, where the latency section goes."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats (about half the time)")
    ap.add_argument(
        "--latency", action="store_true", help="only the inference tables: predicted against measured latency"
    )
    ap.add_argument("--rounds", type=int, help="inference rounds (default 15, 6 with --quick)")
    ap.add_argument(
        "--results", type=Path, help="with --latency: write the tables into this markdown file's latency section"
    )
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.results and not args.latency:
        ap.error("--results writes only the latency section: pass it with --latency")
    return args


def latency_only(base, graph, available: list[str], rounds: int, results: Path | None) -> None:
    """``--latency``: the inference tables of every available method, written into ``results``'s
    latency section when given."""
    t0 = time.time()
    text = latency_tables(base, graph, {m: build(base, graph, m, "ours") for m in available}, rounds)
    if results:
        from common import write_section

        command = f"python benchmarks/methods.py --latency --rounds {rounds} --results {results}"
        write_section(
            results, "latency", f"### Latency — `{command}` ({(time.time() - t0) / 60:.1f} min wall)\n\n{text}"
        )


def sites_table(models: dict, costs: dict, missing: list[str]) -> str:
    """Each method's sites, hyper-parameters and trainable params: counted, by the cost model, by peft."""
    from peftplan.backends import count_trainable

    rows = [
        "| method | sites | hyper-parameters | trainable (counted) | cost model | peft trainable |",
        "|---|---|---|---:|---:|---:|",
    ]
    for m in CONFIGS:
        if m in missing:
            rows.append(f"| {m} | not available (not registered) | | | | |")
            continue
        theirs = (
            f"{sum(p.numel() for p in models[(m, 'peft')].parameters() if p.requires_grad):,}" if m in PEFT else "—"
        )
        rows.append(
            f"| {m} | {len(costs[m].sites)}: {CONFIGS[m][2]} | {json.dumps(CONFIGS[m][1])} | "
            f"{count_trainable(models[(m, 'ours')]):,} | {costs[m].params:,} | {theirs} |"
        )
    return "\n".join(rows)


def step_table(available: list[str], step: dict, mem: dict) -> str:
    """Train step time and peak memory growth of each method against peft's, where peft has it."""
    rows = [
        "| method | step (peftplan) | step (peft) | ratio | peak growth (peftplan) | peak growth (peft) | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in available:
        ours, o = step[(m, "ours")], mem[(m, "ours")]
        if m in PEFT:
            theirs, t = step[(m, "peft")], mem[(m, "peft")]
            rows.append(
                f"| {m} | {ours:.3f} s | {theirs:.3f} s | {ours / theirs:.2f}x | {o['growth_mib']:.0f} MiB | "
                f"{t['growth_mib']:.0f} MiB | {o['growth_mib'] / t['growth_mib']:.2f}x |"
            )
        else:
            rows.append(f"| {m} | {ours:.3f} s | no peft equivalent | | {o['growth_mib']:.0f} MiB | | |")
    return "\n".join(rows)


def estimate_table(available: list[str], mem: dict) -> str:
    """The cost model's whole-model training-memory estimate against the measured, per method
    (and dense fine-tuning of sparse's matrices, where sparse is available)."""
    rows = [
        "| method | whole-model estimate (weights + frozen activations + plan) | measured (weights + peak growth) | error |",
        "|---|---:|---:|---:|",
    ]
    for m in [*available, *(["dense"] if "sparse" in available else [])]:
        o, e = mem[(m, "ours")], mem[(m, "ours")]["estimate"]
        measured = o["param_mib"] + o["growth_mib"]
        mib = {k: v / 2**20 for k, v in e.items()}
        label = "full (dense, sparse's matrices)" if m == "dense" else m
        rows.append(
            f"| {label} | {mib['total']:.0f} MiB ({mib['weights']:.0f} + {mib['frozen']:.0f} + {mib['plan']:.0f}) | "
            f"{measured:.0f} MiB ({o['param_mib']:.0f} + {o['growth_mib']:.0f}) | {mib['total'] / measured - 1:+.1%} |"
        )
    return "\n".join(rows)


def latency_tables(base, graph, tuned: dict, rounds: int) -> str:
    """Inference time of each tuned model, unmerged then merged, against the base model's,
    round-robin and paired per round; unmerged beside the cost model's predictions. Prints the
    tables and the verdicts on the latency goals, and returns them as markdown."""
    import torch

    import peftplan as pp
    from peftplan.planner.cost import plan_cost
    from peftplan.planner.latency import DEFAULT_MACHINE, Machine

    batch = batch_of()
    load_before = os.getloadavg()
    base.eval()
    for model in tuned.values():
        model.eval()
    machine = Machine.measure(elements=BATCH * SEQ * base.config.hidden_size)
    shape = (BATCH, SEQ)
    predicted = {m: plan_cost(graph, plan_for(m, graph), batch_shape=shape, machine=machine) for m in tuned}
    default = {m: plan_cost(graph, plan_for(m, graph), batch_shape=shape, machine=DEFAULT_MACHINE) for m in tuned}
    fns = {
        "base": lambda: forward(base, batch),
        **{m: (lambda model=model: forward(model, batch)) for m, model in tuned.items()},
    }
    unmerged = timings(fns, rounds)
    head = (
        f"Machine.measure() here, {torch.get_num_threads()} threads: {machine.flops_per_second / 1e9:.1f} GFLOP/s, "
        f"{machine.seconds_per_kernel * 1e6:.0f} µs per kernel on one activation ({BATCH}x{SEQ}x{base.config.hidden_size}); "
        f"base model: {graph.kernels} kernels, {predicted['lora'].base_flops / 1e9:.1f} GFLOPs per batch; "
        f"{rounds} rounds, batch {BATCH}x{SEQ}"
    )
    unmerged_table, errors = unmerged_latency_table(predicted, default, unmerged)

    left = {m: pp.merge(model).left for m, model in tuned.items()}
    merged = timings(fns, rounds)
    merged_table = merged_latency_table(predicted, left, merged)
    load_after = os.getloadavg()
    exact = [m for m in tuned if not left[m]]  # merged: computes exactly the base model
    verdict = latency_verdict(errors, exact, merged, load_before, load_after)
    text = f"{head}\n\n{unmerged_table}\n\n{merged_table}\n\n{verdict}\n"
    print(text)
    return text


def unmerged_latency_table(predicted: dict, default: dict, unmerged: dict) -> tuple[str, dict[str, float]]:
    """Each method's measured unmerged overhead beside the predicted ones (this machine's constants
    in ``predicted``, `DEFAULT_MACHINE`'s in ``default``): the table, and each method's error."""
    errors = {}
    rows = [
        "| method | extra kernels | extra GFLOPs | measured unmerged | predicted (this machine) | error (forward time) | predicted (DEFAULT_MACHINE) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m, c in predicted.items():
        measured = paired_ratio(unmerged, m) - 1
        error = errors[m] = (1 + c.unmerged_latency_fraction) / (1 + measured) - 1  # of the predicted forward time
        rows.append(
            f"| {m} | {c.unmerged_ops} | {c.unmerged_flops / 1e9:.2f} | +{measured:.1%} | +{c.unmerged_latency_fraction:.1%} "
            f"| {error:+.1%} | +{default[m].unmerged_latency_fraction:.1%} |"
        )
    return "\n".join(rows), errors


def merged_latency_table(predicted: dict, left: dict, merged: dict) -> str:
    """Each method's merged inference time against the base model's, and the overhead the cost
    model predicts for the sites ``left`` unmerged."""
    rows = [
        "| method | merged | inference (median) | base model | ratio | cost model: predicted overhead left |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for m in predicted:
        state = "yes" if not left[m] else f"no ({len(left[m])} sites unmerged)"
        rows.append(
            f"| {m} | {state} | {statistics.median(merged[m]) * 1e3:.1f} ms | {statistics.median(merged['base']) * 1e3:.1f} ms "
            f"| {paired_ratio(merged, m):.3f}x "
            f"| +{predicted[m].latency_fraction:.2%} |"
        )
    return "\n".join(rows)


def latency_verdict(errors: dict, exact: list[str], merged: dict, load_before: tuple, load_after: tuple) -> str:
    """The verdicts on the latency goals: the prediction's errors, and the spread of the merged
    models that compute ``exact``ly the base model, with the load average around the run."""
    worst = max(errors, key=lambda m: abs(errors[m]))
    missed = [m for m in errors if abs(errors[m]) > 0.10]
    spread = [paired_ratio(merged, m) for m in exact]
    return (
        'Goal "predicted unmerged latency within 10% of the measured" (this machine\'s constants): '
        + (f"**met** for all {len(errors)} methods" if not missed else f"**missed** for {', '.join(missed)}")
        + f"; the largest error is {errors[worst]:+.1%} ({worst}).\n"
        f"Measurement noise: the merged models that compute exactly the base model ({', '.join(exact)}) "
        f'measured {min(spread):.3f}x to {max(spread):.3f}x of it; goal "merged inference 1.00x ± 2%": '
        + ("**met**" if all(abs(r - 1) <= 0.02 for r in spread) else "**missed**")
        + f".\nLoad average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
        f"{os.cpu_count()} CPUs."
    )


def forward(model, batch) -> float:
    import torch

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        t0 = time.perf_counter()
        model(**inputs)
        return time.perf_counter() - t0


if __name__ == "__main__":
    main()

"""The latency model: forward time = FLOPs / a FLOP rate + kernels x seconds per kernel.

FLOPs alone predict the big matmuls; small ops (a rank-8 projection, a scale, a router's
softmax) cost per call, not per FLOP, so an unmerged adapter's overhead is mostly its
kernels (`Method.extra_ops`). A `Machine` holds the two constants:

    >>> m = Machine(flops_per_second=50e9, seconds_per_kernel=5e-6)
    >>> m.seconds(flops=1e9, kernels=100)  # 20 ms of FLOPs + 0.5 ms of calls
    0.0205
    >>> round(m.overhead(extra_flops=0, extra_kernels=48, base_flops=1e9, base_kernels=100), 4)
    0.0117

`DEFAULT_MACHINE` is a documented constant rather than a per-machine measurement: a plan's
costs are part of a study (constraints stored with each trial, objectives on the front), and
a study resumed or shared by workers on other machines must cost a plan the same. Where the
latency budget must be this machine's, measure it once and pass it on:
``plan_cost(graph, plan, machine=Machine.measure())``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

__all__ = ["DEFAULT_MACHINE", "Machine"]


@dataclass(frozen=True)
class Machine:
    """Sustained dense FLOP rate, and the time one small kernel takes (dispatch and launch)."""

    flops_per_second: float
    seconds_per_kernel: float

    def seconds(self, flops: float, kernels: float) -> float:
        """Predicted time of work of ``flops`` spread over ``kernels`` calls."""
        return flops / self.flops_per_second + kernels * self.seconds_per_kernel

    def overhead(self, extra_flops: float, extra_kernels: float, base_flops: float, base_kernels: float) -> float:
        """Predicted forward-time overhead as a fraction of the base forward's time."""
        base = self.seconds(base_flops, base_kernels)
        return self.seconds(extra_flops, extra_kernels) / base if base else 0.0

    @classmethod
    def measure(cls, *, elements: int = 64, size: int = 1024, repeats: int = 200) -> Machine:
        """This machine's constants with torch's current thread count: the rate of a ``size``
        square fp32 matmul, and the median time of an element-wise multiply on ``elements``
        elements (64: pure per-call cost; a model's activation size includes memory traffic).

        >>> Machine.measure(size=256, repeats=5).seconds_per_kernel < 1e-3
        True
        """
        a, b = torch.randn(size, size), torch.randn(size, size)
        x = torch.randn(elements)
        with torch.no_grad():
            matmul = _median(lambda: a @ b, max(3, repeats // 20))
            kernel = _median(lambda: x * x, repeats)
        return cls(flops_per_second=2 * size**3 / matmul, seconds_per_kernel=kernel)


def _median(fn, repeats: int) -> float:
    fn()  # warm-up: first-call allocation and thread start
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


# `Machine.measure()` on the 2-core x86 CPU of benchmarks/RESULTS.md (torch 2.13, 2 threads,
# 2026-12-01): 55.9 GFLOP/s on fp32 matmuls, 1.9 µs per small kernel; rounded.
DEFAULT_MACHINE = Machine(flops_per_second=55e9, seconds_per_kernel=2e-6)

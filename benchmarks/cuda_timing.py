"""Timing helpers shared by the GPU benchmarks."""

from __future__ import annotations

import torch


def cuda_time(function, repeats: int, warmup: int = 2) -> float:
    """Median milliseconds of `function()` over `repeats` CUDA-event-timed runs, after `warmup` untimed ones."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]

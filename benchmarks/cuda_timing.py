"""Timing helpers shared by the GPU benchmarks."""

from __future__ import annotations

import gc

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


def free_device_memory(device: torch.device) -> None:
    """Drop the last measurement's model copies and compiled graphs, and start the peak-memory count afresh, before
    the next measurement."""
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

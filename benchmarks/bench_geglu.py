"""The feed-forward's GEGLU at the UNet's shapes (32 images, x2 for guidance, bf16): Linear then `value * gelu(gate)`
in PyTorch eager, under torch.compile (cuBLAS matmul + one Triton pass, as the compiled UNet runs it), and the fused
Triton matmul of `semantic_aug.fused_geglu`, each in ms and TFLOP/s, with the kernel's chosen tile and its error
against float64.

    python benchmarks/bench_geglu.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.cuda_timing import cuda_time  # noqa: E402
from semantic_aug import fused_geglu  # noqa: E402
from semantic_aug.utils import UserError, run_cli  # noqa: E402

SHAPES = [(64 * 64 * 64, 320), (64 * 32 * 32, 640), (64 * 16 * 16, 1280), (64 * 8 * 8, 1280)]  # (tokens, width)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per measurement (median)")
    return parser.parse_args()


def reference_geglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    value, gate = F.linear(x, weight, bias).chunk(2, dim=-1)
    return value * F.gelu(gate)


def main(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        raise UserError("this benchmark measures CUDA kernels and needs a CUDA GPU")
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    compiled = torch.compile(reference_geglu, dynamic=False)
    totals = {"eager": 0.0, "compiled": 0.0, "fused": 0.0}
    with torch.no_grad():
        for tokens, width in SHAPES:
            x = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16)
            weight = (torch.randn(8 * width, width, device="cuda") / width ** 0.5).to(torch.bfloat16)
            bias = torch.randn(8 * width, device="cuda", dtype=torch.bfloat16) * 0.1
            flops = 2 * tokens * width * 8 * width
            times = {"eager": cuda_time(lambda: reference_geglu(x, weight, bias), args.repeats),
                     "compiled": cuda_time(lambda: compiled(x, weight, bias), args.repeats),
                     "fused": cuda_time(lambda: fused_geglu.geglu(x, weight, bias), args.repeats)}
            rows = slice(0, 4096)
            exact = reference_geglu(x[rows].double(), weight.double(), bias.double())
            errors = {name: ((out[rows].double() - exact).norm() / exact.norm()).item() for name, out in
                      (("bf16 PyTorch", reference_geglu(x, weight, bias)), ("fused", fused_geglu.geglu(x, weight, bias)))}
            for name, ms in times.items():
                totals[name] += ms
            line = "  ".join(f"{name} {ms:.3f} ms ({flops / ms / 1e9:.0f} TFLOP/s)" for name, ms in times.items())
            print(f"[{tokens} x {width} -> {4 * width}] {line}", flush=True)
            print(f"    tile {fused_geglu._geglu_matmul.best_config}; error against float64: "
                  + ", ".join(f"{name} {error:.2e}" for name, error in errors.items()), flush=True)
    print("all shapes: " + ", ".join(f"{name} {ms:.3f} ms" for name, ms in totals.items()), flush=True)


if __name__ == "__main__":
    run_cli(main, parse_args)

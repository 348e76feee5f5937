"""GroupNorm + SiLU on channels_last bf16 tensors of the UNet's and VAE's shapes: PyTorch eager, torch.compile and
the fused Triton kernels of `semantic_aug.acceleration.fused_group_norm`, against the memory floor (two reads, one
write).

With `--sweep` it also times a grid of kernel configurations (tile size, warps, tiles per program) and prints the
best one per shape and overall; `--best-out FILE` writes the overall best as `tile,warps,stats_tiles,normalize_tiles`.

From the checkout's root, with the package installed (`make setup`) or `PYTHONPATH=.` in front:
    python -m benchmarks.bench_group_norm [--sweep] [--best-out best.txt]
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.cuda_timing import cuda_time
from semantic_aug.acceleration.fused_group_norm import run_kernels
from semantic_aug.core.utils import UserError, run_cli

SHAPES = [  # (batch, channels, side): the UNet at 32 images (x2 for guidance), the VAE decoder at 8 images
    (64, 320, 64), (64, 640, 64), (64, 960, 64), (64, 640, 32), (64, 1920, 32), (64, 1280, 16), (64, 2560, 8),
    (8, 128, 512), (8, 256, 256), (8, 512, 128)]
SWEEP = {"tile_elements": (4096, 8192, 16384), "num_warps": (4, 8), "stats_tiles": (4, 16),
         "normalize_tiles": (1, 4)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="also time the grid of kernel configurations")
    parser.add_argument("--best-out", default=None, help="file for the overall best configuration (with --sweep)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per measurement (median)")
    return parser.parse_args()


def main(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        raise UserError("this benchmark measures CUDA kernels and needs a CUDA GPU")
    torch.manual_seed(0)
    big = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    copy = torch.empty_like(big)
    bandwidth = 2 * big.numel() / cuda_time(lambda: copy.copy_(big), args.repeats) / 1e9  # TB/s
    del big, copy
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; copy bandwidth {bandwidth:.2f} TB/s", flush=True)
    configs = [dict(zip(SWEEP, values)) for values in itertools.product(*SWEEP.values())] if args.sweep else []
    totals = [0.0] * len(configs)
    default_total = 0.0
    with torch.no_grad():
        for batch, channels, side in SHAPES:
            x = torch.randn(batch, channels, side, side, device="cuda", dtype=torch.bfloat16)
            x = x.contiguous(memory_format=torch.channels_last)
            weight, bias = (torch.randn(channels, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            eager = lambda: F.silu(F.group_norm(x, 32, weight, bias, 1e-6))  # noqa: E731
            compiled = torch.compile(lambda t: F.silu(F.group_norm(t, 32, weight, bias, 1e-6)), dynamic=False)
            fused = lambda **config: run_kernels(x, weight, bias, None, 32, 1e-6, True, **config)  # noqa: E731
            reference = F.silu(F.group_norm(x.double(), 32, weight.double(), bias.double(), 1e-6))
            error = ((fused().double() - reference).norm() / reference.norm()).item()
            floor = 3 * x.numel() * 2 / bandwidth / 1e9
            times = {"eager": cuda_time(eager, args.repeats), "compiled": cuda_time(lambda: compiled(x), args.repeats),
                     "fused": cuda_time(fused, args.repeats)}
            default_total += times["fused"]
            line = "  ".join(f"{name} {ms:.3f} ms" for name, ms in times.items())
            print(f"[{batch}x{channels}x{side}^2] floor {floor:.3f} ms  {line}  (fused at {floor / times['fused']:.0%} "
                  f"of the floor, error {error:.1e})", flush=True)
            if configs:
                swept = [cuda_time(lambda: fused(**config), args.repeats) for config in configs]
                totals = [total + ms for total, ms in zip(totals, swept)]
                best = min(range(len(configs)), key=swept.__getitem__)
                print(f"    best {configs[best]}: {swept[best]:.3f} ms ({floor / swept[best]:.0%} of the floor)",
                      flush=True)
            torch._dynamo.reset()
    print(f"default configuration, all shapes: {default_total:.3f} ms", flush=True)
    if configs:
        best = min(range(len(configs)), key=totals.__getitem__)
        print(f"best configuration over all shapes: {configs[best]}: {totals[best]:.3f} ms", flush=True)
        for index in sorted(range(len(configs)), key=totals.__getitem__)[:5]:
            print(f"    {totals[index]:.3f} ms  {configs[index]}", flush=True)
        if args.best_out:
            Path(args.best_out).write_text(",".join(str(v) for v in configs[best].values()))


if __name__ == "__main__":
    run_cli(main, parse_args)

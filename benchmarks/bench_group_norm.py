"""GroupNorm + SiLU on channels_last bf16 tensors of every shape the UNet (32 images, x2 for guidance) and the VAE
decoder (8 images) normalise: the fused Triton kernels of `semantic_aug.fused_group_norm` on each of their two
paths (three launches; one program per image and group) and as dispatched (`ONE_PROGRAM_ELEMENTS`), against the
memory floor (one read and one write) and against PyTorch's float64 GroupNorm. Totals are weighted by how often
each shape occurs in one UNet call and one decode of 8 images; the sweep weighs them by their calls per batch of
32 images (35 UNet calls, 4 decodes).

With `--sweep` it also times a grid of launch configurations for each path and prints the best per shape and
overall; `--best-out FILE` writes the overall best three-launch configuration as
`tile,warps,stats_tiles,normalize_tiles`.

    python benchmarks/bench_group_norm.py [--sweep] [--best-out best.txt]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.cuda_timing import cuda_time  # noqa: E402
from semantic_aug import fused_group_norm  # noqa: E402
from semantic_aug.utils import UserError, run_cli  # noqa: E402

MODELS = {  # model -> (calls per batch of 32 images, {(batch, channels, side): GroupNorms of that shape in one call})
    "UNet call": (35, {(64, 320, 64): 13, (64, 640, 64): 2, (64, 960, 64): 1,
                  (64, 320, 32): 1, (64, 640, 32): 11, (64, 960, 32): 1, (64, 1280, 32): 1, (64, 1920, 32): 1,
                  (64, 640, 16): 1, (64, 1280, 16): 11, (64, 1920, 16): 1, (64, 2560, 16): 2,
                  (64, 1280, 8): 12, (64, 2560, 8): 3}),
    "VAE decode of 8": (4, {(8, 512, 64): 11, (8, 512, 128): 6, (8, 512, 256): 1, (8, 256, 256): 5,
                            (8, 256, 512): 1, (8, 128, 512): 6}),
}
PATHS = {"three launches": 0, "one program": 1 << 40}  # path -> one_program_elements that forces it
SWEEP = {"tile_elements": (4096, 8192, 16384), "num_warps": (4, 8), "stats_tiles": (4, 16),
         "normalize_tiles": (1, 4)}
ONE_PROGRAM_SWEEP = {"ONE_PROGRAM_TILE_ELEMENTS": (2048, 4096, 8192), "ONE_PROGRAM_WARPS": (2, 4, 8)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="also time the grid of launch configurations")
    parser.add_argument("--best-out", default=None, help="file for the overall best configuration (with --sweep)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per measurement (median)")
    return parser.parse_args()


def grid(space: dict) -> list[dict]:
    return [dict(zip(space, values)) for values in itertools.product(*space.values())]


def time_one_program(fused, config: dict, repeats: int) -> float:
    """Time the one-program path with the module's tile size and warps set to `config`."""
    saved = {name: getattr(fused_group_norm, name) for name in config}
    for name, value in config.items():
        setattr(fused_group_norm, name, value)
    try:
        return cuda_time(lambda: fused(one_program_elements=PATHS["one program"]), repeats)
    finally:
        for name, value in saved.items():
            setattr(fused_group_norm, name, value)


def print_best(label: str, configs: list[dict], totals: list[float]) -> None:
    best = min(range(len(configs)), key=totals.__getitem__)
    print(f"best {label} configuration, per batch of 32 images: {configs[best]}: {totals[best]:.1f} ms", flush=True)
    for index in sorted(range(len(configs)), key=totals.__getitem__)[1:4]:
        print(f"    {totals[index]:.1f} ms  {configs[index]}", flush=True)


def main(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        raise UserError("this benchmark measures CUDA kernels and needs a CUDA GPU")
    torch.manual_seed(0)
    big = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    copy = torch.empty_like(big)
    bandwidth = 2 * big.numel() / cuda_time(lambda: copy.copy_(big), args.repeats) / 1e9  # TB/s
    del big, copy
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; copy bandwidth {bandwidth:.2f} TB/s; "
          f"one-program path for groups of <= {fused_group_norm.ONE_PROGRAM_ELEMENTS} values", flush=True)
    configs, one_program_configs = (grid(SWEEP), grid(ONE_PROGRAM_SWEEP)) if args.sweep else ([], [])
    sweep_totals, one_program_totals = [0.0] * len(configs), [0.0] * len(one_program_configs)
    with torch.no_grad():
        for model, (calls, shapes) in MODELS.items():
            totals = dict.fromkeys(["floor", *PATHS, "dispatched", "best path"], 0.0)
            for (batch, channels, side), count in shapes.items():
                x = torch.randn(batch, channels, side, side, device="cuda", dtype=torch.bfloat16)
                x = x.contiguous(memory_format=torch.channels_last)
                weight, bias = (torch.randn(channels, device="cuda", dtype=torch.bfloat16) for _ in range(2))
                fused = lambda **options: fused_group_norm._launch(x, weight, bias, None, 32, 1e-6, True, **options)  # noqa: E731
                reference = F.silu(F.group_norm(x.double(), 32, weight.double(), bias.double(), 1e-6))
                errors = {path: ((fused(one_program_elements=limit).double() - reference).norm() / reference.norm()).item()
                          for path, limit in PATHS.items()}
                times = {"floor": 2 * x.numel() * 2 / bandwidth / 1e9}
                times.update({path: cuda_time(lambda: fused(one_program_elements=limit), args.repeats)
                              for path, limit in PATHS.items()})
                times["dispatched"] = cuda_time(fused, args.repeats)
                times["best path"] = min(times[path] for path in PATHS)
                for name, ms in times.items():
                    totals[name] += count * ms
                group_values = side * side * channels // 32
                line = "  ".join(f"{path} {times[path]:.3f} ms ({times['floor'] / times[path]:.0%}, error "
                                 f"{errors[path]:.1e})" for path in PATHS)
                print(f"[{batch}x{channels}x{side}^2, x{count}, {group_values} values a group] floor "
                      f"{times['floor']:.3f} ms  {line}  dispatched {times['dispatched']:.3f} ms", flush=True)
                if configs:
                    swept = [cuda_time(lambda: fused(one_program_elements=0, **config), args.repeats)
                             for config in configs]
                    sweep_totals = [total + calls * count * ms for total, ms in zip(sweep_totals, swept)]
                    best = min(range(len(configs)), key=swept.__getitem__)
                    print(f"    best three-launch {configs[best]}: {swept[best]:.3f} ms", flush=True)
                if one_program_configs:
                    swept = [time_one_program(fused, config, args.repeats) for config in one_program_configs]
                    one_program_totals = [total + calls * count * ms for total, ms in zip(one_program_totals, swept)]
                    best = min(range(len(one_program_configs)), key=swept.__getitem__)
                    print(f"    best one-program {one_program_configs[best]}: {swept[best]:.3f} ms", flush=True)
            print(f"{model}, all its GroupNorms: " + ", ".join(f"{name} {ms:.2f} ms" for name, ms in totals.items()),
                  flush=True)
    if configs:
        print_best("three-launch", configs, sweep_totals)
        print_best("one-program", one_program_configs, one_program_totals)
        if args.best_out:
            best = min(range(len(configs)), key=sweep_totals.__getitem__)
            Path(args.best_out).write_text(",".join(str(v) for v in configs[best].values()))


if __name__ == "__main__":
    run_cli(main, parse_args)

"""On the GPU: the SD v1.4 UNet and VAE decoder (random weights) in bf16 with the fused GroupNorm kernels agree with
float32 PyTorch as closely as plain bf16 PyTorch does. (The CPU tests check the kernels through Triton's
interpreter; this runs the compiled kernels at full size.)

    python benchmarks/check_fused_group_norm.py
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from semantic_aug.fused_group_norm import fuse_group_norms  # noqa: E402
from semantic_aug.stable_diffusion import build_random_sd_v1  # noqa: E402
from semantic_aug.utils import UserError, run_cli  # noqa: E402

ALLOWED_RATIO = 1.5  # the fused bf16 error may exceed plain bf16's by at most this factor


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.float() - reference).norm() / reference.norm()).item()


def parse_args() -> argparse.Namespace:
    return argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()


def main(_args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        raise UserError("this check runs the CUDA kernels and needs a CUDA GPU")
    torch.manual_seed(0)
    _, _, vae, unet, _ = build_random_sd_v1("cuda")
    sample = torch.randn(8, 4, 64, 64, device="cuda")
    text = torch.randn(8, 77, 768, device="cuda")
    latents = torch.randn(2, 4, 64, 64, device="cuda")
    models = {"unet": (unet, lambda m, dtype: m(sample.to(dtype), 500, encoder_hidden_states=text.to(dtype)).sample),
              "vae decoder": (vae, lambda m, dtype: m.decode(latents.to(dtype)).sample)}
    failed = []
    with torch.no_grad():
        for name, (model, call) in models.items():
            reference = call(model.float().to(memory_format=torch.channels_last), torch.float32).float()
            plain = copy.deepcopy(model).to(torch.bfloat16)
            fused = copy.deepcopy(plain)
            count = fuse_group_norms(fused)
            plain_error = relative_error(call(plain, torch.bfloat16), reference)
            fused_error = relative_error(call(fused, torch.bfloat16), reference)
            verdict = "ok" if fused_error <= ALLOWED_RATIO * plain_error else "TOO FAR"
            print(f"{name}: {count} norms fused; error against fp32: plain bf16 {plain_error:.2e}, "
                  f"fused bf16 {fused_error:.2e} ({verdict})", flush=True)
            if verdict != "ok":
                failed.append(name)
    if failed:
        raise UserError(f"fused GroupNorm kernels drift from PyTorch in: {', '.join(failed)}")


if __name__ == "__main__":
    run_cli(main, parse_args)

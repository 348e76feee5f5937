"""On the GPU: the SD v1.4 UNet and VAE decoder (random weights) in bf16 with the generator's speed-ups agree with
float32 PyTorch as closely as plain bf16 PyTorch does. The speed-ups are the fused GroupNorm kernels (UNet and VAE)
and the guidance prefix computed once for both halves (UNet, on guidance-paired rows). The CPU tests check the
kernels through Triton's interpreter; this runs the compiled kernels at full size, in bf16.

From the checkout's root, with the package installed (`make setup`) or `PYTHONPATH=.` in front:
    python -m benchmarks.check_fused_kernels
"""

from __future__ import annotations

import argparse
import copy

import torch

from semantic_aug.acceleration.fused_group_norm import fuse_group_norms
from semantic_aug.acceleration.guidance_prefix import paired_halves, share_guidance_prefix
from semantic_aug.core.stable_diffusion import build_random_sd_v1
from semantic_aug.core.utils import UserError, run_cli

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
    latents = torch.randn(4, 4, 64, 64, device="cuda")
    sample = torch.cat([latents, latents])  # guidance rows: the same latents, empty then real prompts
    text = torch.cat([torch.randn(1, 77, 768, device="cuda").expand(4, -1, -1), torch.randn(4, 77, 768, device="cuda")])

    def unet_call(model, dtype):
        with paired_halves(getattr(model, "shared_prefix", [])):
            return model(sample.to(dtype), 500, encoder_hidden_states=text.to(dtype)).sample

    def fuse_unet(model):
        count = f"{fuse_group_norms(model)} norms fused"
        model.shared_prefix = share_guidance_prefix(model)
        return f"{count}, {len(model.shared_prefix)} prefix modules shared"

    models = {"unet": (unet, unet_call, fuse_unet),
              "vae decoder": (vae, lambda m, dtype: m.decode(latents[:2].to(dtype)).sample,
                              lambda m: f"{fuse_group_norms(m)} norms fused")}
    failed = []
    with torch.no_grad():
        for name, (model, call, fuse) in models.items():
            reference = call(model.float().to(memory_format=torch.channels_last), torch.float32).float()
            plain = copy.deepcopy(model).to(torch.bfloat16)
            fused = copy.deepcopy(plain)
            summary = fuse(fused)
            plain_error = relative_error(call(plain, torch.bfloat16), reference)
            fused_error = relative_error(call(fused, torch.bfloat16), reference)
            verdict = "ok" if fused_error <= ALLOWED_RATIO * plain_error else "TOO FAR"
            print(f"{name}: {summary}; error against fp32: plain bf16 {plain_error:.2e}, "
                  f"fused bf16 {fused_error:.2e} ({verdict})", flush=True)
            if verdict != "ok":
                failed.append(name)
    if failed:
        raise UserError(f"the fused kernels drift from PyTorch in: {', '.join(failed)}")


if __name__ == "__main__":
    run_cli(main, parse_args)

"""The fused GroupNorm(+SiLU) kernels compute what PyTorch's GroupNorm does, and swapping them into a diffusers UNet
or VAE leaves its output and parameters as they were.

The Triton kernels run here on the CPU through Triton's interpreter (`TRITON_INTERPRET=1`, set before Triton is
imported, so those checks run in a subprocess); the in-process checks cover the PyTorch path the CPU takes.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from semantic_aug.acceleration import fused_group_norm
from semantic_aug.acceleration.fused_group_norm import (FusedGroupNorm, GroupNormLaunch, fuse_group_norms, group_norm,
                                                        kernels_apply)
from semantic_aug.core.stable_diffusion import load_sd_components

pytestmark = pytest.mark.skipif(fused_group_norm.triton is None, reason="Triton is not installed")

INTERPRETED_CHECKS = r"""
import json, torch, torch.nn.functional as F
from diffusers.models.resnet import ResnetBlock2D
from semantic_aug.acceleration import fused_group_norm as fg

torch.manual_seed(0)
results = {}
cases = {  # name: (shape, groups, dtype, with time bias, silu, mean offset, channels_last)
    "plain_fp32": ((2, 64, 8, 8), 32, torch.float32, False, False, 0.0, True),
    "bias_silu_bf16": ((3, 40, 5, 7), 4, torch.bfloat16, True, True, 0.0, True),
    "large_mean_fp32": ((2, 96, 16, 16), 32, torch.float32, True, True, 300.0, True),
    "nchw_input_fp32": ((2, 60, 9, 5), 6, torch.float32, False, True, 1.0, False),
    "odd_sizes_fp16": ((1, 24, 3, 3), 8, torch.float16, False, True, 0.0, True),
}
for name, (shape, groups, dtype, with_bias, silu, offset, channels_last) in cases.items():
    x = (torch.randn(shape) * 2 + offset).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(shape[1]).to(dtype), torch.randn(shape[1]).to(dtype)
    time_bias = torch.randn(shape[0], shape[1]).to(dtype) if with_bias else None
    out = fg.run_kernels(x, weight, bias, time_bias, groups, 1e-5, silu, tile_elements=256, stats_tiles=2,
                     normalize_tiles=3)
    full = x.double() + (time_bias.double()[:, :, None, None] if with_bias else 0)
    reference = F.group_norm(full, groups, weight.double(), bias.double(), 1e-5)
    reference = F.silu(reference) if silu else reference
    results[name] = {"error": ((out.double() - reference).norm() / reference.norm()).item(),
                     "dtype": str(out.dtype), "channels_last": out.is_contiguous(memory_format=torch.channels_last)}

with torch.no_grad():
    x3 = torch.randn(2, 64, 50)  # (N, C, L), as attention blocks call it
    norm = torch.nn.GroupNorm(8, 64)
    torch.nn.init.normal_(norm.weight)
    fused = fg.FusedGroupNorm.replacing(norm)
    results["three_dims"] = {"error": ((fused(x3) - norm(x3)).norm() / norm(x3).norm()).item()}

    block = ResnetBlock2D(in_channels=64, out_channels=96, temb_channels=32, groups=32).eval()
    for module in block.modules():
        if isinstance(module, torch.nn.GroupNorm):
            torch.nn.init.normal_(module.weight)
            torch.nn.init.normal_(module.bias)
    x = torch.randn(2, 64, 8, 8).contiguous(memory_format=torch.channels_last)
    temb = torch.randn(2, 32)
    expected = block(x, temb)
    fg.fuse_group_norms(block)
    got = block(x, temb)
    results["resnet_block"] = {"error": ((got - expected).norm() / expected.norm()).item()}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def interpreted(repo_root):
    """Run the kernel checks under Triton's interpreter (CPU) and return their measured errors."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(repo_root))
    result = subprocess.run([sys.executable, "-c", INTERPRETED_CHECKS], env=env, capture_output=True, text=True,
                            timeout=600, cwd=repo_root)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case, tolerance", [("plain_fp32", 1e-5), ("large_mean_fp32", 1e-5),
                                             ("nchw_input_fp32", 1e-5), ("bias_silu_bf16", 1e-2),
                                             ("odd_sizes_fp16", 2e-3)])
def test_kernels_match_pytorch_group_norm(interpreted, case, tolerance):
    """Statistics, time bias, SiLU, a large mean (no cancellation), NCHW input and half precisions all agree with a
    float64 GroupNorm; the output is channels_last in the input's dtype."""
    result = interpreted[case]
    assert result["error"] < tolerance, result
    assert result["channels_last"]


def test_kernels_keep_the_input_dtype(interpreted):
    assert interpreted["bias_silu_bf16"]["dtype"] == "torch.bfloat16"
    assert interpreted["odd_sizes_fp16"]["dtype"] == "torch.float16"


def test_kernels_handle_three_dimensional_input(interpreted):
    assert interpreted["three_dims"]["error"] < 1e-5


def test_fused_resnet_block_matches_diffusers(interpreted):
    """A diffusers ResnetBlock2D with a time embedding gives the same output through the fused kernels."""
    assert interpreted["resnet_block"]["error"] < 1e-5


def test_fusing_keeps_unet_and_vae_outputs_and_parameters(tiny_model_path):
    _, _, vae, unet, _ = load_sd_components(tiny_model_path)
    torch.manual_seed(0)
    sample, latents = torch.randn(2, 4, 32, 32), torch.randn(2, 4, 32, 32)
    text = torch.randn(2, 77, unet.config.cross_attention_dim)
    keys = (set(unet.state_dict()), set(vae.state_dict()))
    with torch.no_grad():
        expected = unet(sample, 500, encoder_hidden_states=text).sample, vae.decode(latents).sample
        fused = fuse_group_norms(unet) + fuse_group_norms(vae)
        got = unet(sample, 500, encoder_hidden_states=text).sample, vae.decode(latents).sample
    assert fused > 0 and any(isinstance(m, FusedGroupNorm) for m in unet.modules())
    assert (set(unet.state_dict()), set(vae.state_dict())) == keys
    for before, after in zip(expected, got):
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_kernels_are_used_only_without_autograd_on_a_device():
    x = torch.randn(2, 8, 4, 4)
    assert not kernels_apply(x)  # a CPU tensor without the interpreter takes the PyTorch path
    weight, bias, time_bias = torch.randn(8), torch.randn(8), torch.randn(2, 8)
    expected = torch.nn.functional.silu(torch.nn.functional.group_norm(x + time_bias[:, :, None, None], 4, weight,
                                                                       bias, 1e-5))
    torch.testing.assert_close(group_norm(x, 4, weight, bias, 1e-5, silu=True, bias=time_bias), expected)


def test_fusing_changes_only_the_model_it_is_given(tiny_model_path):
    """The fused forward goes onto the model's own ResNet blocks, with the launch configuration asked for: diffusers'
    class and a second model stay as they were."""
    from diffusers.models.resnet import ResnetBlock2D

    class_forward = ResnetBlock2D.forward
    _, _, _, unet, _ = load_sd_components(tiny_model_path)
    _, _, _, other, _ = load_sd_components(tiny_model_path)
    launch = GroupNormLaunch(tile_elements=256, num_warps=2, stats_tiles=2, normalize_tiles=1)
    fuse_group_norms(unet, launch)
    fused = [m for m in unet.modules() if isinstance(m, FusedGroupNorm)]
    assert fused and all(m.launch == launch for m in fused)
    assert "forward" in vars(unet.down_blocks[0].resnets[0])
    assert ResnetBlock2D.forward is class_forward
    assert not any(isinstance(m, FusedGroupNorm) for m in other.modules())
    assert "forward" not in vars(other.down_blocks[0].resnets[0])

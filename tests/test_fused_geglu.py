"""The fused GEGLU matmul computes `value * gelu(gate)` of one Linear's two halves, as diffusers' GEGLU does.

The Triton kernel runs here on the CPU through Triton's interpreter (`TRITON_INTERPRET=1`, set before Triton is
imported, so those checks run in a subprocess). The interpreter's bf16 matmul is broken (it returns garbage for
any bf16 `tl.dot`), so bf16 is checked on the GPU by `benchmarks/check_fused_kernels.py`; fp32 and fp16 here.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from semantic_aug import fused_geglu
from semantic_aug.fused_geglu import fuse_geglu, geglu, kernels_apply
from semantic_aug.stable_diffusion import load_sd_components

pytestmark = pytest.mark.skipif(fused_geglu.triton is None, reason="Triton is not installed")

INTERPRETED_CHECKS = r"""
import json, torch, torch.nn.functional as F
from diffusers.models.attention import FeedForward
from semantic_aug import fused_geglu as fg

torch.manual_seed(0)
results = {}
cases = {  # name: (rows, in width, out width, dtype, bias)
    "tiles_fp32": (64, 64, 32, torch.float32, True),
    "ragged_fp32": (70, 48, 40, torch.float32, True),  # no size a multiple of the 32-wide tiles
    "no_bias_fp32": (33, 32, 64, torch.float32, False),
    "fp16": (64, 96, 64, torch.float16, True),
}
with torch.no_grad():
    for name, (rows, width, out_width, dtype, with_bias) in cases.items():
        x = torch.randn(rows, width).to(dtype)
        weight = (torch.randn(2 * out_width, width) / width ** 0.5).to(dtype)
        bias = torch.randn(2 * out_width).to(dtype) if with_bias else None
        out = fg.geglu(x, weight, bias)
        value, gate = F.linear(x.double(), weight.double(), None if bias is None else bias.double()).chunk(2, -1)
        reference = value * F.gelu(gate)
        results[name] = {"error": ((out.double() - reference).norm() / reference.norm()).item(),
                         "dtype": str(out.dtype), "shape": list(out.shape)}

    feed_forward = FeedForward(64, activation_fn="geglu").eval()  # as in SD's transformer blocks
    hidden = torch.randn(2, 10, 64)  # (batch, tokens, width): the kernel sees the tokens as rows
    expected = feed_forward(hidden)
    count = fg.fuse_geglu(feed_forward)
    got = feed_forward(hidden)
    results["feed_forward"] = {"error": ((got - expected).norm() / expected.norm()).item(), "fused": count}
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


@pytest.mark.parametrize("case, tolerance, shape", [("tiles_fp32", 1e-5, [64, 32]), ("ragged_fp32", 1e-5, [70, 40]),
                                                    ("no_bias_fp32", 1e-5, [33, 64]), ("fp16", 2e-3, [64, 64])])
def test_kernel_matches_linear_then_geglu(interpreted, case, tolerance, shape):
    """Tiles that fit, ragged edges on every dimension, no bias and fp16 all agree with a float64 GEGLU."""
    result = interpreted[case]
    assert result["error"] < tolerance, result
    assert result["shape"] == shape


def test_kernel_keeps_the_input_dtype(interpreted):
    assert interpreted["fp16"]["dtype"] == "torch.float16"
    assert interpreted["tiles_fp32"]["dtype"] == "torch.float32"


def test_fused_feed_forward_matches_diffusers(interpreted):
    """A diffusers FeedForward (GEGLU, dropout, Linear) over (batch, tokens, width) gives the same output fused."""
    assert interpreted["feed_forward"]["fused"] == 1
    assert interpreted["feed_forward"]["error"] < 1e-5


def test_fusing_keeps_the_unet_output_and_parameters(tiny_model_path):
    _, _, _, unet, _ = load_sd_components(tiny_model_path)
    torch.manual_seed(0)
    sample, text = torch.randn(2, 4, 32, 32), torch.randn(2, 77, unet.config.cross_attention_dim)
    keys = set(unet.state_dict())
    with torch.no_grad():
        expected = unet(sample, 500, encoder_hidden_states=text).sample
        fused = fuse_geglu(unet)
        got = unet(sample, 500, encoder_hidden_states=text).sample
    assert fused == sum(type(m).__name__ == "GEGLU" for m in unet.modules()) > 0
    assert set(unet.state_dict()) == keys
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_kernel_is_used_only_without_autograd_on_a_device():
    x, weight, bias = torch.randn(5, 8), torch.randn(12, 8), torch.randn(12)
    assert not kernels_apply(x)  # a CPU tensor without the interpreter takes the PyTorch path
    value, gate = F.linear(x, weight, bias).chunk(2, dim=-1)
    torch.testing.assert_close(geglu(x, weight, bias), value * F.gelu(gate))

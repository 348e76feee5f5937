"""The fused GEGLU matmul computes `value * gelu(gate)` of one Linear's two halves, as diffusers' GEGLU does.

The Triton kernel runs here on the CPU through Triton's interpreter (`TRITON_INTERPRET=1`, set before Triton is
imported, so those checks run in a subprocess). The kernel takes half precision only; the interpreter's bf16
matmul is broken (garbage for any bf16 `tl.dot`), so bf16 is checked on the GPU by
`benchmarks/check_fused_kernels.py`, and fp16 here.
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
cases = {  # name: (rows, in width, out width, bias)
    "tiles": (64, 64, 32, True),
    "ragged": (70, 48, 40, True),  # no size a multiple of the 32-wide tiles
    "no_bias": (33, 32, 64, False),
}
persistent = fg._geglu_matmul.configs[0].__class__(dict(fg._geglu_matmul.configs[0].kwargs, PERSISTENT=1),
                                                   num_warps=4, num_stages=1, pre_hook=fg._set_tile_shapes)
cases["persistent"] = (70, 48, 40, True)  # four programs walk the 3 x 2 tiles
with torch.no_grad():
    for name, (rows, width, out_width, with_bias) in cases.items():
        if name == "persistent":
            fg._geglu_matmul.configs, fg._geglu_matmul.cache = [persistent], {}
        x = torch.randn(rows, width).half()
        weight = (torch.randn(2 * out_width, width) / width ** 0.5).half()
        bias = torch.randn(2 * out_width).half() if with_bias else None
        out = fg.geglu(x, weight, bias)
        value, gate = F.linear(x.double(), weight.double(), None if bias is None else bias.double()).chunk(2, -1)
        reference = value * F.gelu(gate)
        results[name] = {"error": ((out.double() - reference).norm() / reference.norm()).item(),
                         "dtype": str(out.dtype), "shape": list(out.shape)}

    feed_forward = FeedForward(64, activation_fn="geglu").eval()  # as in SD's transformer blocks
    hidden = torch.randn(2, 10, 64)  # (batch, tokens, width): the kernel sees the tokens as rows
    expected = feed_forward.double()(hidden.double())
    count = fg.fuse_geglu(feed_forward.half())
    got = feed_forward(hidden.half()).double()
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


@pytest.mark.parametrize("case, shape", [("tiles", [64, 32]), ("ragged", [70, 40]), ("no_bias", [33, 64]),
                                         ("persistent", [70, 40])])
def test_kernel_matches_linear_then_geglu(interpreted, case, shape):
    """Tiles that fit, ragged edges on every dimension, no bias and programs that walk several tiles (the
    persistent kind) all agree with a float64 GEGLU, to fp16's rounding of the output (2^-11 = 5e-4)."""
    result = interpreted[case]
    assert result["error"] < 1e-3, result
    assert result["shape"] == shape
    assert result["dtype"] == "torch.float16"


def test_fused_feed_forward_matches_diffusers(interpreted):
    """A diffusers FeedForward (GEGLU, dropout, Linear) over (batch, tokens, width) in fp16 gives float64's output
    to fp16 precision once fused."""
    assert interpreted["feed_forward"]["fused"] == 1
    assert interpreted["feed_forward"]["error"] < 2e-3


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
    x, weight, bias = torch.randn(5, 8), torch.randn(16, 8), torch.randn(16)
    assert not kernels_apply(x.half(), weight.half())  # a CPU tensor without the interpreter takes the PyTorch path
    value, gate = F.linear(x, weight, bias).chunk(2, dim=-1)
    torch.testing.assert_close(geglu(x, weight, bias), value * F.gelu(gate))


def test_kernel_takes_only_half_precision_and_aligned_widths(monkeypatch):
    monkeypatch.setattr(fused_geglu, "INTERPRETED", True)  # as if on the device
    half = torch.randn(5, 8).half(), torch.randn(16, 8).half()
    assert not fused_geglu.kernels_apply(*half)  # autograd on: training keeps PyTorch's differentiable path
    with torch.no_grad():
        assert fused_geglu.kernels_apply(*half)
        assert not fused_geglu.kernels_apply(half[0].float(), half[1].float())  # fp32 would run as TF32
        assert not fused_geglu.kernels_apply(torch.randn(5, 12).half(), torch.randn(16, 12).half())  # 24-byte rows

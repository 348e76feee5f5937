"""The optional FlashAttention-4 backend: its processor feeds the kernel the right Q, K and V views and lays the
output out as the UNet expects, and asking for it where it cannot run is a one-line error. The kernel itself needs
a Hopper GPU; here the custom op gets a CPU implementation (plain attention) for the length of a test, so what is
checked is everything around the kernel."""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from semantic_aug.acceleration import Acceleration
from semantic_aug.acceleration.flash_attention4 import (FlashAttention4Processor, check_flash_attention4,
                                                        flash_attention4_preferred, use_flash_attention4)
from semantic_aug.stages.augmentations.sampler import DiffusionSampler
from semantic_aug.core.stable_diffusion import load_sd_components
from semantic_aug.core.utils import UserError


@pytest.fixture
def cpu_kernel():
    """The custom op on CPU, as plain attention over [batch, tokens, heads, d]; records the shapes it saw."""
    calls = []

    def attention(query, key, value):
        calls.append((tuple(query.shape), tuple(key.shape)))
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
        return out.transpose(1, 2).contiguous()

    library = torch.library.Library("diagen", "IMPL")
    library.impl("flash_attention4", attention, "CPU")
    yield calls
    library._destroy()


def test_processor_gives_the_fused_sdpa_output(tiny_model_path, cpu_kernel):
    _, _, _, unet, _ = load_sd_components(tiny_model_path)
    unet.fuse_qkv_projections()
    torch.manual_seed(0)
    sample = torch.randn(2, 4, 32, 32)
    text = torch.randn(2, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        expected = unet(sample, 500, encoder_hidden_states=text).sample
        taken = use_flash_attention4(unet, max_head_dim=1024, cross_attention=True)
        got = unet(sample, 500, encoder_hidden_states=text).sample
    layers = [m for m in unet.modules() if isinstance(m, Attention)]
    assert taken == len(layers) and all(isinstance(m.processor, FlashAttention4Processor) for m in layers)
    assert len(cpu_kernel) == taken  # every layer went through the op: self-attention and the 77-token cross
    heads = layers[0].heads
    assert {k[1] for _, k in cpu_kernel} >= {77} and all(q[2] == heads for q, _ in cpu_kernel)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_by_default_only_small_head_self_attention_is_taken(tiny_model_path):
    """Where it was measured faster: self-attention at head dimensions up to 64, not cross-attention."""
    _, _, _, unet, _ = load_sd_components(tiny_model_path)
    unet.fuse_qkv_projections()
    layers = [m for m in unet.modules() if isinstance(m, Attention)]
    assert use_flash_attention4(unet, max_head_dim=0) == 0
    taken = use_flash_attention4(unet)
    chosen = [m for m in layers if isinstance(m.processor, FlashAttention4Processor)]
    assert taken == len(chosen) > 0
    assert all(not m.is_cross_attention and m.inner_dim // m.heads <= 64 for m in chosen)
    assert all(m.is_cross_attention for m in layers if m not in chosen)


def test_layers_it_cannot_take_keep_their_processor():
    """The VAE's mid-block attention (group norm, 4-d input, unfused) is not the plain kind."""
    attn = Attention(query_dim=32, heads=1, dim_head=32, norm_num_groups=8, residual_connection=True)
    before = attn.processor
    assert use_flash_attention4(torch.nn.Sequential(attn)) == 0 and attn.processor is before


def test_masked_calls_fall_back(cpu_kernel):
    attn = Attention(query_dim=16, heads=2, dim_head=8)
    attn.fuse_projections()
    fallback_calls = []
    processor = FlashAttention4Processor(lambda *args, **kwargs: fallback_calls.append(args) or "fallback")
    hidden = torch.randn(1, 5, 16)
    assert processor(attn, hidden, attention_mask=torch.ones(1, 5, 5)) == "fallback"
    assert processor(attn, hidden).shape == (1, 5, 16) and len(fallback_calls) == 1 and len(cpu_kernel) == 1


def test_flash4_off_hopper_is_a_one_line_error(tiny_model_path):
    with pytest.raises(UserError, match="needs a Hopper"):
        check_flash_attention4(torch.device("cpu"))
    assert not flash_attention4_preferred(torch.device("cpu"))  # `auto` keeps SDPA off Hopper
    with pytest.raises(UserError, match="attention backend flash4"):
        DiffusionSampler.from_pretrained(tiny_model_path, acceleration=Acceleration(attention="flash4"))

"""Optional attention backend: FlashAttention-4's CuTe-DSL kernels (`pip install flash-attn-4`), for Hopper GPUs.

PyTorch's SDPA runs the SD v1 UNet's head dimension 40 on cuDNN padded to 64. FlashAttention-4's SM90 forward
(the FlashAttention-3 design: warp-specialised producer and consumers, softmax overlapped with the matrix
products) tiles it at 48. `use_flash_attention4(unet)` gives the plain self-attention layers of a diffusers UNet
whose projections are fused (`fuse_qkv_projections`) and whose head dimension is at most `MAX_HEAD_DIM` (in SD v1,
the 64² ones) a processor that calls it, since only there was it measured faster than cuDNN; other layers, and
calls it cannot take (masks, 4-d inputs), keep PyTorch's SDPA. The kernel is wrapped as a `torch.library`
custom op, so that `torch.compile` keeps it in one graph. Its output equals SDPA's within bf16 rounding; the
generator's results are the same images up to that rounding, so the synthetic cache's fingerprint does not
change with it.
"""

from __future__ import annotations

import torch
from torch import nn

from semantic_aug.core.utils import UserError

# Where it beats cuDNN on the H200 (`benchmarks/bench_attention.py`): self-attention at head dimension 40, which
# cuDNN pads to 64 and FlashAttention-4 tiles at 48 (64² in SD v1: 4.00 against 4.42 ms a layer). At head
# dimensions 80 and 160, and for the 77-key cross-attention, cuDNN was faster.
MAX_HEAD_DIM = 64
INSTALL_HINT = "pip install flash-attn-4 (with nvidia-cutlass-dsl[cu13] on CUDA 13)"


@torch.library.custom_op("diagen::flash_attention4", mutates_args=(), device_types="cuda")
def flash_attention4(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for [batch, tokens, heads, d] tensors (strided views allowed), same layout out."""
    from flash_attn.cute import flash_attn_func

    return flash_attn_func(query, key, value)[0]


@flash_attention4.register_fake
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


def check_flash_attention4(device: torch.device) -> None:
    """Raise a one-line UserError unless FlashAttention-4 can run on `device` (a Hopper or newer CUDA GPU)."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
        raise UserError(f"attention backend flash4 needs a Hopper (sm_90) or newer CUDA GPU, not {device}")
    try:
        import flash_attn.cute  # noqa: F401
    except ImportError as error:
        raise UserError(f"attention backend flash4 needs FlashAttention-4 ({error}); {INSTALL_HINT}") from None


def flash_attention4_preferred(device: torch.device) -> bool:
    """Whether the `auto` attention backend takes FlashAttention-4: installed, and a Hopper GPU (sm_90, where it
    was measured faster); anything else keeps PyTorch's SDPA choice."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
        return False
    try:
        check_flash_attention4(device)
    except UserError:
        return False
    return True


class FlashAttention4Processor:
    """A diffusers attention processor for fused projections (`to_qkv`, or `to_q` + `to_kv`) that runs the
    attention itself through `flash_attention4`; calls it cannot take go to `fallback`."""

    def __init__(self, fallback):
        self.fallback = fallback

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, *args, **kwargs) -> torch.Tensor:
        if attention_mask is not None or hidden_states.dim() != 3:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        heads = attn.heads
        if encoder_hidden_states is None:
            query, key, value = attn.to_qkv(hidden_states).unflatten(-1, (3, heads, -1)).unbind(2)
        else:
            query = attn.to_q(hidden_states).unflatten(-1, (heads, -1))
            key, value = attn.to_kv(encoder_hidden_states).unflatten(-1, (2, heads, -1)).unbind(2)
        out = flash_attention4(query, key, value).flatten(2)
        return attn.to_out[1](attn.to_out[0](out))


def takes_flash_attention4(attn: nn.Module) -> bool:
    """Whether `attn` is the plain kind the processor handles: fused projections, default scale, no extra norms."""
    fused = hasattr(attn, "to_qkv") if not attn.is_cross_attention else hasattr(attn, "to_kv")
    plain = all(getattr(attn, name, None) is None for name in ("spatial_norm", "group_norm", "norm_q", "norm_k"))
    return (fused and plain and not attn.norm_cross and not attn.residual_connection
            and attn.rescale_output_factor == 1.0 and attn.scale == (attn.inner_dim // attn.heads) ** -0.5)


def use_flash_attention4(model: nn.Module, max_head_dim: int = MAX_HEAD_DIM, cross_attention: bool = False) -> int:
    """Route the attention layers of `model` that `takes_flash_attention4`, have a head dimension of at most
    `max_head_dim` and are self-attention (unless `cross_attention`) through FlashAttention-4; returns how many
    it took. Call after `fuse_qkv_projections()`."""
    from diffusers.models.attention_processor import Attention

    taken = 0
    for module in model.modules():
        if (isinstance(module, Attention) and takes_flash_attention4(module)
                and module.inner_dim // module.heads <= max_head_dim
                and (cross_attention or not module.is_cross_attention)):
            module.set_processor(FlashAttention4Processor(module.processor))
            taken += 1
    return taken

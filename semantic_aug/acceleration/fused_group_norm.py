"""GroupNorm (+ the SiLU that follows it, + the time-embedding bias before it) as Triton kernels for channels_last.

Stable Diffusion's UNet and VAE run 60-odd GroupNorms per call, almost all followed by SiLU. On an H100, at the
generator's batch, PyTorch's own kernels reach 10% of memory bandwidth on channels_last tensors and the
`torch.compile` versions 30-40%, since both lay the tensor out as NCHW to reduce each group: GroupNorm was a
quarter of the UNet's kernel time (`benchmarks/profile_generation.py`). These kernels read the channels_last
tensor as it lies, in three launches:

1. `_partial_sums`: per image and pixel chunk, per-channel sums of (x - shift) and (x - shift)^2 in fp32, where the
   shift is the image's first pixel (so the variance does not cancel when the mean is large);
2. `_group_moments`: per image and group, the mean and 1/std from those sums (channel means and spreads are
   combined exactly, as in Chan's parallel variance);
3. `_normalize`: y = x * a_c + b_c per channel (the normalisation and affine weights folded), then SiLU if asked.

That is one read for the statistics and one read plus one write for the output. The function computed is
exactly `silu(group_norm(x + bias[:, :, None, None]))` (within float rounding), inference only (no autograd).
`fuse_group_norms(model)` swaps them into the module instances of a diffusers UNet or VAE (the diffusers classes
are left as they are, so other models are untouched). Elsewhere (CPU, no Triton) `group_norm` runs the PyTorch
operations, so callers need no case of their own.
"""

from __future__ import annotations

import os
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch path below is used
    triton = None

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton reads this once too, when kernels are defined
# Launch configuration: the best over the UNet's and VAE's shapes on an H100 (benchmarks/bench_group_norm.py --sweep,
# log in benchmarks/results/bench_group_norm.log): 3.95 ms for all ten shapes against 5.23 ms before.
TILE_ELEMENTS = 16384  # elements of one [pixels, channels] tile a program holds
NUM_WARPS = 4
STATS_TILES = 4  # tiles one statistics program sums
NORMALIZE_TILES = 4  # tiles one output program writes


@dataclass(frozen=True)
class GroupNormLaunch:
    """How the kernels are launched: a program holds a [pixels, channels] tile of `tile_elements` (all channels,
    padded to a power of two) with `num_warps` warps and walks `stats_tiles` (statistics) or `normalize_tiles`
    (output) tiles of one image. The defaults are the measured best (see `TILE_ELEMENTS`)."""

    tile_elements: int = TILE_ELEMENTS
    num_warps: int = NUM_WARPS
    stats_tiles: int = STATS_TILES
    normalize_tiles: int = NORMALIZE_TILES


DEFAULT_LAUNCH = GroupNormLaunch()


if triton is not None:
    @triton.jit
    def _partial_sums(x_ptr, bias_ptr, sums_ptr, squares_ptr, HW, C, chunk_pixels, num_chunks,
                      HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        n = tl.program_id(0)
        chunk = tl.program_id(1)
        channels = tl.arange(0, BLOCK_C)
        channel_ok = channels < C
        image = x_ptr + n.to(tl.int64) * HW * C
        shift = tl.load(image + channels, mask=channel_ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + n * C + channels, mask=channel_ok, other=0.0).to(tl.float32)
            shift += bias
        total = tl.zeros([BLOCK_C], dtype=tl.float32)
        total_sq = tl.zeros([BLOCK_C], dtype=tl.float32)
        start = chunk * chunk_pixels
        for offset in range(0, chunk_pixels, BLOCK_P):
            pixels = start + offset + tl.arange(0, BLOCK_P)
            ok = (pixels < HW)[:, None] & channel_ok[None, :]
            x = tl.load(image + pixels[:, None].to(tl.int64) * C + channels[None, :], mask=ok, other=0.0)
            x = x.to(tl.float32)
            if HAS_BIAS:
                x += bias[None, :]
            x = tl.where(ok, x - shift[None, :], 0.0)
            total += tl.sum(x, axis=0)
            total_sq += tl.sum(x * x, axis=0)
        out = (n * num_chunks + chunk) * C + channels
        tl.store(sums_ptr + out, total, mask=channel_ok)
        tl.store(squares_ptr + out, total_sq, mask=channel_ok)

    @triton.jit
    def _group_moments(x_ptr, bias_ptr, sums_ptr, squares_ptr, mean_ptr, rstd_ptr, HW, C, G, num_chunks, eps,
                       HAS_BIAS: tl.constexpr, BLOCK_G: tl.constexpr):
        n = tl.program_id(0)
        group = tl.program_id(1)
        group_size = C // G
        channels = group * group_size + tl.arange(0, BLOCK_G)
        ok = tl.arange(0, BLOCK_G) < group_size
        shift = tl.load(x_ptr + n.to(tl.int64) * HW * C + channels, mask=ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            shift += tl.load(bias_ptr + n * C + channels, mask=ok, other=0.0).to(tl.float32)
        total = tl.zeros([BLOCK_G], dtype=tl.float32)
        total_sq = tl.zeros([BLOCK_G], dtype=tl.float32)
        for chunk in range(0, num_chunks):
            row = (n * num_chunks + chunk) * C + channels
            total += tl.load(sums_ptr + row, mask=ok, other=0.0)
            total_sq += tl.load(squares_ptr + row, mask=ok, other=0.0)
        count = HW.to(tl.float32)
        shifted_mean = total / count  # each channel's mean relative to its own shift
        channel_m2 = tl.maximum(total_sq - total * shifted_mean, 0.0)
        channel_mean = shifted_mean + shift
        group_mean = tl.sum(tl.where(ok, channel_mean, 0.0), axis=0) / group_size
        spread = tl.where(ok, channel_mean - group_mean, 0.0)
        m2 = tl.sum(tl.where(ok, channel_m2, 0.0), axis=0) + count * tl.sum(spread * spread, axis=0)
        variance = m2 / (count * group_size)
        tl.store(mean_ptr + n * G + group, group_mean)
        tl.store(rstd_ptr + n * G + group, 1.0 / tl.sqrt(variance + eps))

    @triton.jit
    def _normalize(x_ptr, bias_ptr, weight_ptr, affine_bias_ptr, mean_ptr, rstd_ptr, out_ptr, HW, C, G,
                   chunk_pixels, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_P: tl.constexpr,
                   BLOCK_C: tl.constexpr):
        n = tl.program_id(0)
        chunk = tl.program_id(1)
        channels = tl.arange(0, BLOCK_C)
        channel_ok = channels < C
        groups = channels // (C // G)
        mean = tl.load(mean_ptr + n * G + groups, mask=channel_ok, other=0.0)
        rstd = tl.load(rstd_ptr + n * G + groups, mask=channel_ok, other=0.0)
        weight = tl.load(weight_ptr + channels, mask=channel_ok, other=0.0).to(tl.float32)
        affine_bias = tl.load(affine_bias_ptr + channels, mask=channel_ok, other=0.0).to(tl.float32)
        scale = rstd * weight
        offset_c = affine_bias - mean * scale
        if HAS_BIAS:
            offset_c += tl.load(bias_ptr + n * C + channels, mask=channel_ok, other=0.0).to(tl.float32) * scale
        image = n.to(tl.int64) * HW * C
        start = chunk * chunk_pixels
        for offset in range(0, chunk_pixels, BLOCK_P):
            pixels = start + offset + tl.arange(0, BLOCK_P)
            ok = (pixels < HW)[:, None] & channel_ok[None, :]
            where = image + pixels[:, None].to(tl.int64) * C + channels[None, :]
            x = tl.load(x_ptr + where, mask=ok, other=0.0).to(tl.float32)
            y = x * scale[None, :] + offset_c[None, :]
            if SILU:
                y = y * tl.sigmoid(y)
            tl.store(out_ptr + where, y.to(out_ptr.dtype.element_ty), mask=ok)

    @torch.library.custom_op("diagen::group_norm_nhwc", mutates_args=())
    def _group_norm_nhwc(x: torch.Tensor, weight: torch.Tensor, affine_bias: torch.Tensor,
                         bias: torch.Tensor | None, num_groups: int, eps: float, silu: bool, tile_elements: int,
                         num_warps: int, stats_tiles: int, normalize_tiles: int) -> torch.Tensor:
        return run_kernels(x, weight, affine_bias, bias, num_groups, eps, silu, tile_elements, num_warps, stats_tiles,
                           normalize_tiles)

    @_group_norm_nhwc.register_fake
    def _(x, weight, affine_bias, bias, num_groups, eps, silu, tile_elements, num_warps, stats_tiles,
          normalize_tiles):
        return torch.empty_like(x, memory_format=torch.channels_last)


def run_kernels(x: torch.Tensor, weight: torch.Tensor, affine_bias: torch.Tensor, bias: torch.Tensor | None,
                num_groups: int, eps: float, silu: bool, tile_elements: int | None = None, num_warps: int | None = None,
                stats_tiles: int | None = None, normalize_tiles: int | None = None) -> torch.Tensor:
    """Run the three kernels on a 4-D tensor (any layout; read as channels_last).

    The launch settings are those of `GroupNormLaunch`; None takes the module's defaults.
    """
    tile_elements, num_warps = tile_elements or TILE_ELEMENTS, num_warps or NUM_WARPS
    stats_tiles, normalize_tiles = stats_tiles or STATS_TILES, normalize_tiles or NORMALIZE_TILES
    x = x.contiguous(memory_format=torch.channels_last)
    batch, channels, height, width = x.shape
    pixels = height * width
    out = torch.empty_like(x, memory_format=torch.channels_last)
    block_c = triton.next_power_of_2(channels)
    block_p = min(max(1, tile_elements // block_c), triton.next_power_of_2(pixels))
    stats_pixels = block_p * stats_tiles
    stats_chunks = triton.cdiv(pixels, stats_pixels)
    sums = torch.empty(batch, stats_chunks, channels, device=x.device, dtype=torch.float32)
    squares = torch.empty_like(sums)
    mean = torch.empty(batch, num_groups, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    has_bias = bias is not None
    bias = bias.reshape(batch, channels).contiguous() if has_bias else sums  # unused when has_bias is False
    _partial_sums[(batch, stats_chunks)](x, bias, sums, squares, pixels, channels, stats_pixels, stats_chunks,
                                         HAS_BIAS=has_bias, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=num_warps)
    _group_moments[(batch, num_groups)](x, bias, sums, squares, mean, rstd, pixels, channels, num_groups,
                                        stats_chunks, eps, HAS_BIAS=has_bias,
                                        BLOCK_G=triton.next_power_of_2(channels // num_groups))
    normalize_pixels = block_p * normalize_tiles
    _normalize[(batch, triton.cdiv(pixels, normalize_pixels))](
        x, bias, weight, affine_bias, mean, rstd, out, pixels, channels, num_groups, normalize_pixels,
        HAS_BIAS=has_bias, SILU=silu, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=num_warps)
    return out


def kernels_apply(x: torch.Tensor) -> bool:
    """Whether `group_norm` runs the Triton kernels for `x`: a CUDA tensor of 3 or 4 dims with Triton present and
    autograd off (a CPU tensor too under `TRITON_INTERPRET=1`, Triton's interpreter, which the tests use)."""
    on_device = x.is_cuda or INTERPRETED
    return triton is not None and on_device and x.dim() in (3, 4) and not torch.is_grad_enabled()


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor, affine_bias: torch.Tensor, eps: float,
               silu: bool = False, bias: torch.Tensor | None = None,
               launch: GroupNormLaunch = DEFAULT_LAUNCH) -> torch.Tensor:
    """`silu?(group_norm(x + bias))`: x (N, C, H, W) or (N, C, L); bias (N, C) or None, added per image and channel;
    `launch` configures the kernels where they run."""
    if kernels_apply(x):
        flat = x.unsqueeze(-1) if x.dim() == 3 else x
        out = _group_norm_nhwc(flat, weight, affine_bias, bias, num_groups, eps, silu, launch.tile_elements,
                               launch.num_warps, launch.stats_tiles, launch.normalize_tiles)
        return out.squeeze(-1) if x.dim() == 3 else out
    if bias is not None:
        x = x + bias.reshape(*bias.shape[:2], *([1] * (x.dim() - 2)))
    out = F.group_norm(x, num_groups, weight, affine_bias, eps)
    return F.silu(out) if silu else out


class FusedGroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` (same parameters and state dict) through `group_norm`, optionally followed by SiLU; `forward`
    also takes a per-image, per-channel `bias` added before the norm. `launch` configures the kernels."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, silu: bool = False,
                 launch: GroupNormLaunch = DEFAULT_LAUNCH, **kwargs):
        super().__init__(num_groups, num_channels, eps=eps, affine=True, **kwargs)
        self.silu, self.launch = silu, launch

    @classmethod
    def replacing(cls, norm: nn.GroupNorm, silu: bool = False,
                  launch: GroupNormLaunch = DEFAULT_LAUNCH) -> "FusedGroupNorm":
        fused = cls(norm.num_groups, norm.num_channels, eps=norm.eps, silu=silu, launch=launch,
                    device=norm.weight.device, dtype=norm.weight.dtype)
        fused.load_state_dict(norm.state_dict())
        return fused

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps, silu=self.silu, bias=bias,
                          launch=self.launch)


def _fused_resnet_forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args, **kwargs):
    """diffusers' `ResnetBlock2D.forward` for its plain form (no resampling, additive time embedding), where norm1
    and norm2 are `FusedGroupNorm`s with the SiLU after them, and the time embedding is added inside norm2."""
    hidden = self.conv1(self.norm1(input_tensor))
    time_bias = None
    if self.time_emb_proj is not None and temb is not None:
        time_bias = self.time_emb_proj(temb if self.skip_time_act else self.nonlinearity(temb))
    hidden = self.norm2(hidden, bias=time_bias)
    hidden = self.conv2(self.dropout(hidden))
    shortcut = self.conv_shortcut(input_tensor) if self.conv_shortcut is not None else input_tensor
    return (shortcut + hidden) / self.output_scale_factor


def _plain_resnet(module: nn.Module) -> bool:
    return (type(module).__name__ == "ResnetBlock2D" and module.upsample is None and module.downsample is None
            and module.time_embedding_norm == "default" and isinstance(module.nonlinearity, nn.SiLU)
            and all(type(getattr(module, name)) is nn.GroupNorm for name in ("norm1", "norm2")))


def fuse_group_norms(model: nn.Module, launch: GroupNormLaunch = DEFAULT_LAUNCH) -> int:
    """Swap the fused kernels into a diffusers UNet, VAE or any module holding such blocks; returns the count.

    Plain `ResnetBlock2D`s get fused GroupNorm+SiLU norms and, on the instance, a forward that uses them (the time
    embedding added inside the second norm); a model's `conv_norm_out` followed by a SiLU `conv_act` becomes one fused
    norm; every other `nn.GroupNorm` (transformer and attention norms) becomes a `FusedGroupNorm`. Parameters are
    untouched, and so are the diffusers classes: only `model`'s own modules change.
    """
    fused = 0
    for module in list(model.modules()):
        if _plain_resnet(module):
            module.norm1 = FusedGroupNorm.replacing(module.norm1, silu=True, launch=launch)
            module.norm2 = FusedGroupNorm.replacing(module.norm2, silu=True, launch=launch)
            module.forward = types.MethodType(_fused_resnet_forward, module)
            fused += 2
        norm, act = getattr(module, "conv_norm_out", None), getattr(module, "conv_act", None)
        if type(norm) is nn.GroupNorm and isinstance(act, nn.SiLU):
            module.conv_norm_out = FusedGroupNorm.replacing(norm, silu=True, launch=launch)
            module.conv_act = nn.Identity()
            fused += 1
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.GroupNorm:
                setattr(parent, name, FusedGroupNorm.replacing(child, launch=launch))
                fused += 1
    return fused

"""The feed-forward's GEGLU (`value * gelu(gate)` of one Linear's two halves) as one Triton matmul kernel.

Stable Diffusion's transformer blocks project each token to 8x its width (the value and the gate halves of a
GEGLU), then combine the halves into 4x. Done as PyTorch does it, the matmul writes the 8x tensor and a second
kernel reads it back to write the 4x result: at the generator's batch on an H100 that second pass alone took
5.8 ms of a 127 ms UNet call (`benchmarks/profile_generation.py`), and the 8x write as much again. This kernel
computes a tile of the value half and the same tile of the gate half in two accumulators, from one read of the
input tile, and writes only `(x W_v + b_v) * gelu(x W_g + b_g)`: the 8x tensor never reaches memory.

The activation is the exact (erf) GELU that `F.gelu` computes by default, on fp32 accumulators (PyTorch rounds
the projection to the weight dtype first, so the fused result is slightly closer to the fp32 one). Inference
only. `fuse_geglu(model)` swaps it into a diffusers model's `GEGLU` modules; off CUDA, or with autograd on, they
run the PyTorch operations as before.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from semantic_aug.fused_group_norm import INTERPRETED, triton

if triton is not None:
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor

    def _set_tile_shapes(args: dict) -> None:
        """Autotuning tries tiles of several sizes: give the tensor descriptors each configuration's tile."""
        block_m, block_n, block_k = args["BLOCK_M"], args["BLOCK_N"], args["BLOCK_K"]
        args["x_desc"].block_shape = [block_m, block_k]
        args["value_desc"].block_shape = args["gate_desc"].block_shape = [block_n, block_k]
        args["out_desc"].block_shape = [block_m, block_n]

    def _configs() -> list:
        if INTERPRETED:  # the CPU interpreter: one small tile, so tests take seconds (they swap in the other kind)
            tiles = ((32, 32, 32, 4, 1, 0),)
        else:  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, persistent); two fp32 accumulators of BLOCK_M x BLOCK_N
            tiles = ((128, 128, 64, 8, 3, 0), (128, 64, 64, 4, 3, 0), (64, 128, 64, 4, 3, 0), (128, 64, 64, 4, 2, 0),
                     (128, 128, 64, 8, 3, 1), (128, 128, 64, 8, 4, 1), (128, 64, 64, 4, 3, 1), (128, 64, 64, 4, 4, 1),
                     (64, 128, 64, 4, 3, 1))
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8, "PERSISTENT": persistent},
                              num_warps=warps, num_stages=stages, pre_hook=_set_tile_shapes)
                for m, n, k, warps, stages, persistent in tiles]

    @triton.autotune(configs=_configs(), key=["M", "N", "K"])
    @triton.jit
    def _geglu_matmul(x_desc, value_desc, gate_desc, b_ptr, out_desc, M, N, K, HAS_BIAS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                      PERSISTENT: tl.constexpr):
        # one tile per program, or (PERSISTENT) one program per SM walking tiles, loading the next tile's inputs
        # while it finishes the last (the loops are flattened for the pipeliner)
        tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * tiles_n
        for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, tl.num_programs(0), flatten=True):
            # tiles walk GROUP_M row tiles per column tile, so neighbours share input rows in L2
            first_m = (tile // per_group) * GROUP_M
            group_m = min(tiles_m - first_m, GROUP_M)
            row = (first_m + (tile % per_group) % group_m) * BLOCK_M
            col = ((tile % per_group) // group_m) * BLOCK_N
            value = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for step in range(tl.cdiv(K, BLOCK_K)):  # the tensor descriptors fill tiles past the edges with zeros
                x = x_desc.load([row, step * BLOCK_K])
                value = tl.dot(x, value_desc.load([col, step * BLOCK_K]).T, value)
                gate = tl.dot(x, gate_desc.load([col, step * BLOCK_K]).T, gate)
            if HAS_BIAS:
                cols = col + tl.arange(0, BLOCK_N)
                value += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
                gate += tl.load(b_ptr + N + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
            out = value * (0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476)))
            out_desc.store([row, col], out.to(out_desc.dtype))  # clipped at the edges

    @torch.library.custom_op("diagen::geglu", mutates_args=())
    def _geglu_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return _launch(x, weight, bias)

    @_geglu_op.register_fake
    def _(x, weight, bias):
        return x.new_empty(x.shape[0], weight.shape[0] // 2)


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (M, K) and the Linear's weight (2N, K), bias (2N,) or None -> (M, N), in x's dtype (see `kernels_apply`)."""
    x, weight = x.contiguous(), weight.contiguous()
    rows, width = x.shape
    half = weight.shape[0] // 2
    out = x.new_empty(rows, half)
    tile = [16, 16]  # placeholders: each autotuning configuration sets its own tile shapes
    descriptors = [TensorDescriptor.from_tensor(tensor, tile) for tensor in (x, weight[:half], weight[half:], out)]

    def grid(meta):
        tiles = triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(half, meta["BLOCK_N"])
        return (min(tiles, _multiprocessors(x.device)) if meta["PERSISTENT"] else tiles,)

    _geglu_matmul[grid](descriptors[0], descriptors[1], descriptors[2], bias if bias is not None else weight,
                        descriptors[3], rows, half, width, HAS_BIAS=bias is not None)
    return out


def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def kernels_apply(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `geglu` runs the Triton kernel: a CUDA tensor (or the interpreter's CPU one), autograd off, half
    precision (the kernel's fp32 matmul would be TF32), widths a multiple of 8 (16-byte rows for the tile copies)."""
    return (triton is not None and (x.is_cuda or INTERPRETED) and not torch.is_grad_enabled()
            and x.dtype in (torch.float16, torch.bfloat16) and weight.dtype == x.dtype
            and x.shape[-1] % 8 == 0 and weight.shape[0] % 16 == 0)


def geglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`value * gelu(gate)` where `value, gate = (x @ weight.T + bias).chunk(2, -1)`, over x's last dimension."""
    if kernels_apply(x, weight):
        out = _geglu_op(x.reshape(-1, x.shape[-1]), weight, bias)
        return out.reshape(*x.shape[:-1], out.shape[-1])
    value, gate = F.linear(x, weight, bias).chunk(2, dim=-1)
    return value * F.gelu(gate)


def _fused_geglu_forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return geglu(hidden_states, self.proj.weight, self.proj.bias)


def fuse_geglu(model: nn.Module) -> int:
    """Give every diffusers `GEGLU` in `model` the fused forward (parameters untouched); returns the count."""
    fused = 0
    for module in model.modules():
        if type(module).__name__ == "GEGLU" and isinstance(getattr(module, "proj", None), nn.Linear):
            module.forward = types.MethodType(_fused_geglu_forward, module)
            fused += 1
    return fused

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

    def _configs() -> list:
        if INTERPRETED:  # the CPU interpreter: one small tile, so tests take seconds
            return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2})]
        tiles = ((128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (256, 64, 64, 8, 3),
                 (64, 256, 64, 8, 3), (128, 128, 32, 8, 4))
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=warps,
                              num_stages=stages) for m, n, k, warps, stages in tiles]

    @triton.autotune(configs=_configs(), key=["M", "N", "K"])
    @triton.jit
    def _geglu_matmul(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        # programs walk GROUP_M row tiles per column tile, so neighbours share input rows in L2
        pid = tl.program_id(0)
        tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * tiles_n
        first_m = (pid // per_group) * GROUP_M
        group_m = min(tiles_m - first_m, GROUP_M)
        tile_m = first_m + (pid % per_group) % group_m
        tile_n = (pid % per_group) // group_m
        rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        row_ok, col_ok = rows < M, cols < N
        x_tile = x_ptr + rows[:, None].to(tl.int64) * K + ks[None, :]
        value_tile = w_ptr + cols[None, :].to(tl.int64) * K + ks[:, None]  # W is (2N, K): value rows, then gate rows
        gate_tile = value_tile + N * K
        value = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            k_ok = ks < K - k
            a = tl.load(x_tile, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w_ok = k_ok[:, None] & col_ok[None, :]
            value = tl.dot(a, tl.load(value_tile, mask=w_ok, other=0.0), value)
            gate = tl.dot(a, tl.load(gate_tile, mask=w_ok, other=0.0), gate)
            x_tile += BLOCK_K
            value_tile += BLOCK_K
            gate_tile += BLOCK_K
        if HAS_BIAS:
            value += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            gate += tl.load(b_ptr + N + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        out = value * (0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476)))
        where = out_ptr + rows[:, None].to(tl.int64) * N + cols[None, :]
        tl.store(where, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    @torch.library.custom_op("diagen::geglu", mutates_args=())
    def _geglu_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return _launch(x, weight, bias)

    @_geglu_op.register_fake
    def _(x, weight, bias):
        return x.new_empty(x.shape[0], weight.shape[0] // 2)


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (M, K) and the Linear's weight (2N, K), bias (2N,) or None -> (M, N), in x's dtype."""
    x, weight = x.contiguous(), weight.contiguous()
    rows, width = x.shape
    half = weight.shape[0] // 2
    out = x.new_empty(rows, half)
    has_bias = bias is not None
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(half, meta["BLOCK_N"]),)  # noqa: E731
    _geglu_matmul[grid](x, weight, bias if has_bias else weight, out, rows, half, width, HAS_BIAS=has_bias)
    return out


def kernels_apply(x: torch.Tensor) -> bool:
    """Whether `geglu` runs the Triton kernel: a CUDA tensor (or the interpreter's CPU one), autograd off."""
    return triton is not None and (x.is_cuda or INTERPRETED) and not torch.is_grad_enabled()


def geglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`value * gelu(gate)` where `value, gate = (x @ weight.T + bias).chunk(2, -1)`, over x's last dimension."""
    if kernels_apply(x):
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

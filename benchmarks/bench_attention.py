"""The UNet's 64² self-attention (4096 tokens, 8 heads, head dimension 40): cuDNN's SDPA against a Triton
flash-attention kernel written for this shape, in bf16 on the GPU.

cuDNN runs head dimension 40 as 64 and does its exponentials and its matrix products one after the other: about
4.5 ms per layer at 64 rows, against floors of ~2.2 ms (exponentials) and ~2.8 ms (d64 products). The Triton
kernel is a plain FlashAttention-2 loop (online softmax, exp2 with the scale folded in); the sweep tries its tile
shapes, warps, pipeline depths, and Triton's warp specialisation where this Triton has it. It reads Q, K and V
where the fused QKV projection left them (one [rows, 960] buffer, head h at columns h*40), as the UNet would.

    python benchmarks/bench_attention.py                   # on the GPU (about a minute)
    TRITON_INTERPRET=1 python benchmarks/bench_attention.py --check-only --device cpu   # correctness, small, fp32
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from semantic_aug.utils import run_cli  # noqa: E402

LOG2E = 1.4426950408889634


@triton.jit
def _attention_forward(q_ptr, k_ptr, v_ptr, o_ptr, stride_b, stride_h, stride_n, o_stride_b, o_stride_h,
                       o_stride_n, H, N_CTX, scale_log2, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr,
                       WARP_SPECIALIZE: tl.constexpr):
    block = tl.program_id(0)
    bh = tl.program_id(1)
    batch, head = bh // H, bh % H
    offset = batch.to(tl.int64) * stride_b + head * stride_h
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, D_PAD)
    dim_ok = dims < HEAD_DIM
    q = tl.load(q_ptr + offset + rows[:, None] * stride_n + dims[None, :], mask=dim_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for start in tl.range(0, N_CTX, BLOCK_N, num_stages=STAGES, warp_specialize=WARP_SPECIALIZE):
        cols = start + tl.arange(0, BLOCK_N)
        k_t = tl.load(k_ptr + offset + cols[None, :] * stride_n + dims[:, None], mask=dim_ok[:, None], other=0.0)
        scores = tl.dot(q, k_t)
        m_new = tl.maximum(m_i, tl.max(scores, 1) * scale_log2)
        p = tl.math.exp2(scores * scale_log2 - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + offset + cols[:, None] * stride_n + dims[None, :], mask=dim_ok[None, :], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    out = acc / l_i[:, None]
    o_offset = batch.to(tl.int64) * o_stride_b + head * o_stride_h
    tl.store(o_ptr + o_offset + rows[:, None] * o_stride_n + dims[None, :], out.to(o_ptr.dtype.element_ty),
             mask=dim_ok[None, :])


def triton_attention(q, k, v, block_m=128, block_n=64, warps=4, stages=2, warp_specialize=False):
    """softmax(q k^T / sqrt(d)) v for [B, H, N, d] views that share strides (the fused QKV buffer's)."""
    batch, heads, tokens, head_dim = q.shape
    assert q.stride() == k.stride() == v.stride() and q.stride(-1) == 1 and tokens % block_n == 0
    out = torch.empty(batch, tokens, heads, head_dim, device=q.device, dtype=q.dtype).transpose(1, 2)
    grid = (triton.cdiv(tokens, block_m), batch * heads)
    _attention_forward[grid](q, k, v, out, q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1),
                             out.stride(2), heads, tokens, LOG2E / math.sqrt(head_dim), HEAD_DIM=head_dim,
                             D_PAD=max(16, triton.next_power_of_2(head_dim)), BLOCK_M=block_m, BLOCK_N=block_n,
                             STAGES=stages, WARP_SPECIALIZE=warp_specialize, num_warps=warps)
    return out


def fused_qkv(batch, tokens, heads, head_dim, device, dtype, seed):
    """Q, K, V as [B, H, N, d] views into one [B, N, 3 * H * d] buffer, as the fused projection leaves them."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    qkv = torch.randn(batch, tokens, 3 * heads * head_dim, generator=generator).to(device, dtype)
    return [t.view(batch, tokens, heads, head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=-1)]


def relative_error(value, reference):
    return ((value.double() - reference).norm() / reference.norm()).item()


def check(device, dtype, batch, tokens, heads=8, head_dim=40, configs=((32, 16, 4, 1, False),)):
    q, k, v = fused_qkv(batch, tokens, heads, head_dim, device, dtype, seed=1)
    reference = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    plain = relative_error(F.scaled_dot_product_attention(q, k, v), reference)
    for config in configs:
        out = triton_attention(q, k, v, *config)
        error = relative_error(out, reference)
        verdict = "ok" if error <= max(2 * plain, 1e-5) else "WRONG"
        print(f"check {tuple(config)}: error {error:.2e} (SDPA in {str(dtype)[6:]}: {plain:.2e}) {verdict}", flush=True)


def main(args):
    device = torch.device(args.device)
    if args.check_only:
        check(device, torch.float32, batch=2, tokens=64)
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = fused_qkv(args.batch, 4096, 8, 40, device, torch.bfloat16, seed=0)
    flops = 4 * args.batch * 8 * 4096 * 4096 * 40
    timings = {}
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        ms = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(q, k, v), return_mode="median")
    timings["cudnn"] = ms
    print(f"cudnn SDPA: {ms:.3f} ms ({flops / ms / 1e9:.0f} TFLOP/s at d40)", flush=True)
    configs = list(itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3), (False, True)))
    good = []
    for config in configs:
        block_m, block_n, warps, stages, ws = config
        if block_m == 64 and warps == 8:
            continue
        try:
            ms = triton.testing.do_bench(lambda: triton_attention(q, k, v, *config), return_mode="median")
        except Exception as error:  # a configuration this Triton cannot build
            print(f"triton {config}: failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}", flush=True)
            continue
        timings[config] = ms
        good.append(config)
        print(f"triton BM{block_m} BN{block_n} warps{warps} stages{stages} ws{int(ws)}: {ms:.3f} ms "
              f"({flops / ms / 1e9:.0f} TFLOP/s)", flush=True)
    best = sorted(good, key=timings.get)[:3]
    check(device, torch.bfloat16, batch=4, tokens=4096, configs=best)
    if best:
        print(f"best triton {best[0]}: {timings[best[0]]:.3f} ms against cudnn {timings['cudnn']:.3f} ms "
              f"({timings['cudnn'] / timings[best[0]]:.2f}x)", flush=True)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=64, help="UNet rows (2 x images)")
    parser.add_argument("--check-only", action="store_true", help="only the small correctness check")
    return parser.parse_args()


if __name__ == "__main__":
    run_cli(main, parse_args)

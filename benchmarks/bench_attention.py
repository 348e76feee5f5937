"""Attention kernels at every attention shape of the SD v1 UNet, at the generator's batch: per SDPA backend and,
where the cuDNN frontend's Python package is installed, per cuDNN execution plan.

The UNet of SD v1.4 at 512² (64² latents) has self-attention and cross-attention (77 text tokens) at 64²
(head dim 40), 32² (80) and 16² (160), five layers of each per level (two down, three up), and one of each in
the middle block at 8² (160); eight heads everywhere. Q, K and V are strided views of the fused projections, as
in the sampler (`fuse_qkv_projections`), and the output is written in the token-major layout the next linear
layer reads. For each shape the script prints the time per layer of every SDPA backend and of every plan the
cuDNN frontend (`nvidia-cudnn-frontend`, optional) builds, checked against PyTorch's output, and at the end the
per-call attention time of PyTorch's cuDNN choice against the fastest kernel per shape. Where `flash-attn-4`
is installed, its kernel (`semantic_aug.acceleration.flash_attention4`, the sampler's `flash4` backend) is timed and
checked too. (The guidance prefix runs one 64² self-attention on half the rows; the totals count it in full.)
First it measures the rate of the exponential unit, one and two 16-bit values per instruction, which bounds
any softmax: a 64² self-attention layer takes 4096² x 8 heads x rows exponentials.

From the checkout's root, with the package installed (`make setup`) or `PYTHONPATH=.` in front:
    python -m benchmarks.bench_attention [--images 32] [--repeats 20] [--backends cudnn,flash,efficient,math]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.cuda_timing import cuda_time
from semantic_aug.acceleration import sdpa_backends_by_name
from semantic_aug.core.utils import UserError, run_cli

HEADS, TEXT_TOKENS = 8, 77
SHAPES = [  # (name, query tokens, head dim, layers per UNet call)
    ("64^2", 4096, 40, 5), ("32^2", 1024, 80, 5), ("16^2", 256, 160, 5), ("8^2", 64, 160, 1)]
BACKENDS = ("cudnn", "flash", "efficient", "math")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32,
                        help="images per generator call (attention batch is twice that)")
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats of each kernel (median)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated SDPA backends to time")
    parser.add_argument("--no-cudnn-plans", action="store_true", help="skip the cuDNN frontend's plan sweep")
    parser.add_argument("--no-exp-rate", action="store_true", help="skip the exponential-unit rate")
    parser.add_argument("--no-flash4", action="store_true", help="skip FlashAttention-4 (timed when installed)")
    parser.add_argument("--flash4-tiles", action="store_true",
                        help="also sweep FlashAttention-4's tile sizes and options for the head-dim-40 self-attention")
    parser.add_argument("--shapes", default=None, help="comma-separated levels to time (default: all; e.g. 64^2)")
    return parser.parse_args()


EXP_FORMS = {  # name -> (PTX: one base-2 exponential of -$1 into $0, values per 32-bit register, their dtype)
    "f32": ("{ .reg .f32 t; neg.f32 t, $1; ex2.approx.ftz.f32 $0, t; }", 1, torch.float32),
    "f16x2": ("{ .reg .b32 t; neg.f16x2 t, $1; ex2.approx.f16x2 $0, t; }", 2, torch.float16),
    "bf16x2": ("{ .reg .b32 t; neg.bf16x2 t, $1; ex2.approx.ftz.bf16x2 $0, t; }", 2, torch.bfloat16),
}


def exp_rate(rows: int, repeats: int, iterations: int = 4096, block: int = 1024) -> None:
    """Exponentials per second of the special-function unit: each thread runs independent chains x <- 2^-x."""
    import triton
    import triton.language as tl

    @triton.jit
    def exp_chains(x_ptr, ITERATIONS: tl.constexpr, BLOCK: tl.constexpr, ASM: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offsets)
        for _ in range(ITERATIONS):
            x = tl.inline_asm_elementwise(ASM, "=r,r", [x], dtype=tl.int32, is_pure=True, pack=1)
        tl.store(x_ptr + offsets, x)

    programs = 16 * torch.cuda.get_device_properties(0).multi_processor_count
    layer = 4096 * 4096 * HEADS * rows  # exponentials of one 64² self-attention layer
    for name, (asm, per_register, dtype) in EXP_FORMS.items():
        x = torch.rand(programs * block * per_register, device="cuda", dtype=dtype).view(torch.int32)
        try:
            ms = cuda_time(lambda: exp_chains[(programs,)](x, ITERATIONS=iterations, BLOCK=block, ASM=asm,
                                                           num_warps=4), repeats)
        except Exception as failure:  # an instruction this chip or Triton lacks
            print(f"exp2 {name}: unavailable ({type(failure).__name__}: {str(failure).splitlines()[0][:90]})")
            continue
        rate = programs * block * per_register * iterations / ms * 1e3
        print(f"exp2 {name}: {rate / 1e12:.2f}e12 exponentials/s; a 64^2 self-attention layer's "
              f"{layer / 1e9:.1f}e9 take at least {layer / rate * 1e3:.2f} ms", flush=True)


def unet_layout(rows: int, tokens: int, head_dim: int, cross: bool):
    """Q, K, V as the fused projections leave them and a token-major output, all [rows, heads, tokens, d]."""
    width = HEADS * head_dim

    def split(fused: torch.Tensor):
        return (p.view(rows, -1, HEADS, head_dim).transpose(1, 2) for p in fused.split(width, dim=-1))

    options = dict(device="cuda", dtype=torch.bfloat16)
    if cross:
        (q,) = split(torch.randn(rows, tokens, width, **options))
        k, v = split(torch.randn(rows, TEXT_TOKENS, 2 * width, **options))
    else:
        q, k, v = split(torch.randn(rows, tokens, 3 * width, **options))
    out = torch.empty(rows, tokens, HEADS, head_dim, **options).transpose(1, 2)
    return q, k, v, out


def sdpa_backends(q, k, v, backends, repeats: int) -> dict[str, float]:
    """Milliseconds of `scaled_dot_product_attention(q, k, v)` on each named SDPA backend that can run it."""
    from torch.nn.attention import sdpa_kernel

    kinds = sdpa_backends_by_name()
    times = {}
    for name in backends:
        try:
            with sdpa_kernel([kinds[name]]):
                times[f"sdpa {name}"] = cuda_time(lambda: F.scaled_dot_product_attention(q, k, v), repeats)
        except RuntimeError as error:
            print(f"    sdpa {name}: unavailable ({str(error).splitlines()[0][:90]})", flush=True)
    return times


def flash_attention4_checked(name: str, run, reference, repeats: int) -> float:
    """Milliseconds of `run()` (a FlashAttention-4 call giving [rows, tokens, heads, d]), checked against SDPA's
    [rows, heads, tokens, d] `reference`; printed with its largest difference."""
    error = (run().transpose(1, 2).float() - reference.float()).abs().max().item()
    ms = cuda_time(run, repeats)
    print(f"    {name}: {ms:.3f} ms, max |diff| {error:.1e}", flush=True)
    return ms


def flash_attention4_time(q, k, v, reference, repeats: int) -> dict[str, float]:
    """Milliseconds of FlashAttention-4 (`semantic_aug.acceleration.flash_attention4`, optional) on the same views,
    checked."""
    from semantic_aug.acceleration.flash_attention4 import flash_attention4

    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [rows, tokens, heads, d] views, as the processor passes them
    return {"flash-attn-4": flash_attention4_checked("flash-attn-4", lambda: flash_attention4(q, k, v), reference,
                                                     repeats)}


FLASH4_TILES = [(m, n) for m in (64, 128, 192) for n in (64, 96, 128, 160, 176, 192, 224, 256)]


def flash_attention4_tiles(q, k, v, reference, repeats: int) -> dict[str, float]:
    """FlashAttention-4's SM90 forward at every (tile_m, tile_n), P-in-registers and intra-warpgroup-overlap
    setting that compiles for this shape, timed and checked (its heuristic picks 192x128, RS, overlap for d<=64)."""
    from flash_attn.cute.interface import _flash_attn_fwd

    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    times = {}
    for tile in FLASH4_TILES:
        for rs in (True, False):
            for overlap in (True, False):
                name = f"flash-attn-4 {tile[0]}x{tile[1]} rs={int(rs)} overlap={int(overlap)}"
                run = lambda: _flash_attn_fwd(q, k, v, tile_mn=tile, mma_pv_is_rs=rs,  # noqa: E731
                                              intra_wg_overlap=overlap)[0]
                try:
                    times[name] = flash_attention4_checked(name, run, reference, repeats)
                except Exception as failure:  # a tiling that does not fit (registers, shared memory)
                    print(f"    {name}: failed ({type(failure).__name__}: {str(failure).splitlines()[0][:80]})",
                          flush=True)
    return times


def cudnn_plans(q, k, v, out, reference, repeats: int) -> dict[str, float]:
    """Every execution plan the cuDNN frontend builds for this SDPA, timed and checked against `reference`."""
    import cudnn

    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    bf16 = cudnn.data_type.BFLOAT16
    graph = cudnn.pygraph(handle=handle, io_data_type=bf16, intermediate_data_type=cudnn.data_type.FLOAT,
                          compute_data_type=cudnn.data_type.FLOAT)
    tensors = {name: graph.tensor(name=name, dim=list(t.shape), stride=list(t.stride()), data_type=bf16)
               for name, t in (("q", q), ("k", k), ("v", v))}
    o, _ = graph.sdpa(name="sdpa", q=tensors["q"], k=tensors["k"], v=tensors["v"], generate_stats=False,
                      attn_scale=q.shape[-1] ** -0.5)
    o.set_output(True).set_dim(list(out.shape)).set_stride(list(out.stride())).set_data_type(bf16)
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.B, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans(cudnn.build_plan_policy.ALL)
    pack = {tensors["q"]: q, tensors["k"]: k, tensors["v"]: v, o: out}
    times = {}
    print(f"    cuDNN {cudnn.backend_version_string()}: {graph.get_execution_plan_count()} plan(s)", flush=True)
    for index in range(graph.get_execution_plan_count()):
        name = f"plan {index} {graph.get_plan_name_at_index(index)}"
        try:
            workspace = torch.empty(max(1, graph.get_workspace_size_plan_at_index(index)), device="cuda",
                                    dtype=torch.uint8)
            run = lambda: graph.execute_plan_at_index(pack, workspace, index, handle=handle)  # noqa: E731
            out.zero_()
            run()
            error = (out.float() - reference.float()).abs().max().item()
            times[name] = cuda_time(run, repeats)
            print(f"    {name}: {times[name]:.3f} ms, max |diff| {error:.1e}", flush=True)
        except Exception as failure:  # a plan that cannot run here is reported, not fatal
            print(f"    {name}: failed ({type(failure).__name__}: {str(failure).splitlines()[0][:90]})", flush=True)
    return times


def main(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        raise UserError("this benchmark measures CUDA kernels and needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}",
          flush=True)
    rows, backends = 2 * args.images, [b for b in args.backends.split(",") if b]
    if not args.no_exp_rate:
        exp_rate(rows, args.repeats)
    default_total = best_total = 0.0  # default: PyTorch's cuDNN where timed, else the fastest kernel
    for level, tokens, head_dim, layers in SHAPES:
        if args.shapes and level not in args.shapes.split(","):
            continue
        for cross in (False, True):
            label = f"{level} {'cross' if cross else 'self'}-attention, d{head_dim}, {rows} x {HEADS} heads x " \
                    f"{tokens} x {TEXT_TOKENS if cross else tokens}"
            print(label, flush=True)
            q, k, v, out = unet_layout(rows, tokens, head_dim, cross)
            times = sdpa_backends(q, k, v, backends, args.repeats)
            for name, ms in times.items():
                print(f"    {name}: {ms:.3f} ms", flush=True)
            reference = F.scaled_dot_product_attention(q, k, v)
            optional = [("cuDNN plans", lambda: cudnn_plans(q, k, v, out, reference, args.repeats),
                         not args.no_cudnn_plans),
                        ("flash-attn-4", lambda: flash_attention4_time(q, k, v, reference, args.repeats),
                         not args.no_flash4),
                        ("flash-attn-4 tiles", lambda: flash_attention4_tiles(q, k, v, reference, args.repeats),
                         args.flash4_tiles and not cross and head_dim <= 64)]
            for name, measure, wanted in optional:
                if not wanted:
                    continue
                try:
                    times.update(measure())
                except Exception as failure:  # package not installed, or no kernel for this shape
                    print(f"    {name}: unavailable ({type(failure).__name__}: "
                          f"{str(failure).splitlines()[0][:90]})", flush=True)
            if times:
                best = min(times, key=times.get)
                default = times.get("sdpa cudnn", times[best])
                default_total += layers * default
                best_total += layers * times[best]
                print(f"    fastest: {best} {times[best]:.3f} ms ({layers} layer(s) a call)", flush=True)
            del q, k, v, out, reference
    label = "PyTorch's cuDNN" if "cudnn" in backends else "cuDNN not timed; fastest"
    print(f"attention per UNet call: {label} {default_total:.2f} ms, fastest per shape {best_total:.2f} ms",
          flush=True)


if __name__ == "__main__":
    run_cli(main, parse_args)

"""Where the time of synthetic generation goes, on the real SD v1.4 architecture (random weights), bf16, 512².

Prints, in one run (about 6-8 minutes on an H100):
  1. ceilings: a large bf16 matmul and a 3x3 convolution like the UNet's, in TFLOP/s;
  2. the attention kernel at the UNet's 64² self-attention shape (tokens 4096, 8 heads, head dim 40) per SDPA backend
     (`bench_attention.py` covers every shape and the cuDNN plans);
  3. one UNet call at the generator's batch (2 x images, classifier-free guidance, both halves the same latents as
     in img2img): FLOPs, ms, TFLOP/s for each `--variants` entry, and a kernel-time breakdown (convolution / matmul
     / attention / the rest) from the profiler;
  4. the VAE encoder and decoder per image;
  5. one whole `DiffusionSampler.img2img` batch against its UNet share (steps x one UNet call), and the GPU's
     kernel time within it (the rest is the GPU waiting for the host);
  6. overlap: a batch's 35 UNet calls and the VAE decode of the previous batch one after the other, against the
     decode on a second CUDA stream beside the calls (would moving the decode off the UNet's stream pay?), and
     the decode in chunks of 8 against one chunk of the whole batch.

From the checkout's root, with the package installed (`make setup`) or `PYTHONPATH=.` in front:
    python -m benchmarks.profile_generation [--images 32] [--variants eager,compile]
"""

from __future__ import annotations

import argparse
import re
import time
from collections import defaultdict
from dataclasses import replace

import torch

from benchmarks.bench_attention import sdpa_backends
from benchmarks.cuda_timing import cuda_time
from semantic_aug.acceleration import Acceleration, GroupNormLaunch, prefer_sdpa_backend
from semantic_aug.acceleration.guidance_prefix import paired_halves
from semantic_aug.stages.augmentations.sampler import VAE_DECODE_CHUNK, DiffusionSampler
from semantic_aug.core.stable_diffusion import random_sd_v1_folder
from semantic_aug.core.utils import UserError, run_cli

STEPS, STRENGTH, GUIDANCE = 50, 0.7, 15.0
VARIANTS = {  # name -> the sampler's acceleration options (the attention backend is --attention)
    "eager": Acceleration(),
    "compile": Acceleration(compile=True),
    "compile-no-prefix": Acceleration(compile=True, shared_guidance_prefix=False),  # both guidance halves in full
    "compile-cg": Acceleration(compile=True, compile_mode="reduce-overhead"),
    "compile-nchw": Acceleration(compile=True, channels_last=False),
    "compile-cdt": Acceleration(compile=True, inductor_options={"coordinate_descent_tuning": True}),
    "compile-freeze": Acceleration(compile=True, inductor_options={"freezing": True}),  # weights as constants
    "compile-aggressive": Acceleration(compile=True, inductor_options={"aggressive_fusion": True}),  # fuse more nodes
    "compile-pointwise": Acceleration(compile=True, inductor_options={"max_autotune_pointwise": True}),  # tune Triton
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32, help="images per generator call (UNet batch is twice that)")
    parser.add_argument("--variants", default="eager,compile",
                        help=f"comma-separated sampler variants: {', '.join(VARIANTS)}")
    parser.add_argument("--attention", default="cudnn", help="SDPA backend the variants prefer")
    parser.add_argument("--gn-config", default=None,
                        help="fused GroupNorm kernel configuration tile,warps,stats_tiles,normalize_tiles "
                             "(see bench_group_norm.py --sweep)")
    parser.add_argument("--cudnn-benchmark-limit", type=int, default=None,
                        help="cuDNN algorithms tried per convolution (0 = all; PyTorch's default is 10)")
    parser.add_argument("--top-kernels", type=int, default=14, help="kernels listed per profile")
    parser.add_argument("--skip", default="",
                        help="comma-separated parts to skip: ceilings, attention, img2img (parts 4-6), overlap "
                             "(GroupNorm: bench_group_norm.py)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of each measurement (median)")
    args = parser.parse_args()
    args.skip = set(filter(None, args.skip.split(",")))
    if args.gn_config:
        try:
            args.gn_config = GroupNormLaunch(*(int(v) for v in args.gn_config.split(",")))
        except (TypeError, ValueError):
            parser.error(f"--gn-config {args.gn_config!r} is not four integers tile,warps,stats_tiles,normalize_tiles")
    unknown = [name for name in args.variants.split(",") if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    return args


def ceilings(repeats: int) -> None:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = cuda_time(lambda: a @ b, repeats)
    print(f"ceiling matmul 8192^3 bf16: {2 * 8192 ** 3 / ms / 1e9:.0f} TFLOP/s", flush=True)
    torch.backends.cudnn.benchmark = True
    for channels, side, batch in ((320, 64, 64), (640, 32, 64), (1280, 16, 64)):
        x = torch.randn(batch, channels, side, side, device="cuda", dtype=torch.bfloat16).to(
            memory_format=torch.channels_last)
        conv = torch.nn.Conv2d(channels, channels, 3, padding=1).cuda().to(torch.bfloat16).to(
            memory_format=torch.channels_last)
        with torch.no_grad():
            ms = cuda_time(lambda: conv(x), repeats)
        flops = 2 * batch * side * side * channels * channels * 9
        print(f"ceiling conv3x3 {channels}ch {side}^2 batch {batch} channels_last: {flops / ms / 1e9:.0f} TFLOP/s",
              flush=True)


def attention_kernels(batch: int, repeats: int) -> None:
    for head_dim in (40, 64):
        q, k, v = (torch.randn(batch, 8, 4096, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flops = 4 * batch * 8 * 4096 * 4096 * head_dim
        for name, ms in sdpa_backends(q, k, v, ("flash", "cudnn", "efficient"), repeats).items():
            print(f"attention 4096 tokens x 8 heads x d{head_dim}, batch {batch}, {name}: {ms:.2f} ms, "
                  f"{flops / ms / 1e9:.0f} TFLOP/s (d{head_dim} FLOPs)", flush=True)


def kernel_breakdown(function, label: str, top_kernels: int = 14) -> None:
    """Group the profiler's CUDA kernel time of one `function()` call into categories."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        function()
        torch.cuda.synchronize()
    totals, top, triton = defaultdict(float), [], defaultdict(lambda: [0.0, 0])
    for event in prof.key_averages():
        micros = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if micros <= 0 or event.key.startswith(("aten::", "cuda")):
            continue
        name = event.key.lower()
        if name.startswith(("_partial_sums", "_group_moments", "_normalize")):
            category = "fused group norm (ours)"
        elif name.startswith("triton"):
            category = "triton (fused elementwise/norm)"
            family = re.sub(r"_\d+$", "", event.key)
            triton[family][0] += micros
            triton[family][1] += event.count
        elif any(word in name for word in ("fmha", "flash", "attention", "sdpa")):
            category = "attention"
        elif any(word in name for word in ("fprop", "implicit_gemm", "conv")):
            category = "convolution"
        elif any(word in name for word in ("gemm", "cutlass", "nvjet", "matmul")):
            category = "matmul"
        elif any(word in name for word in ("elementwise", "norm", "moments", "reduce")):
            category = "aten elementwise/norm"
        else:
            category = "other"
        totals[category] += micros
        top.append((micros, event.key[:110], event.count))
    whole = sum(totals.values())
    print(f"  kernel time of one {label}: {whole / 1e3:.1f} ms", flush=True)
    for category, micros in sorted(totals.items(), key=lambda item: -item[1]):
        print(f"    {category:<34} {micros / 1e3:8.1f} ms  {100 * micros / whole:5.1f}%", flush=True)
    print("  top kernels:", flush=True)
    for micros, name, count in sorted(top, reverse=True)[:top_kernels]:
        print(f"    {micros / 1e3:8.2f} ms  x{count:<4} {name}", flush=True)
    if triton:
        print("  triton kernel families:", flush=True)
        for family, (micros, count) in sorted(triton.items(), key=lambda item: -item[1][0])[:top_kernels]:
            print(f"    {micros / 1e3:8.2f} ms  x{count:<4} {family[:100]}", flush=True)


def unet_flops(sampler: DiffusionSampler, rows: int) -> float:
    """The FLOPs of one UNet call as the algorithm defines it (both guidance halves in full)."""
    from torch.utils.flop_counter import FlopCounterMode

    sample = torch.randn(rows, 4, 64, 64, device="cuda")
    text = torch.randn(rows, 77, 768, device="cuda", dtype=sampler.dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        sampler.unet_forward(sample, torch.tensor(500, device="cuda"), text)
    return counter.get_total_flops()


def profile_variant(model_path: str, variant: str, args) -> None:
    acceleration = replace(VARIANTS[variant], attention=args.attention)
    if args.gn_config:
        acceleration = replace(acceleration, group_norm_launch=args.gn_config)
    acceleration.configure_process("cuda")
    sampler = DiffusionSampler.from_pretrained(model_path, device="cuda", dtype=torch.bfloat16,
                                               acceleration=acceleration)
    runner = sampler.runner
    rows = 2 * args.images
    latents = torch.randn(args.images, 4, 64, 64, device="cuda")
    sample = torch.cat([latents, latents])  # guidance: both halves hold the same latents
    text = torch.randn(rows, 77, 768, device="cuda", dtype=torch.bfloat16)
    timestep = torch.tensor(500, device="cuda")
    start = time.perf_counter()

    def call():
        with paired_halves(runner.shared_prefix):
            return runner.unet(sample, timestep, text)

    with torch.no_grad(), prefer_sdpa_backend(runner.attention):
        call()
        torch.cuda.synchronize()
        warm = time.perf_counter() - start
        ms = cuda_time(call, args.repeats)
        flops = unet_flops(sampler, rows)
        print(f"[{variant}] UNet batch {rows}: {flops / 1e12:.1f} TFLOP/call, {ms:.1f} ms, "
              f"{flops / ms / 1e9:.0f} TFLOP/s; {ms / args.images * 35:.0f} ms/image for 35 steps "
              f"(first call {warm:.0f} s)", flush=True)
        kernel_breakdown(call, f"UNet call ({variant})", top_kernels=args.top_kernels)
    if "img2img" not in args.skip:
        vae_and_img2img(sampler, ms, variant, args)
        if "overlap" not in args.skip:
            with torch.no_grad(), prefer_sdpa_backend(runner.attention):
                overlap(sampler, call, args.images, variant)


def vae_and_img2img(sampler: DiffusionSampler, unet_ms: float, variant: str, args) -> None:
    """Parts 4 and 5: the VAE per image, then whole img2img batches against their UNet share."""
    from PIL import Image

    with torch.no_grad(), prefer_sdpa_backend(sampler.runner.attention):
        latents = torch.randn(8, 4, 64, 64, device="cuda")
        ms_dec = cuda_time(lambda: sampler.runner.decode(latents), args.repeats)
        pixels = sampler.runner.layout(torch.randn(8, 3, 512, 512, device="cuda", dtype=torch.bfloat16))
        ms_enc = cuda_time(lambda: sampler.vae.encode(pixels), args.repeats)
        print(f"[{variant}] VAE decode {ms_dec / 8:.1f} ms/image, encode {ms_enc / 8:.1f} ms/image", flush=True)
    images = [Image.new("RGB", (640, 480), (i * 7 % 255, 90, 160)) for i in range(args.images // 4)]
    batch = [image for image in images for _ in range(4)]
    prompts = [f"a photo of a thing number {i % 3}" for i in range(len(batch))]
    generate = lambda: sampler.img2img(batch, prompts, list(range(len(batch))), STRENGTH, GUIDANCE)  # noqa: E731
    out = generate()
    out.pil(len(out) - 1)
    start = time.perf_counter()
    for _ in range(2):
        out = generate()
    out.pil(len(out) - 1)
    seconds = (time.perf_counter() - start) / 2
    print(f"[{variant}] img2img batch {len(batch)}: {seconds * 1e3:.0f} ms = {len(batch) / seconds:.2f} img/s "
          f"(UNet share {35 * unet_ms / 1e3 / seconds * 100:.0f}%)", flush=True)
    kernel_breakdown(lambda: generate().pil(len(batch) - 1), f"img2img batch ({variant}, wall {seconds * 1e3:.0f} ms)",
                     top_kernels=4)


def overlap(sampler: DiffusionSampler, unet_call, images: int, variant: str, steps: int = 35) -> None:
    """Part 6: one batch's UNet calls with the previous batch's VAE decode, serial or on two CUDA streams."""
    latents = torch.randn(images, 4, 64, 64, device="cuda")
    chunk = VAE_DECODE_CHUNK

    def decode(rows: int = chunk):
        for part in latents.split(rows):
            sampler.runner.decode(part)

    def denoise():
        for _ in range(steps):
            unet_call()

    side = torch.cuda.Stream()

    def overlapped():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            decode()
        denoise()
        torch.cuda.current_stream().wait_stream(side)

    ms_unet, ms_decode = cuda_time(denoise, 2, warmup=1), cuda_time(decode, 3)
    ms_serial, ms_overlapped = cuda_time(lambda: (denoise(), decode()), 2, warmup=1), cuda_time(overlapped, 2, 1)
    print(f"[{variant}] overlap: {steps} UNet calls {ms_unet:.0f} ms + decode of {images} {ms_decode:.0f} ms; "
          f"serial {ms_serial:.0f} ms, decode on a second stream {ms_overlapped:.0f} ms "
          f"(saves {ms_serial - ms_overlapped:.0f} ms a batch)", flush=True)
    ms_whole = cuda_time(lambda: decode(images), 3)
    print(f"[{variant}] decode of {images}: chunks of {chunk} {ms_decode:.0f} ms, one chunk of {images} "
          f"{ms_whole:.0f} ms (peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB)", flush=True)


def main(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        raise UserError("this benchmark measures CUDA kernels and needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    model_path = random_sd_v1_folder("cuda")
    if args.gn_config:
        print(f"fused GroupNorm configuration: {args.gn_config}", flush=True)
    if args.cudnn_benchmark_limit is not None:
        torch.backends.cudnn.benchmark_limit = args.cudnn_benchmark_limit
    if "ceilings" not in args.skip:
        ceilings(args.repeats)
    if "attention" not in args.skip:
        attention_kernels(2 * args.images, args.repeats)
    for variant in args.variants.split(","):
        try:
            profile_variant(str(model_path), variant, args)
        except Exception as error:  # a variant that cannot run here must not end the profile
            print(f"[{variant}] failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}", flush=True)
        finally:
            torch._dynamo.reset()
            torch.cuda.empty_cache()


if __name__ == "__main__":
    run_cli(main, parse_args)

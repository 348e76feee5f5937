"""Synthetic image generation speed: the reference's pattern against the generator train_classifier.py runs.

Both make img2img variations of real photos (640×480) on the real SD v1.4 architecture with random weights:
512², strength 0.7, 50 scheduler steps (35 run), guidance 15, results resized back and saved as PNG.

(a) reference pattern: diffusers' StableDiffusionImg2ImgPipeline in fp16, one image per call, PIL resize in and
    out, PNG written before the next call (as the reference's generate_augmentations loop did);
(b) ours: `build_augmentation` + `generate_synthetic_images`, i.e. exactly what train_classifier.py runs, in bf16,
    batched, for each `--configs` entry `MODE:ATTENTION`:
      MODE       eager | compile (torch.compile of UNet and VAE decoder, --compile-mode)
      ATTENTION  auto (PyTorch's choice) | flash | cudnn | efficient | best (the fastest eager one so far)
    A warm-up run (compilation included, reported) precedes the timed run of --timed-batches batches.

From the checkout's root, with the package installed (`make setup`) or `PYTHONPATH=.` in front; on a GPU
(about 4-5 minutes):
    python -m benchmarks.bench_generation
SDXL base's architecture (random weights, 1024², two text encoders; the stock pipeline is
StableDiffusionXLImg2ImgPipeline, and `--stock-compile` adds the stock pipeline in bf16 with a compiled UNet at
the same batch size as ours):
    python -m benchmarks.bench_generation --model sdxl --batch-size 8 --stock-compile
(`--model sd2-random`: SD 2.1's architecture at 768², v-prediction.)
CPU smoke test (seconds of work, meaningless speeds; `--model tiny-sdxl` for the tiny SDXL):
    python -m benchmarks.bench_generation --model tiny --device cpu --dtype fp32 --ref-images 1 --batch-size 4 \\
        --timed-batches 1 --num-synthetic 2 --num-inference-steps 10 --configs eager:auto
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPTextConfig

from benchmarks.cuda_timing import free_device_memory
from benchmarks.random_models import MODEL_HELP, RANDOM_MODELS, RANDOM_SD, model_folder
from semantic_aug.acceleration import (ATTENTION_BACKENDS, COMPILE_MODES, DEFAULT_COMPILE_MODE,
                                       Acceleration)
from semantic_aug.core.embeddings import load_tokens_into_pipeline, save_tokens, second_encoder_path, token_name
from semantic_aug.core.model_family import describe_family
from semantic_aug.datasets.few_shot_dataset import FolderFewShotDataset
from semantic_aug.core.stable_diffusion import load_stable_diffusion
from semantic_aug.stages.synthetic import (DTYPES, AugmentationOptions, GenerationOptions, build_augmentation,
                                           generate_synthetic_images)
from semantic_aug.core.utils import pick_device, run_cli

REAL_IMAGE_SIZE = (640, 480)  # (width, height) of a typical COCO photo
CLASSES = ("bench", "bicycle")
POOL_PER_CLASS = 32  # real images per class on disk; a selection takes the first examples_per_class of them
PROMPT = "a photo of a {name}"
SMOOTH_NOISE_CELLS = 24  # real images are upsampled noise of this many cells across: photo-like, compressible
TARGET_IMAGES_PER_SECOND = 8.0
TARGET_SPEEDUP = 13.0
TARGET_OVER_STOCK_COMPILED = 1.2  # SDXL: ours against stock diffusers in bf16 with a compiled UNet, in the same run


class BenchDataset(FolderFewShotDataset):
    class_names = CLASSES
    train_pool_size = POOL_PER_CLASS


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=RANDOM_SD, help=f"{MODEL_HELP} (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA when present)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="weight dtype of our generator")
    parser.add_argument("--ref-images", type=int, default=8,
                        help="images timed for the reference pattern (after one warm-up)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per call of our generator")
    parser.add_argument("--timed-batches", type=int, default=3, help="batches timed per config (after a warm-up run)")
    parser.add_argument("--num-synthetic", type=int, default=8, help="synthetic images per real image")
    parser.add_argument("--num-inference-steps", type=int, default=50, help="scheduler steps (strength 0.7 runs 70%%)")
    parser.add_argument("--strength", type=float, default=0.7, help="img2img strength")
    parser.add_argument("--guidance-scale", type=float, default=15.0, help="classifier-free guidance weight")
    parser.add_argument("--configs", default="eager:auto,eager:cudnn,compile:best",
                        help="comma-separated MODE:ATTENTION entries (see the description); `none` times only the stock "
                             "pipeline")
    parser.add_argument("--compile-mode", default=DEFAULT_COMPILE_MODE, choices=COMPILE_MODES,
                        help="torch.compile mode of the `compile` configs")
    parser.add_argument("--stock-compile", action=argparse.BooleanOptionalAction, default=False,
                        help="also time the stock pipeline in bf16 with a torch.compile'd UNet (--compile-mode), "
                             "--batch-size images per call")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one, removed at the end)")
    args = parser.parse_args()
    args.configs = [tuple(entry.split(":")) for entry in args.configs.split(",") if entry not in ("", "none")]
    for entry in args.configs:
        if len(entry) != 2 or entry[0] not in ("eager", "compile") or entry[1] not in ATTENTION_BACKENDS + ("best",):
            parser.error(f"--configs entry {':'.join(entry)!r} is not MODE:ATTENTION (eager|compile : "
                         f"{'|'.join(ATTENTION_BACKENDS)}|best)")
    images = args.batch_size * args.timed_batches
    if images > len(CLASSES) * POOL_PER_CLASS * args.num_synthetic:
        parser.error(f"--batch-size x --timed-batches = {images} exceeds the {len(CLASSES) * POOL_PER_CLASS} real "
                     f"images x --num-synthetic {args.num_synthetic}")
    return args


def write_real_images(folder: Path) -> None:
    """Photo-like real images (smooth colour fields), POOL_PER_CLASS per class."""
    rng = np.random.default_rng(0)
    for name in CLASSES:
        class_dir = folder / "train-val" / name
        class_dir.mkdir(parents=True, exist_ok=True)
        for i in range(POOL_PER_CLASS):
            cells = rng.integers(0, 255, (SMOOTH_NOISE_CELLS * 3 // 4, SMOOTH_NOISE_CELLS, 3), dtype=np.uint8)
            Image.fromarray(cells).resize(REAL_IMAGE_SIZE, Image.BICUBIC).save(class_dir / f"{i}.jpg", quality=90)


def selection(data_dir: Path, images: int, num_synthetic: int) -> BenchDataset:
    """The fewest real images per class whose synthetic siblings number at least `images`."""
    per_class = math.ceil(images / (len(CLASSES) * num_synthetic))
    return BenchDataset(split="train", examples_per_class=per_class, seed=0, data_dir=data_dir)


def peak_memory(device: torch.device) -> str:
    return f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""


def time_reference(args, model_path: str, tokens_path: Path, dataset: BenchDataset, out: Path,
                   device: torch.device, compiled: bool = False) -> float:
    """(a) The reference's pattern: one image per pipeline call, fp16, PIL resizes, PNG before the next call; with
    `compiled`, the same stock pipeline in bf16 with its UNet through `torch.compile` (`--compile-mode`), called with
    `--batch-size` images at a time (one prompt, image and seeded generator each) for `--timed-batches` calls after
    a warm-up call that compiles."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    batch, calls = 1, args.ref_images
    if compiled:
        dtype, batch, calls = torch.bfloat16, args.batch_size, args.timed_batches
    pipe = load_stable_diffusion(model_path, pipeline="img2img", device=device, dtype=dtype)
    load_tokens_into_pipeline(tokens_path, pipe.tokenizer, pipe.text_encoder, getattr(pipe, "tokenizer_2", None),
                              getattr(pipe, "text_encoder_2", None))
    if compiled:
        pipe.unet = torch.compile(pipe.unet, mode=args.compile_mode)
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    out.mkdir(parents=True, exist_ok=True)
    warmup_start = start = time.perf_counter()
    for call in range(calls + 1):  # the first call warms up (and compiles)
        if call == 1:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        indices = [(call * batch + j) % len(dataset) for j in range(batch)]
        reals = [dataset.get_image_by_idx(i) for i in indices]
        prompts = [PROMPT.format(name=token_name(dataset.class_names[dataset.get_label_by_idx(i)])) for i in indices]
        images = pipe(prompt=prompts, image=[real.resize((side, side), Image.BILINEAR) for real in reals],
                      strength=args.strength, guidance_scale=args.guidance_scale,
                      num_inference_steps=args.num_inference_steps,
                      generator=[torch.Generator().manual_seed(call * batch + j) for j in range(batch)]).images
        for j, (image, real) in enumerate(zip(images, reals)):
            image.resize(real.size, Image.BILINEAR).save(out / f"{call * batch + j}.png")
    rate = calls * batch / (time.perf_counter() - start)
    label = (f"stock pipeline ({batch} images/call, bf16, torch.compile {args.compile_mode})" if compiled
             else f"reference pattern (1 image/call, {str(dtype).removeprefix('torch.')}, eager)")
    print(f"{label}: {rate:.2f} img/s ({calls * batch} images; warm-up {start - warmup_start:.1f} s"
          f"{peak_memory(device)})", flush=True)
    del pipe
    free_device_memory(device)
    return rate


def time_config(args, mode: str, attention: str, model_path: str, tokens_path: Path, warmup: BenchDataset,
                timed: BenchDataset, out: Path, device: torch.device) -> float:
    """(b) Our generator under one config: a warm-up run, then `--timed-batches` batches timed end to end."""
    acceleration = Acceleration(compile=mode == "compile", compile_mode=args.compile_mode, attention=attention)
    acceleration.configure_process(device)  # after the reference pattern ran, as train_classifier.py sets it
    options = AugmentationOptions(model_path=model_path, embed_path=tokens_path, dataset_name="bench",
                                  class_names=CLASSES, prompt=PROMPT, strength=args.strength,
                                  guidance_scale=args.guidance_scale, dtype=args.dtype,
                                  num_inference_steps=args.num_inference_steps)
    augmentation = build_augmentation(["textual-inversion"], options, device=device, acceleration=acceleration)
    generation = GenerationOptions(batch_size=args.batch_size, progress=False)
    start = time.perf_counter()
    generate_synthetic_images(warmup, augmentation, args.num_synthetic, out / "warmup", seed=0, options=generation)
    warmup_seconds = time.perf_counter() - start
    jobs = args.batch_size * args.timed_batches
    start = time.perf_counter()
    manifest = generate_synthetic_images(timed, augmentation, args.num_synthetic, out / "timed", seed=1,
                                         options=generation)
    seconds = time.perf_counter() - start
    rate = len(manifest) / seconds
    label = f"{mode}:{attention}" + (f" ({args.compile_mode})" if mode == "compile" else "")
    print(f"config {label:<45} batch {args.batch_size}: {rate:6.2f} img/s ({len(manifest)} images in {seconds:.1f} s; "
          f"warm-up {warmup_seconds:.1f} s{peak_memory(device)})", flush=True)
    if len(manifest) < jobs:
        print(f"  note: only {len(manifest)} of {jobs} images were timed", flush=True)
    del augmentation
    free_device_memory(device)
    return rate


def main(args: argparse.Namespace) -> None:
    device = pick_device(args.device)
    start = time.perf_counter()
    model_path = model_folder(args.model, device)
    if args.model in RANDOM_MODELS:
        print(f"random {RANDOM_MODELS[args.model][0]} ready in {time.perf_counter() - start:.0f} s: {model_path}",
              flush=True)
    family = describe_family(model_path)
    widths = [CLIPTextConfig.from_pretrained(model_path, subfolder=folder).hidden_size
              for folder in family.text_encoders]
    with tempfile.TemporaryDirectory(dir=args.workdir) as scratch:
        scratch = Path(scratch)
        write_real_images(scratch / "data")
        tokens_path = scratch / "tokens.pt"
        generator = torch.Generator().manual_seed(0)
        for width, path in zip(widths, (tokens_path, second_encoder_path(tokens_path))):  # SDXL: one per encoder
            save_tokens({token_name(name): torch.randn(width, generator=generator) for name in CLASSES}, path)
        warmup = selection(scratch / "data", args.batch_size, args.num_synthetic)
        timed = selection(scratch / "data", args.batch_size * args.timed_batches, args.num_synthetic)
        print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else device}, torch "
              f"{torch.__version__}; {args.num_inference_steps} steps x strength {args.strength}, guidance "
              f"{args.guidance_scale}, real images {REAL_IMAGE_SIZE[0]}x{REAL_IMAGE_SIZE[1]}", flush=True)

        reference = time_reference(args, model_path, tokens_path, timed, scratch / "reference", device)
        stock_compiled = None
        if args.stock_compile:
            stock_compiled = time_reference(args, model_path, tokens_path, timed, scratch / "stock-compiled", device,
                                            compiled=True)
        rates: dict[str, float] = {}
        for index, (mode, attention) in enumerate(args.configs):
            if attention == "best":
                eager = {name.split(":")[1]: rate for name, rate in rates.items() if name.startswith("eager:")}
                attention = max(eager, key=eager.get) if eager else "auto"
            name = f"{mode}:{attention}"
            try:
                rates[name] = time_config(args, mode, attention, model_path, tokens_path, warmup, timed,
                                          scratch / f"config-{index}", device)
            except Exception as error:  # a config that cannot run here (kernel, memory) must not end the benchmark
                print(f"config {name}: failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}", flush=True)
                free_device_memory(device)

    if not rates:
        print("no config of ours ran")
        return
    best = max(rates, key=rates.get)
    speedup = rates[best] / reference
    verdict = "met" if rates[best] >= TARGET_IMAGES_PER_SECOND and speedup >= TARGET_SPEEDUP else "NOT met"
    print(f"reference {reference:.2f} img/s; ours {rates[best]:.2f} img/s ({best}); speed-up {speedup:.1f}x "
          f"(target >= {TARGET_IMAGES_PER_SECOND:g} img/s and >= {TARGET_SPEEDUP:g}x: {verdict})")
    if stock_compiled:
        ratio = rates[best] / stock_compiled
        print(f"stock diffusers + torch.compile {stock_compiled:.2f} img/s; ours {ratio:.2f}x that (target >= "
              f"{TARGET_OVER_STOCK_COMPILED:g}x: {'met' if ratio >= TARGET_OVER_STOCK_COMPILED else 'NOT met'})")


if __name__ == "__main__":
    run_cli(main, parse_args)

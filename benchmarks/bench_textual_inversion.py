"""Benchmark: Textual Inversion throughput, the reference pattern against this repository's fast path.

Measured in one run, on the same model and device:

* `reference`: what the reference `fine_tune.py` did per step: one class at a time, batch 4, every image
  loaded and resized and encoded by the VAE at every step, fp16 autocast with a loss scaler, gradient
  checkpointing in the UNet and text encoder, AdamW over the whole 49k-row embedding matrix with the
  non-placeholder rows copied back after each step.
* `fast`, `fast-cl`, `fast-compile`: `semantic_aug.stages.textual_inversion_training` as `fine_tune.py` runs it: all
  classes in one batch (4 samples per class), latents cached once, bf16, SDPA attention, no gradient
  checkpointing, per-row AdamW on the placeholder rows only; `-cl` adds channels-last UNet weights, `-compile`
  adds torch.compile (its compile time is part of the warm-up, reported separately).

For each it prints samples/s, and projects the wall time of the stage the paper runs: 23 classes × 1000 updates
× 4 samples (plus, for the fast path, the one-time latent caching). The model is Stable Diffusion v1.4's
architecture with random weights (`build_random_sd_v1`): speed does not depend on the weight values.

From the checkout's root, with the package installed (`make setup`) or `PYTHONPATH=.` in front:
    python -m benchmarks.bench_textual_inversion                     # a GPU: about 2-3 minutes
    python -m benchmarks.bench_textual_inversion --model tiny --steps 2   # CPU smoke test
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from pathlib import Path

# fewer fragmentation out-of-memory errors while the micro-batch size is searched
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch
import torch.nn.functional as F

from semantic_aug.datasets import create_dataset
from semantic_aug.core.embeddings import class_folder_name
from semantic_aug.core.stable_diffusion import build_random_sd_v1, default_resolution, load_sd_components
from semantic_aug.stages.textual_inversion_training import (OBJECT_TEMPLATES, ClassSpec, TextualInversionConfig,
                                                           TextualInversionTrainer, TrainingSpeed,
                                                           enable_gradient_checkpointing, preprocess_image)
from semantic_aug.core.utils import UserError, pick_device, run_cli

STAGE_CLASSES, STAGE_STEPS, STAGE_BATCH = 23, 1000, 4  # the paper's Custom COCO stage: classes × updates × samples
TARGET_MINUTES, TARGET_SPEEDUP = 12.0, 8.0  # issue #4's targets for the fast path
REFERENCE_LEARNING_RATE = 5e-4 * STAGE_BATCH  # README: 5e-4 scaled by the batch
FAST_VARIANTS = {"fast": {}, "fast-cl": {"channels_last": True}, "fast-compile": {"compile": True}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd-v1-random", choices=("sd-v1-random", "tiny"),
                        help="Full-size SD v1.4 architecture with random weights, or the embedded tiny model "
                             "(smoke test).")
    parser.add_argument("--variants", default=None,
                        help="Comma list of reference,fast,fast-cl,fast-compile (default: all on CUDA; "
                             "reference,fast elsewhere).")
    parser.add_argument("--steps", type=int, default=8, help="Timed updates per variant.")
    parser.add_argument("--warmup", type=int, default=2,
                        help="Untimed updates per variant first (compile, micro-batch search).")
    parser.add_argument("--classes", type=int, default=STAGE_CLASSES,
                        help="Classes in the fast path's joint batch (Custom COCO has 23).")
    parser.add_argument("--micro-batch-size", type=int, default=0,
                        help="Fast path samples per forward/backward; 0 = search (halve on out-of-memory).")
    parser.add_argument("--resolution", type=int, default=None, help="Image side (default: the model's native size).")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA if present).")
    parser.add_argument("--json", default=None, help="Also write the figures to this JSON file.")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps must be at least 1 and --warmup at least 0, got {args.steps} and {args.warmup}")
    if not 1 <= args.classes <= STAGE_CLASSES:
        parser.error(f"--classes must lie in [1, {STAGE_CLASSES}], got {args.classes}")
    return args


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def timed_steps(step, steps: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """(seconds of the warm-up, seconds per timed step) of calling `step()`."""
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    synchronize(device)
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return warm, (time.perf_counter() - start) / steps


def bench_reference(parts, images, resolution: int, device: torch.device, steps: int, warmup: int) -> dict:
    """The reference's per-step work for one class: see the module docstring."""
    tokenizer, text_encoder, vae, unet, noise_scheduler = parts
    fp16 = device.type == "cuda"  # the reference trained with fp16 autocast; CPUs run it in fp32
    dtype = torch.float16 if fp16 else torch.float32
    text_encoder = copy.deepcopy(text_encoder).to(device, torch.float32)
    vae, unet = copy.deepcopy(vae).to(device, dtype), copy.deepcopy(unet).to(device, dtype)
    vae.requires_grad_(False)
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    enable_gradient_checkpointing(text_encoder, unet)
    unet.train()  # as the reference's diffusers example did with checkpointing
    tokenizer = copy.deepcopy(tokenizer)
    placeholder = "<reference_bench>"
    tokenizer.add_tokens([placeholder])
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    placeholder_id = tokenizer.convert_tokens_to_ids(placeholder)
    embeddings = text_encoder.get_input_embeddings().weight
    embeddings.requires_grad_(True)
    original = embeddings.detach().clone()
    keep = torch.ones(len(tokenizer), dtype=torch.bool, device=device)
    keep[placeholder_id] = False
    optimizer = torch.optim.AdamW([embeddings], lr=REFERENCE_LEARNING_RATE, weight_decay=1e-2)
    scaler = torch.amp.GradScaler(device.type, enabled=fp16)
    generator = torch.Generator().manual_seed(0)

    def step():
        picks = torch.randint(len(images), (STAGE_BATCH,), generator=generator).tolist()
        flips = (torch.rand(STAGE_BATCH, generator=generator) < 0.5).tolist()
        pixels = torch.stack([preprocess_image(images[i], resolution).flip(-1) if flip
                              else preprocess_image(images[i], resolution) for i, flip in zip(picks, flips)])
        templates = torch.randint(len(OBJECT_TEMPLATES), (STAGE_BATCH,), generator=generator).tolist()
        captions = [OBJECT_TEMPLATES[t].format(placeholder) for t in templates]
        input_ids = tokenizer(captions, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                              return_tensors="pt").input_ids.to(device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=fp16):
            with torch.no_grad():
                latents = vae.encode(pixels.to(device, dtype)).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(noise_scheduler.config.num_train_timesteps, (STAGE_BATCH,), device=device)
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
            hidden_states = text_encoder(input_ids)[0]
            prediction = unet(noisy_latents, timesteps, hidden_states).sample
        loss = F.mse_loss(prediction.float(), noise.float())
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            embeddings[keep] = original[keep]

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warm, per_step = timed_steps(step, steps, warmup, device)
    return {"variant": "reference", "samples_per_step": STAGE_BATCH, "seconds_per_step": per_step,
            "samples_per_second": STAGE_BATCH / per_step, "setup_seconds": 0.0, "warmup_seconds": warm,
            "peak_memory_gib": peak_memory_gib(device), "micro_batch_size": STAGE_BATCH}


def bench_fast(name: str, parts, classes: list[ClassSpec], resolution: int, accelerator, steps: int, warmup: int,
               micro_batch_size: int) -> dict:
    """`fine_tune.py`'s joint training on `classes`; setup (latent caching) is timed apart from the updates."""
    options = FAST_VARIANTS[name]
    config = TextualInversionConfig(resolution=resolution, train_batch_size=STAGE_BATCH, max_train_steps=STAGE_STEPS,
                                    learning_rate=REFERENCE_LEARNING_RATE, lr_warmup_steps=0, checkpointing_steps=None,
                                    save_steps=None, micro_batch_size=micro_batch_size, resume=False)
    speed = TrainingSpeed(compile=options.get("compile", False), channels_last=options.get("channels_last", False))
    trainer = TextualInversionTrainer(*parts, config, accelerator, speed)
    device = accelerator.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with trainer.start(classes, seed=0) as group:
        synchronize(device)
        setup = time.perf_counter() - start
        warm, per_step = timed_steps(group.train_step, steps, warmup, device)
    samples = len(classes) * STAGE_BATCH
    return {"variant": name, "samples_per_step": samples, "seconds_per_step": per_step,
            "samples_per_second": samples / per_step, "setup_seconds": setup, "warmup_seconds": warm,
            "peak_memory_gib": peak_memory_gib(device), "micro_batch_size": trainer.micro_batch_size}


def stage_minutes(result: dict, num_classes: int) -> float:
    """Projected minutes for 23 classes × 1000 updates × 4 samples at the measured throughput (+ caching)."""
    samples = STAGE_CLASSES * STAGE_STEPS * STAGE_BATCH
    setup = result["setup_seconds"] * STAGE_CLASSES / num_classes
    return (samples / result["samples_per_second"] + setup) / 60


def custom_coco_classes(count: int, output_root: Path) -> list[ClassSpec]:
    """The first `count` Custom COCO classes with their 4 training images of seed 0."""
    dataset = create_dataset("custom_coco", split="train", examples_per_class=STAGE_BATCH, seed=0)
    classes = []
    for label, name in enumerate(dataset.class_names[:count]):
        indices = [i for i in range(len(dataset)) if dataset.get_label_by_idx(i) == label]
        classes.append(ClassSpec(name, [dataset.get_image_by_idx(i) for i in indices],
                                 output_root / class_folder_name(name)))
    return classes


def run_variants(variants: list[str], parts, classes: list[ClassSpec], resolution: int, device: torch.device,
                 args: argparse.Namespace) -> list[dict]:
    """Measure each variant in turn, printing its line; a failing variant is reported and skipped."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="bf16" if device.type == "cuda" else "no")
    results, micro_batch_size = [], args.micro_batch_size
    for variant in variants:
        try:
            if variant == "reference":
                result = bench_reference(parts, classes[0].images, resolution, device, args.steps, args.warmup)
            else:
                result = bench_fast(variant, parts, classes, resolution, accelerator, args.steps, args.warmup,
                                    micro_batch_size)
                micro_batch_size = micro_batch_size or result["micro_batch_size"]  # later variants skip the search
        except Exception as error:  # noqa: BLE001 - report a failing variant (e.g. compile) and measure the rest
            print(f"{variant}: failed: {type(error).__name__}: {error}", flush=True)
            continue
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the reference's model copies are gone; give their memory back
        result["stage_minutes"] = stage_minutes(result, len(classes) if variant != "reference" else STAGE_CLASSES)
        results.append(result)
        memory = f", peak {result['peak_memory_gib']:.1f} GiB" if result["peak_memory_gib"] is not None else ""
        print(f"{variant:>13}: {result['samples_per_second']:8.1f} samples/s ({result['seconds_per_step']*1000:.0f} ms "
              f"per update of {result['samples_per_step']} samples, micro-batch {result['micro_batch_size']}{memory}; "
              f"setup {result['setup_seconds']:.1f}s, warm-up {result['warmup_seconds']:.1f}s) -> "
              f"{STAGE_CLASSES}x{STAGE_STEPS}x{STAGE_BATCH} stage {result['stage_minutes']:.1f} min", flush=True)
    return results


def main(args: argparse.Namespace) -> None:
    device = pick_device(args.device)
    default_variants = ["reference", *FAST_VARIANTS] if device.type == "cuda" else ["reference", "fast"]
    variants = args.variants.split(",") if args.variants else default_variants
    unknown = sorted(set(variants) - {"reference", *FAST_VARIANTS})
    if unknown:
        raise UserError(f"unknown --variants {', '.join(unknown)}; known: reference, {', '.join(FAST_VARIANTS)}")

    start = time.perf_counter()
    parts = build_random_sd_v1(device) if args.model == "sd-v1-random" else load_sd_components("tiny")
    resolution = args.resolution or default_resolution(parts[3], parts[2])
    build_seconds = time.perf_counter() - start
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {gpu}; torch {torch.__version__}; model {args.model} at {resolution}px (built in "
          f"{build_seconds:.0f}s); {args.warmup} warm-up + {args.steps} timed updates per variant", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-ti-") as scratch:  # class folders (nothing is written there)
        classes = custom_coco_classes(args.classes, Path(scratch))
        results = run_variants(variants, parts, classes, resolution, device, args)

    reference = next((r for r in results if r["variant"] == "reference"), None)
    fast = [r for r in results if r["variant"] != "reference"]
    if reference and fast:
        best = max(fast, key=lambda r: r["samples_per_second"])
        speedup = best["samples_per_second"] / reference["samples_per_second"]
        met = best["stage_minutes"] <= TARGET_MINUTES and speedup >= TARGET_SPEEDUP
        print(f"fastest: {best['variant']}, {speedup:.1f}x the reference pattern; stage "
              f"{best['stage_minutes']:.1f} min vs {reference['stage_minutes']:.1f} min "
              f"(targets <= {TARGET_MINUTES:.0f} min and >= {TARGET_SPEEDUP:.0f}x: {'met' if met else 'NOT met'})")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": gpu, "model": args.model, "resolution": resolution,
                                               "results": results}, indent=2))


if __name__ == "__main__":
    run_cli(main, parse_args)

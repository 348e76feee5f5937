"""Benchmark: Textual Inversion throughput, the reference pattern against this repository's fast path.

Measured in one run, on the same model and device, for any model family (SD 1.x, SD 2.x, SDXL):

* `reference`: what the reference `fine_tune.py` did per step: one class at a time, batch 4, every image
  loaded and resized and encoded by the VAE at every step, fp16 autocast with a loss scaler, gradient
  checkpointing in the UNet and text encoder, AdamW over the whole 49k-row embedding matrix with the
  non-placeholder rows copied back after each step. SDXL runs it as diffusers' SDXL Textual Inversion example
  does: the token has a row in both text encoders (both matrices in the AdamW), the UNet gets the pooled text
  embedding and the size/crop ids, and autocast is bf16 without a loss scaler (SDXL's VAE overflows in fp16).
* `reference-compile`: the same, with the UNet through torch.compile: the stock loop plus torch.compile.
* `fast`, `fast-cl`, `fast-compile`: `semantic_aug.stages.textual_inversion_training` as `fine_tune.py` runs it: all
  classes in one batch (4 samples per class), latents cached once, bf16, SDPA attention, no gradient
  checkpointing, per-row AdamW on the placeholder rows only (both encoders' rows for SDXL); `-cl` adds
  channels-last UNet weights, `-compile` adds torch.compile.

Every variant's loss target follows the scheduler's `prediction_type` (the noise, or the velocity for
v-prediction models). Compile time is part of the warm-up, reported apart from the timed updates.

For each it prints samples/s, and projects the wall time of the stage the paper runs: 23 classes × 1000 updates
× 4 samples (plus, for the fast path, the one-time latent caching). `--model` picks the architecture:
`sd-v1-random` is Stable Diffusion v1.4's with random weights (`build_random_sd_v1`), `sd2-random` SD 2.1's
(`random_sd2_folder`: v-prediction, 768²), `sdxl` SDXL base's (`random_sdxl_folder`, 1024²), the last two built once
into the model cache; `tiny`, `tiny-sd2` and `tiny-sdxl` are the embedded toy models, anything else a diffusers
folder. Speed does not depend on the weight values.

From the checkout's root, with the package installed (`make setup`) or `PYTHONPATH=.` in front:
    python -m benchmarks.bench_textual_inversion                     # a GPU: about 2-3 minutes
SDXL base at 1024² (the first run builds the random model into the cache, 1-2 minutes; each torch.compile of
SDXL's UNet with its backward takes minutes, so the two compiled variants run apart):
    python -m benchmarks.bench_textual_inversion --model sdxl --variants reference,fast,fast-compile --steps 4
    python -m benchmarks.bench_textual_inversion --model sdxl --variants reference-compile --steps 4
CPU smoke tests (seconds, meaningless speeds):
    python -m benchmarks.bench_textual_inversion --model tiny --steps 2
    python -m benchmarks.bench_textual_inversion --model tiny-sdxl --device cpu --classes 1 --steps 1
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# fewer fragmentation out-of-memory errors while the micro-batch size is searched
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch
import torch.nn.functional as F

from benchmarks.cuda_timing import free_device_memory
from benchmarks.random_models import MODEL_HELP, RANDOM_SD, model_folder
from semantic_aug.datasets import create_dataset
from semantic_aug.core.embeddings import class_folder_name
from semantic_aug.core.model_family import describe_family
from semantic_aug.core.stable_diffusion import (build_random_sd_v1, checked_resolution, load_sd_components,
                                                load_sdxl_second_encoder)
from semantic_aug.stages.textual_inversion_training import (OBJECT_TEMPLATES, ClassSpec, TextualInversionConfig,
                                                           TextualInversionTrainer, TrainingSpeed,
                                                           check_prediction_type, enable_gradient_checkpointing,
                                                           loss_target, preprocess_image, sdxl_text_conditioning)
from semantic_aug.core.utils import pick_device, run_cli

STAGE_CLASSES, STAGE_STEPS, STAGE_BATCH = 23, 1000, 4  # the paper's Custom COCO stage: classes × updates × samples
TARGET_MINUTES, TARGET_SPEEDUP = 12.0, 8.0  # the fast path's targets (set for SD v1.x)
REFERENCE_LEARNING_RATE = 5e-4 * STAGE_BATCH  # README: 5e-4 scaled by the batch
REFERENCE_VARIANTS = {"reference": False, "reference-compile": True}  # name -> UNet through torch.compile
FAST_VARIANTS = {"fast": {}, "fast-cl": {"channels_last": True}, "fast-compile": {"compile": True}}


@dataclass
class BenchModel:
    """The model under test, as `fine_tune.py` loads it.

    Attributes:
        parts: (tokenizer, text_encoder, vae, unet, noise_scheduler).
        second_encoder: SDXL's (tokenizer_2, text_encoder_2); None for one text encoder.
        family: `sd1`, `sd2` or `sdxl` (`semantic_aug.core.model_family`).
    """

    parts: tuple
    second_encoder: tuple | None
    family: str

    @property
    def prediction_type(self) -> str:
        return check_prediction_type(self.parts[4])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=RANDOM_SD,
                        help=f"{MODEL_HELP}; `{RANDOM_SD}` is built in memory here (default: %(default)s)")
    parser.add_argument("--variants", default=None,
                        help=f"Comma list of {','.join([*REFERENCE_VARIANTS, *FAST_VARIANTS])} (default: "
                             f"reference,{','.join(FAST_VARIANTS)} on CUDA; reference,fast elsewhere).")
    parser.add_argument("--steps", type=int, default=8, help="Timed updates per variant (default: %(default)s).")
    parser.add_argument("--warmup", type=int, default=2,
                        help="Untimed updates per variant first: compile, micro-batch search (default: %(default)s).")
    parser.add_argument("--classes", type=int, default=STAGE_CLASSES,
                        help="Classes in the fast path's joint batch; Custom COCO has 23 (default: %(default)s).")
    parser.add_argument("--micro-batch-size", type=int, default=0,
                        help="Fast path samples per forward/backward; 0 = fine_tune.py's search, halving on "
                             "out-of-memory from the whole batch (above 512²: from one class's 4) "
                             "(default: %(default)s).")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                        help="Gradient checkpointing in the fast path too: only for a model whose micro-batch of 1 "
                             "does not fit without it (default: %(default)s).")
    parser.add_argument("--resolution", type=int, default=None,
                        help="Image side (default: the model's native size: 512 SD 1.x, 768 SD 2.x, 1024 SDXL).")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA if present).")
    parser.add_argument("--json", default=None, help="Also write the figures to this JSON file (default: none).")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps must be at least 1 and --warmup at least 0, got {args.steps} and {args.warmup}")
    if not 1 <= args.classes <= STAGE_CLASSES:
        parser.error(f"--classes must lie in [1, {STAGE_CLASSES}], got {args.classes}")
    if args.micro_batch_size < 0:
        parser.error(f"--micro-batch-size must be 0 (search) or positive, got {args.micro_batch_size}")
    if args.variants is not None:
        unknown = sorted(set(args.variants.split(",")) - {*REFERENCE_VARIANTS, *FAST_VARIANTS})
        if unknown:
            parser.error(f"unknown --variants {', '.join(unknown)}; known: "
                         f"{', '.join([*REFERENCE_VARIANTS, *FAST_VARIANTS])}")
    return args


def load_model(name: str, device: torch.device) -> BenchModel:
    """The model `--model` names, with the parts `fine_tune.py` trains with; the family is read from its folder."""
    if name == RANDOM_SD:  # built in memory on the device, as this benchmark always measured SD v1.4
        return BenchModel(build_random_sd_v1(device), None, "sd1")
    path = model_folder(name, device)
    family = describe_family(path).name
    second_encoder = load_sdxl_second_encoder(path) if family == "sdxl" else None
    return BenchModel(load_sd_components(path), second_encoder, family)


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


def reference_precision(family: str, device: torch.device) -> tuple[torch.dtype, bool, str]:
    """(autocast and VAE/UNet dtype, loss scaler on, what to print) of the reference pattern: fp16 with a loss
    scaler as the reference trained; bf16 without one for SDXL, whose VAE overflows in fp16; fp32 on a CPU."""
    if device.type != "cuda":
        return torch.float32, False, "fp32"
    if family == "sdxl":
        return torch.bfloat16, False, "bf16 autocast, no loss scaler (SDXL's VAE overflows in fp16)"
    return torch.float16, True, "fp16 autocast + loss scaler"


def trainable_token(tokenizer, text_encoder, placeholder: str, device: torch.device):
    """A copy of (tokenizer, text_encoder) with `placeholder` added and the whole embedding matrix trainable, as the
    reference set it up. Returns (tokenizer, text_encoder, embedding matrix, its original values, rows to keep)."""
    tokenizer, text_encoder = copy.deepcopy(tokenizer), copy.deepcopy(text_encoder).to(device, torch.float32)
    text_encoder.requires_grad_(False)
    tokenizer.add_tokens([placeholder])
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    embeddings = text_encoder.get_input_embeddings().weight
    embeddings.requires_grad_(True)
    keep = torch.ones(len(tokenizer), dtype=torch.bool, device=device)
    keep[tokenizer.convert_tokens_to_ids(placeholder)] = False
    return tokenizer, text_encoder, embeddings, embeddings.detach().clone(), keep


def bench_reference(name: str, model: BenchModel, images, resolution: int, device: torch.device, steps: int,
                    warmup: int) -> dict:
    """The reference's per-step work for one class (see the module docstring); `reference-compile` runs the UNet
    through torch.compile."""
    tokenizer, text_encoder, vae, unet, noise_scheduler = model.parts
    dtype, scaled, precision = reference_precision(model.family, device)
    low_precision = dtype != torch.float32
    vae, unet = copy.deepcopy(vae).to(device, dtype), copy.deepcopy(unet).to(device, dtype)
    vae.requires_grad_(False)
    unet.requires_grad_(False)
    placeholder = "<reference_bench>"
    encoders = [trainable_token(tokenizer, text_encoder, placeholder, device)]
    if model.second_encoder is not None:  # SDXL: the token has a row in both encoders, both trained
        encoders.append(trainable_token(*model.second_encoder, placeholder, device))
    for _, encoder, _, _, _ in encoders:
        enable_gradient_checkpointing(encoder, unet)
    unet.train()  # as the reference's diffusers example did with checkpointing
    unet_forward = torch.compile(unet) if REFERENCE_VARIANTS[name] else unet
    optimizer = torch.optim.AdamW([embeddings for _, _, embeddings, _, _ in encoders], lr=REFERENCE_LEARNING_RATE,
                                  weight_decay=1e-2)
    scaler = torch.amp.GradScaler(device.type, enabled=scaled)
    generator = torch.Generator().manual_seed(0)

    def step():
        picks = torch.randint(len(images), (STAGE_BATCH,), generator=generator).tolist()
        flips = (torch.rand(STAGE_BATCH, generator=generator) < 0.5).tolist()
        pixels = torch.stack([preprocess_image(images[i], resolution).flip(-1) if flip
                              else preprocess_image(images[i], resolution) for i, flip in zip(picks, flips)])
        templates = torch.randint(len(OBJECT_TEMPLATES), (STAGE_BATCH,), generator=generator).tolist()
        captions = [OBJECT_TEMPLATES[t].format(placeholder) for t in templates]
        input_ids = [tokenizer(captions, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                               return_tensors="pt").input_ids.to(device) for tokenizer, _, _, _, _ in encoders]
        with torch.autocast(device.type, dtype=dtype, enabled=low_precision):
            with torch.no_grad():
                latents = vae.encode(pixels.to(device, dtype)).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(noise_scheduler.config.num_train_timesteps, (STAGE_BATCH,), device=device)
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
            if model.second_encoder is None:
                hidden_states, added_cond_kwargs = encoders[0][1](input_ids[0])[0], None
            else:
                hidden_states, added_cond_kwargs = sdxl_text_conditioning(
                    [encoder for _, encoder, _, _, _ in encoders], torch.stack(input_ids, dim=1), resolution)
            prediction = unet_forward(noisy_latents, timesteps, hidden_states, added_cond_kwargs=added_cond_kwargs,
                                      return_dict=False)[0]
        loss = F.mse_loss(prediction.float(), loss_target(noise_scheduler, latents, noise, timesteps).float())
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for _, _, embeddings, original, keep in encoders:
                embeddings[keep] = original[keep]

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warm, per_step = timed_steps(step, steps, warmup, device)
    return {"variant": name, "samples_per_step": STAGE_BATCH, "seconds_per_step": per_step,
            "samples_per_second": STAGE_BATCH / per_step, "setup_seconds": 0.0, "warmup_seconds": warm,
            "peak_memory_gib": peak_memory_gib(device), "micro_batch_size": STAGE_BATCH, "precision": precision}


def bench_fast(name: str, model: BenchModel, classes: list[ClassSpec], resolution: int, accelerator, steps: int,
               warmup: int, micro_batch_size: int, gradient_checkpointing: bool = False) -> dict:
    """`fine_tune.py`'s joint training on `classes`; setup (latent caching) is timed apart from the updates."""
    options = FAST_VARIANTS[name]
    config = TextualInversionConfig(resolution=resolution, train_batch_size=STAGE_BATCH, max_train_steps=STAGE_STEPS,
                                    learning_rate=REFERENCE_LEARNING_RATE, lr_warmup_steps=0, checkpointing_steps=None,
                                    save_steps=None, micro_batch_size=micro_batch_size, resume=False)
    speed = TrainingSpeed(gradient_checkpointing=gradient_checkpointing, compile=options.get("compile", False),
                          channels_last=options.get("channels_last", False))
    trainer = TextualInversionTrainer(*model.parts, config, accelerator, speed, second_encoder=model.second_encoder)
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
            "peak_memory_gib": peak_memory_gib(device), "micro_batch_size": trainer.micro_batch_size,
            "precision": accelerator.mixed_precision}


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


def run_variants(variants: list[str], model: BenchModel, classes: list[ClassSpec], resolution: int,
                 device: torch.device, args: argparse.Namespace) -> list[dict]:
    """Measure each variant in turn, printing its line; a failing variant is reported and skipped."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="bf16" if device.type == "cuda" else "no")
    results, micro_batch_size = [], args.micro_batch_size
    for variant in variants:
        try:
            if variant in REFERENCE_VARIANTS:
                result = bench_reference(variant, model, classes[0].images, resolution, device, args.steps,
                                         args.warmup)
            else:
                result = bench_fast(variant, model, classes, resolution, accelerator, args.steps, args.warmup,
                                    micro_batch_size, args.gradient_checkpointing)
                micro_batch_size = micro_batch_size or result["micro_batch_size"]  # later variants skip the search
        except Exception as error:  # noqa: BLE001 - report a failing variant (e.g. compile) and measure the rest
            hint = ""
            if variant in FAST_VARIANTS and "out of accelerator memory" in str(error) and \
                    not args.gradient_checkpointing:
                hint = " (ours does not fit this micro-batch without gradient checkpointing: rerun this variant " \
                       "with --gradient-checkpointing)"
            print(f"{variant}: failed: {type(error).__name__}: {error}{hint}", flush=True)
            continue
        finally:
            free_device_memory(device)  # the reference's model copies are gone; give their memory back
        result["stage_minutes"] = stage_minutes(result, STAGE_CLASSES if variant in REFERENCE_VARIANTS
                                                else len(classes))
        results.append(result)
        memory = f", peak {result['peak_memory_gib']:.1f} GiB" if result["peak_memory_gib"] is not None else ""
        note = f"; {result['precision']}" if model.family == "sdxl" and variant in REFERENCE_VARIANTS else ""
        print(f"{variant:>13}: {result['samples_per_second']:8.1f} samples/s ({result['seconds_per_step']*1000:.0f} ms "
              f"per update of {result['samples_per_step']} samples, micro-batch {result['micro_batch_size']}{memory}; "
              f"setup {result['setup_seconds']:.1f}s, warm-up {result['warmup_seconds']:.1f}s) -> "
              f"{STAGE_CLASSES}x{STAGE_STEPS}x{STAGE_BATCH} stage {result['stage_minutes']:.1f} min{note}", flush=True)
    return results


def print_summary(results: list[dict], family: str) -> None:
    """The fastest of ours against the reference pattern (and against the compiled reference when it ran)."""
    found = {r["variant"]: r for r in results}
    reference, fast = found.get("reference"), [r for r in results if r["variant"] in FAST_VARIANTS]
    if not (reference and fast):
        return
    best = max(fast, key=lambda r: r["samples_per_second"])
    speedup = best["samples_per_second"] / reference["samples_per_second"]
    line = (f"fastest: {best['variant']}, {speedup:.1f}x the reference pattern; stage "
            f"{best['stage_minutes']:.1f} min vs {reference['stage_minutes']:.1f} min")
    if "reference-compile" in found:
        compiled = found["reference-compile"]
        line += (f"; {best['samples_per_second'] / compiled['samples_per_second']:.1f}x the reference with "
                 f"torch.compile ({compiled['stage_minutes']:.1f} min)")
    if family == "sd1":  # the targets were set for SD v1.4
        met = best["stage_minutes"] <= TARGET_MINUTES and speedup >= TARGET_SPEEDUP
        line += f" (targets <= {TARGET_MINUTES:.0f} min and >= {TARGET_SPEEDUP:.0f}x: {'met' if met else 'NOT met'})"
    print(line)


def main(args: argparse.Namespace) -> None:
    device = pick_device(args.device)
    default_variants = ["reference", *FAST_VARIANTS] if device.type == "cuda" else ["reference", "fast"]
    variants = args.variants.split(",") if args.variants else default_variants

    start = time.perf_counter()
    model = load_model(args.model, device)
    tokenizer, text_encoder, vae, unet, _ = model.parts
    resolution = checked_resolution(args.resolution, unet, vae)
    build_seconds = time.perf_counter() - start
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {gpu}; torch {torch.__version__}; model {args.model} at {resolution}px (built in "
          f"{build_seconds:.0f}s); {args.warmup} warm-up + {args.steps} timed updates per variant", flush=True)
    print(f"family: {model.family}; {1 + (model.second_encoder is not None)} text encoder(s); loss target "
          f"{model.prediction_type}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-ti-") as scratch:  # class folders (nothing is written there)
        classes = custom_coco_classes(args.classes, Path(scratch))
        results = run_variants(variants, model, classes, resolution, device, args)

    print_summary(results, model.family)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": gpu, "model": args.model, "family": model.family,
                                               "prediction_type": model.prediction_type, "resolution": resolution,
                                               "results": results}, indent=2))


if __name__ == "__main__":
    run_cli(main, parse_args)

"""Synthetic images for the few-shot training split: the augmentation built from the flags, `num_synthetic`
images per real image generated in batches, and the folder that caches them.

Folder layout (`synthetic_dir`):
    label_{label}-{real_idx}-{synthetic_idx}.png  one per synthetic image (the reference's names), written atomically
    manifest.csv    one row per image: real_idx, synthetic_idx, label, class_name, augmentation, token, prompt,
                    seed (the image's own seed), path
    settings.json   what made the images (model, token and prompt contents, prompt template, strength, guidance,
                    steps, seed, dataset selection, ...) and its fingerprint

The folder is a cache; the reference deleted it on every run. A rerun with the same settings reuses every finished
image and makes only the missing ones, so an interrupted run resumes (its leftover `.tmp` files are removed). A
run whose settings differ refuses the folder with a one-line error, unless `overwrite` is set, which moves the old
folder aside to `{synthetic_dir}.old-N` (nothing is deleted). Old and new images are never mixed.

Each image's seed is derived from (run seed, real index, synthetic index) and every choice (token, prompt,
composed member) from the image's class counter and seed, so the set does not depend on the batch size, on what
was cached, or on how many processes share the work: under `accelerate launch`, process p of P makes the images
of the real images whose index is p modulo P (siblings stay together, so each real image is encoded once), and the
main process writes the manifest once all are done. The device, dtype, batch size and speed options are not part
of the settings: they change the images only within float rounding.

`SyntheticSet` is the set as the rest of the pipeline sees it: its folder, its manifest, its settings fingerprint
and, once DIAGen's filter has scored it, its per-image weights. It alone reads and writes `manifest.csv`; the
training split (`FewShotDataset.set_synthetic_images`) and the training loop read the images and their weights
from it, through `SyntheticSet.siblings`.

A set that is complete on disk is found without loading the diffusion model: `build_augmentation(...,
load_weights=False)` builds the augmentation from the model's configs alone, which plans the same images and gives
the same fingerprint, and `generate_synthetic_images` loads the real model (its `generator` argument) only when an
image is missing and no folder of the same settings holds it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from semantic_aug.acceleration import Acceleration
from semantic_aug.stages.augmentations import (COMPOSERS, Choice, DiffusionSampler, GenerativeAugmentation, GeneratedImages,
                                        TextualInversion, get_augmentation_class)
from semantic_aug.stages.augmentations.generative_augmentation import check_strength_and_guidance, settings_digest
from semantic_aug.core.embeddings import load_tokens, stable_seed
from semantic_aug.core.layout import MANIFEST_NAME
from semantic_aug.datasets.few_shot_dataset import Siblings
from semantic_aug.stages.prompts import read_prompt_csv
from semantic_aug.core.utils import (DTYPES, StageTimer, UserError, atomic_path, atomic_save_image,
                                atomic_write_csv, atomic_write_text, remove_stale_temporaries)

logger = logging.getLogger(__name__)

SETTINGS_NAME = "settings.json"
MANIFEST_COLUMNS = [
    "real_idx", "synthetic_idx", "label", "class_name", "augmentation", "token", "prompt", "seed", "path"]
SCORE_COLUMNS = ("confidence", "filter_weight", "filter_id")  # DIAGen's filter adds these to the manifest
WEIGHT_COLUMNS = ("kept", "probability", "loss_weight")  # how training uses the filter's weights (`with_filter_weights`)
CACHE_FORMAT = 1  # bump when the way images are made changes, so old caches are not reused
PNG_COMPRESS_LEVEL = 1  # zlib level: a cache written once and read a few times favours speed over size
WRITER_THREADS = min(8, os.cpu_count() or 1)  # PNG encoding releases the GIL, so threads overlap it with the GPU
PENDING_BATCHES = 2  # batches that may wait for their PNG writes before generation pauses (bounds memory)


def synthetic_image_name(label: int, real_idx: int, synthetic_idx: int) -> str:
    """The reference's file name of a synthetic image: `label_{label}-{real_idx}-{synthetic_idx}.png`."""
    return f"label_{label}-{real_idx}-{synthetic_idx}.png"


def _per_augmentation(values, count: int, flag: str) -> list:
    """One value per augmentation: a scalar or a one-element list is repeated; other lengths must match."""
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    if len(values) == 1:
        values = values * count
    if len(values) != count:
        raise UserError(f"{flag} has {len(values)} values for {count} --aug augmentations; give one, or one per --aug")
    return values


def check_augmentation_inputs(aug_names: Sequence[str], embed_path: str | os.PathLike | None,
                              class_names: Sequence[str], use_generated_prompts: bool = False,
                              prompt_path: str | os.PathLike | None = None) -> dict[str, list[str]] | None:
    """Check the files an augmentation reads (token file, prompt CSV) without loading any model.

    Args:
        aug_names: `--aug` names.
        embed_path: the token file (needed by `textual-inversion`).
        class_names: the dataset's classes; each needs its token and its prompts.
        use_generated_prompts: DIAGen (b) reads `prompt_path`.
        prompt_path: the prompt CSV of `generate_prompts.py`.

    Returns:
        The prompts per class under `use_generated_prompts`, else None.

    Raises:
        UserError: an unknown augmentation, a missing or malformed token file or prompt CSV, or a class missing
            from either.
    """
    classes = [get_augmentation_class(name) for name in aug_names]
    if any(issubclass(cls, TextualInversion) for cls in classes):
        if embed_path is None:
            raise UserError("textual-inversion needs a token file: pass --embed-path")
        load_tokens(embed_path, class_names)
    if not use_generated_prompts:
        return None
    if prompt_path is None:
        raise UserError("--use-generated-prompts 1 needs --prompt-path (a CSV from generate_prompts.py)")
    return read_prompt_csv(prompt_path, class_names)


@dataclass(frozen=True)
class AugmentationOptions:
    """What `build_augmentation` builds, from `train_classifier.py`'s flags: every field that decides the images
    (and so the synthetic set's fingerprint). Where and how fast the model runs are `build_augmentation`'s own
    arguments.

    Attributes:
        model_path: `tiny`, a hub id or a local diffusers folder.
        embed_path: the token file (needed by `textual-inversion`).
        dataset_name: the dataset's registry name (named in the log).
        class_names: the dataset's classes.
        prompt: template with `{name}`.
        strength: img2img strength in (0, 1], a scalar or one per augmentation (required).
        guidance_scale: guidance weight >= 1, a scalar or one per augmentation (required).
        mask: inpaint the COCO object mask, a scalar or one per augmentation.
        inverted: with `mask`, repaint the background instead, a scalar or one per augmentation.
        probs: `--probs`, one per augmentation (parallel: drawing weights, uniform by default; sequential:
            application probabilities, 1 by default).
        compose: `parallel` or `sequential`.
        use_embedding_noise: DIAGen (a), cycle each class through its original and noisy tokens.
        use_generated_prompts: DIAGen (b), cycle each class through its prompts from `prompt_path`.
        prompt_path: the prompt CSV of `generate_prompts.py`.
        dtype: weight dtype (`torch.bfloat16`/`"bf16"` or fp16 on GPU; fp32 on CPU).
        resolution: generation side; None is the model's own (512 SD, 64 tiny).
        num_inference_steps: scheduler steps for strength 1 (img2img runs `strength` of them).
        std_deviations: noise levels to cycle through; None uses those in the token file.
        erasure_ckpt_path: optional UNet state dict to load over the model's.
    """

    model_path: str
    embed_path: str | os.PathLike | None
    dataset_name: str
    class_names: Sequence[str]
    prompt: str
    strength: float | Sequence[float] | None
    guidance_scale: float | Sequence[float] | None
    mask: bool | Sequence[bool] = False
    inverted: bool | Sequence[bool] = False
    probs: Sequence[float] | None = None
    compose: str = "parallel"
    use_embedding_noise: bool = False
    use_generated_prompts: bool = False
    prompt_path: str | os.PathLike | None = None
    dtype: torch.dtype | str = torch.float32
    resolution: int | None = None
    num_inference_steps: int = 50
    std_deviations: Sequence[float] | None = None
    erasure_ckpt_path: str | os.PathLike | None = None


@dataclass(frozen=True)
class _CheckedAugmentations:
    """`AugmentationOptions` checked against the `--aug` names: one entry per augmentation in each list."""

    classes: list[type]
    strengths: list
    guidance_scales: list
    masks: list
    inverteds: list
    class_prompts: dict[str, list[str]] | None
    dtype: torch.dtype


def build_augmentation(aug_names: Sequence[str], options: AugmentationOptions, *, device: str | torch.device = "cpu",
                       acceleration: Acceleration | None = None, load_weights: bool = True) -> GenerativeAugmentation:
    """The augmentation `train_classifier.py` generates with, from its flags, as the reference built it.

    Cheap checks run before the model loads. The model is loaded fresh on every call: each (seed, examples per
    class) run gets its own token file (the reference kept the first run's pipeline and tokens).

    Args:
        aug_names: `--aug` names (`textual-inversion`, `real-guidance`); several are composed.
        options: what the augmentation makes (`AugmentationOptions`).
        device: where the model runs.
        acceleration: how the diffusion model runs (`semantic_aug.acceleration.Acceleration`; None takes its
            defaults); it changes the images only within float rounding.
        load_weights: False builds the model from its configs alone, on the meta device (a fraction of a second):
            the augmentation then plans images and gives the synthetic set's fingerprint exactly as the loaded one
            does, but cannot make images (`generate_synthetic_images` takes the loaded one as its `generator`).

    Returns:
        The augmentation (a `ComposeParallel`/`ComposeSequential` for several names).

    Raises:
        UserError: unknown names, strength/guidance missing or out of range, per-augmentation lists of the wrong
            length, a missing or malformed token file, a prompt CSV without some class.
    """
    aug_names = list(aug_names)
    # 1. every cheap check, before any weight is read
    checked = _check_augmentation_options(aug_names, options)
    # 2. the diffusion model, shared by every augmentation
    if load_weights:
        sampler = DiffusionSampler.from_pretrained(
            options.model_path, device=device, dtype=checked.dtype, unet_weights=options.erasure_ckpt_path,
            num_inference_steps=options.num_inference_steps, resolution=options.resolution,
            acceleration=acceleration)
    else:
        sampler = _sampler_from_configs(options.model_path, checked.dtype, options.erasure_ckpt_path,
                                        num_inference_steps=options.num_inference_steps,
                                        resolution=options.resolution)
    # 3. one augmentation per name, composed when there are several
    augmentation = _compose_augmentations(sampler, options, checked)
    if load_weights:
        logger.info("augmentation for %s: %s (strength %s, guidance %s, %d steps at %d², embedding noise %s, "
                    "generated prompts %s) on %s in %s", options.dataset_name, "+".join(aug_names), checked.strengths,
                    checked.guidance_scales, options.num_inference_steps, sampler.resolution,
                    options.use_embedding_noise, options.use_generated_prompts, sampler.device, checked.dtype)
    return augmentation


def _check_augmentation_options(aug_names: list[str], options: AugmentationOptions) -> _CheckedAugmentations:
    """The names, the per-augmentation values, the token file and prompt CSV and the dtype, checked without
    loading any model; raises `UserError` naming the flag at fault."""
    if not aug_names:
        raise UserError("--aug needs at least one augmentation")
    classes = [get_augmentation_class(name) for name in aug_names]
    if options.compose not in COMPOSERS:
        raise UserError(f"unknown --compose {options.compose!r}; choose one of {', '.join(COMPOSERS)}")
    count = len(aug_names)
    strengths = _per_augmentation(options.strength, count, "--strength")
    guidance_scales = _per_augmentation(options.guidance_scale, count, "--guidance-scale")
    masks = _per_augmentation(options.mask, count, "--mask")
    inverteds = _per_augmentation(options.inverted, count, "--inverted")
    for strength_i, guidance_i in zip(strengths, guidance_scales):
        check_strength_and_guidance(strength_i, guidance_i)
    if options.probs is not None and len(options.probs) != count:
        raise UserError(f"--probs has {len(options.probs)} values for {count} --aug augmentations; give one per --aug")
    class_prompts = check_augmentation_inputs(aug_names, options.embed_path, options.class_names,
                                              options.use_generated_prompts, options.prompt_path)
    if options.use_embedding_noise and not any(issubclass(cls, TextualInversion) for cls in classes):
        logger.warning("--use-embedding-noise has no effect without --aug textual-inversion")
    dtype = options.dtype
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    return _CheckedAugmentations(classes, strengths, guidance_scales, masks, inverteds, class_prompts, dtype)


def _compose_augmentations(sampler: DiffusionSampler, options: AugmentationOptions,
                           checked: _CheckedAugmentations) -> GenerativeAugmentation:
    """One augmentation per `--aug` name over `sampler`; several are composed as `--compose` says."""
    augmentations = []
    for cls, strength_i, guidance_i, mask_i, inverted_i in zip(checked.classes, checked.strengths,
                                                               checked.guidance_scales, checked.masks,
                                                               checked.inverteds):
        kwargs = dict(prompt=options.prompt, strength=strength_i, guidance_scale=guidance_i, mask=bool(mask_i),
                      inverted=bool(inverted_i), class_prompts=checked.class_prompts)
        if issubclass(cls, TextualInversion):
            kwargs.update(embed_path=options.embed_path, use_embedding_noise=options.use_embedding_noise,
                          std_deviations=options.std_deviations)
        augmentations.append(cls(sampler, options.class_names, **kwargs))
    if len(augmentations) == 1:
        return augmentations[0]
    return COMPOSERS[options.compose](augmentations, options.probs)


def _sampler_from_configs(model_path: str, dtype: torch.dtype, unet_weights: str | os.PathLike | None,
                          **kwargs) -> DiffusionSampler:
    """A `DiffusionSampler` over the model's configs on the meta device, whose `settings()` equal those of
    `DiffusionSampler.from_pretrained` with the same arguments (the model's id, the UNet file's hash included)."""
    from semantic_aug.core.stable_diffusion import load_stable_diffusion_configs, resolve_model_path
    from semantic_aug.stages.augmentations.sampler import file_sha256

    model_id = resolve_model_path(model_path)
    if unet_weights is not None:
        if not Path(unet_weights).is_file():
            raise UserError(f"UNet checkpoint not found: {unet_weights}")
        model_id = f"{model_id}+unet:{file_sha256(unet_weights)}"
    return DiffusionSampler(load_stable_diffusion_configs(model_path, dtype), model_id=model_id,
                            acceleration=Acceleration.none(), **kwargs)


# ----------------------------------------------------------------------------------------------------------
# planning: one manifest row per synthetic image, fixed before anything is generated


def plan_synthetic_images(dataset, augmentation: GenerativeAugmentation, num_synthetic: int,
                          synthetic_dir: str | os.PathLike, seed: int) -> tuple[pd.DataFrame, list[Choice]]:
    """Every synthetic image of the run, in the reference's order (real image major, then synthetic index).

    Each class keeps its own counter over its synthetic images, which drives the token and prompt cycling.

    Returns:
        (manifest with `MANIFEST_COLUMNS`, the augmentation's `Choice` per row).
    """
    labels = dataset.labels
    counters: dict[int, int] = defaultdict(int)
    rows, choices = [], []
    for real_idx in range(len(dataset)):
        label = int(labels[real_idx])
        class_name = dataset.class_names[label]
        for synthetic_idx in range(num_synthetic):
            image_seed = stable_seed(seed, real_idx, synthetic_idx)
            choice = augmentation.choose(class_name, counters[label], image_seed)
            counters[label] += 1
            choices.append(choice)
            rows.append((real_idx, synthetic_idx, label, class_name, choice.augmentation, choice.token, choice.prompt,
                         image_seed, str(Path(synthetic_dir) / synthetic_image_name(label, real_idx, synthetic_idx))))
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS), choices


def dataset_settings(dataset) -> dict:
    """The dataset selection behind a synthetic set: classes, split, seed, examples per class, which images, and the
    data's fingerprint (`FolderFewShotDataset.data_fingerprint`)."""
    data_dir = getattr(dataset, "data_dir", None)
    if hasattr(dataset, "image_paths"):
        paths = [str(p) for p in dataset.image_paths]
    else:
        paths = [str(dataset.get_metadata_by_idx(i).get("path", i)) for i in range(len(dataset))]
    if data_dir is not None:  # relative, so that moving the data folder keeps the cache
        paths = [os.path.relpath(p, data_dir) for p in paths]
    return {"dataset": getattr(dataset, "dataset_name", type(dataset).__name__),
            "split": getattr(dataset, "split", None), "seed": getattr(dataset, "seed", None),
            "examples_per_class": getattr(dataset, "examples_per_class", None),
            "class_names": list(dataset.class_names), "num_images": len(dataset),
            "images_sha256": settings_digest([dataset.labels.tolist(), paths]),
            # the data itself (file names and sizes), so that another folder with the same names is not reused
            "data_fingerprint": dataset.data_fingerprint(data_dir) if hasattr(dataset, "data_fingerprint") else None}


def cache_settings(dataset, augmentation: GenerativeAugmentation, num_synthetic: int, seed: int) -> dict:
    """Everything that determines the synthetic images, with its fingerprint (what `settings.json` holds)."""
    settings = {"format": CACHE_FORMAT, "seed": seed, "num_synthetic": num_synthetic,
                "dataset": dataset_settings(dataset), "augmentation": augmentation.settings()}
    return {"fingerprint": settings_digest(settings), "settings": settings}


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        flat = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: value}


def _describe_changes(old: dict, new: dict, shown: int = 3, width: int = 40) -> str:
    old, new = _flatten(old), _flatten(new)
    changed = [key for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)]
    parts = [f"{key}: {str(old.get(key))[:width]} -> {str(new.get(key))[:width]}" for key in changed[:shown]]
    if len(changed) > shown:
        parts.append(f"and {len(changed) - shown} more")
    return "; ".join(parts)


def check_cache(synthetic_dir: Path, settings: dict, overwrite: bool) -> str:
    """What to do with `synthetic_dir`: `new` (absent or empty), `reuse` (same settings) or `move` (overwrite).

    Raises:
        UserError: the folder holds images made with other settings (or with no settings.json) and not `overwrite`.
    """
    if not synthetic_dir.is_dir():
        return "new"
    settings_file = synthetic_dir / SETTINGS_NAME
    if settings_file.is_file():
        try:
            old = json.loads(settings_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = {"fingerprint": None, "settings": {}}
        if old.get("fingerprint") == settings["fingerprint"]:
            return "reuse"
        reason = f"made with other settings ({_describe_changes(old.get('settings', {}), settings['settings'])})"
    elif any(synthetic_dir.glob("*.png")):
        reason = f"not made by this version (no {SETTINGS_NAME})"
    else:
        return "new"
    if overwrite:
        return "move"
    raise UserError(f"synthetic folder {synthetic_dir} holds images {reason}; pass a new --synthetic-dir, or "
                    f"--overwrite-synthetic to move the old images aside")


def link_identical_images(synthetic_dir: Path, fingerprint: str, paths: Sequence[str],
                          shared_dirs: Sequence[str | os.PathLike]) -> int:
    """Hard-link into `synthetic_dir` the images that another folder made with the same settings fingerprint
    (for example DA-Fusion's set for DA-Fusion + filter: the filter only weights images), so no set is generated
    twice. Falls back to copying where links are impossible. Only missing files are filled in.

    Args:
        synthetic_dir: the folder being filled.
        fingerprint: its settings fingerprint; a candidate folder counts only if its `settings.json` has the same.
        paths: every planned image path of `synthetic_dir`.
        shared_dirs: candidate folders (the same run's other methods).

    Returns:
        The number of images linked or copied.
    """
    missing = {Path(p).name: Path(p) for p in paths if not Path(p).is_file()}
    linked = 0
    for folder in map(Path, shared_dirs):
        if not missing or folder.resolve() == synthetic_dir.resolve():
            continue
        try:
            other = json.loads((folder / SETTINGS_NAME).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        if other.get("fingerprint") != fingerprint:
            continue
        for name in [name for name in missing if (folder / name).is_file()]:
            target = missing.pop(name)
            with atomic_path(target) as temporary:
                temporary.unlink()  # os.link makes the name itself
                try:
                    os.link(folder / name, temporary)
                except OSError:
                    shutil.copyfile(folder / name, temporary)
            linked += 1
        if linked:
            logger.info("synthetic images: %d linked from %s (same settings)", linked, folder)
    return linked


def _move_aside(folder: Path) -> Path:
    number = 1
    while folder.with_name(f"{folder.name}.old-{number}").exists():
        number += 1
    target = folder.with_name(f"{folder.name}.old-{number}")
    os.replace(folder, target)
    return target


# ----------------------------------------------------------------------------------------------------------
# generation


class ImageWriter:
    """Writes PNGs on a thread pool (atomically), so encoding and disk overlap the next batch on the GPU."""

    def __init__(self, threads: int = WRITER_THREADS):
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="png-writer")
        self.pending = deque()

    def submit(self, generated: GeneratedImages, index: int, path: str) -> None:
        self.pending.append(self.pool.submit(self._save, generated, index, path))

    @staticmethod
    def _save(generated: GeneratedImages, index: int, path: str) -> None:
        atomic_save_image(generated.pil(index), path, compress_level=PNG_COMPRESS_LEVEL)

    def collect(self, max_pending: int) -> int:
        """Wait until at most `max_pending` writes are pending; returns how many finished (errors re-raised)."""
        finished = 0
        while self.pending and (self.pending[0].done() or len(self.pending) > max_pending):
            self.pending.popleft().result()
            finished += 1
        return finished

    def __enter__(self) -> "ImageWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        for future in self.pending:
            future.cancel()
        self.pool.shutdown(wait=True)


def _generate_rows(dataset, augmentation: GenerativeAugmentation, manifest: pd.DataFrame, choices: list[Choice],
                   rows: Sequence[int], batch_size: int, show_progress: bool) -> None:
    """Make the images of manifest `rows`, `batch_size` per augmentation call; each real image is loaded once."""
    real_indices = manifest["real_idx"].tolist()
    seeds, paths = manifest["seed"].tolist(), manifest["path"].tolist()
    loaded: dict[int, tuple] = {}
    timer = StageTimer("generation", "images")
    with ImageWriter() as writer, tqdm(total=len(rows), unit="img", desc="synthetic images", disable=not show_progress,
                                       dynamic_ncols=True) as bar:
        for start in range(0, len(rows), batch_size):
            batch = rows[start: start + batch_size]
            needed = dict.fromkeys(real_indices[i] for i in batch)
            loaded = {idx: loaded.get(idx) or (dataset.get_image_by_idx(idx), dataset.get_metadata_by_idx(idx))
                      for idx in needed}
            generated = augmentation.generate([loaded[real_indices[i]][0] for i in batch],
                                              [loaded[real_indices[i]][1] for i in batch],
                                              [choices[i] for i in batch], [seeds[i] for i in batch])
            timer.step(len(batch))  # the first call compiles; later ones queue behind the GPU's work
            for position, i in enumerate(batch):
                writer.submit(generated, position, paths[i])
            bar.update(writer.collect(max_pending=PENDING_BATCHES * batch_size))
        bar.update(writer.collect(max_pending=0))
    if show_progress and rows:
        logger.info(timer.summary())


@dataclass(frozen=True)
class GenerationOptions:
    """How `generate_synthetic_images` makes and caches a set; none of these changes the images.

    Attributes:
        batch_size: images per augmentation call (the GPU batch; the images do not depend on it).
        progress: show a progress bar (images/s) on the main process.
        overwrite: move a folder made with other settings aside instead of refusing it.
        shared_dirs: other folders whose images are linked in, where their settings are the same
            (`link_identical_images`).
    """

    batch_size: int = 8
    progress: bool = True
    overwrite: bool = False
    shared_dirs: Sequence[str | os.PathLike] = ()


def generate_synthetic_images(dataset, augmentation: GenerativeAugmentation, num_synthetic: int,
                              synthetic_dir: str | os.PathLike, seed: int, *,
                              options: GenerationOptions = GenerationOptions(), accelerator=None,
                              generator: Callable[[], GenerativeAugmentation] | None = None) -> "SyntheticSet":
    """Make (or reuse) `num_synthetic` synthetic images per real image of `dataset` in `synthetic_dir`.

    Args:
        dataset: the training split (a `FewShotDataset`).
        augmentation: from `build_augmentation`; it plans the images and gives the settings fingerprint, and makes
            the missing images unless `generator` is given.
        num_synthetic: synthetic images per real image (0 makes nothing).
        synthetic_dir: the cache folder (see the module docstring).
        seed: the run's seed; image (i, n) is seeded with a value derived from (seed, i, n).
        options: batch size, progress bar, overwrite and shared folders (`GenerationOptions`).
        accelerator: an accelerate `Accelerator`; with several processes each makes its share of the images.
        generator: builds the augmentation that makes images, called only when this process has images to make
            (so that `augmentation` may be the weightless one of `build_augmentation(..., load_weights=False)`).

    Returns:
        The `SyntheticSet`; its manifest (`MANIFEST_COLUMNS`, one row per image) is also written to
        `{synthetic_dir}/manifest.csv`.

    Raises:
        UserError: the folder holds images made with other settings (and not `overwrite`).
    """
    if num_synthetic < 0 or options.batch_size < 1:
        raise UserError(f"num_synthetic must be >= 0 and batch_size >= 1, got {num_synthetic} and "
                        f"{options.batch_size}")
    synthetic_dir = Path(synthetic_dir)
    manifest, choices = plan_synthetic_images(dataset, augmentation, num_synthetic, synthetic_dir, seed)
    if num_synthetic == 0 or len(manifest) == 0:
        return SyntheticSet(synthetic_dir, manifest)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    is_main = rank == 0

    def barrier() -> None:
        if accelerator is not None:
            accelerator.wait_for_everyone()

    # 1. the cache: every process checks (so all raise the same error); the main process prepares the folder
    settings = cache_settings(dataset, augmentation, num_synthetic, seed)
    action = check_cache(synthetic_dir, settings, options.overwrite)
    if is_main:
        _prepare_folder(synthetic_dir, settings, action, manifest["path"].tolist(), options.shared_dirs)
    barrier()

    # 2. this process's share of the missing images
    paths = manifest["path"].tolist()
    done = [Path(p).is_file() for p in paths]
    real_indices = manifest["real_idx"].tolist()
    todo = [i for i in range(len(manifest)) if real_indices[i] % world == rank and not done[i]]
    if is_main:
        logger.info("synthetic images: %d (%d per real image, %d real) in %s; %d cached, %d to make on %d process(es) "
                    "in batches of %d", len(manifest), num_synthetic, len(dataset), synthetic_dir, sum(done),
                    len(manifest) - sum(done), world, options.batch_size)
    if todo:
        maker = generator() if generator is not None else augmentation
        _generate_rows(dataset, maker, manifest, choices, todo, options.batch_size,
                       show_progress=options.progress and is_main)
        del maker  # the diffusion model leaves the device before the classifier trains
    barrier()

    # 3. the manifest, once every image exists
    manifest_file = synthetic_dir / MANIFEST_NAME
    if is_main:
        _write_manifest(manifest_file, manifest)
    barrier()
    stored = _stored_manifest(manifest_file, manifest)
    return SyntheticSet(synthetic_dir, stored if stored is not None else manifest, settings["fingerprint"])


def _prepare_folder(synthetic_dir: Path, settings: dict, action: str, paths: Sequence[str],
                    shared_dirs: Sequence[str | os.PathLike]) -> None:
    """The main process's preparation of the cache folder for `check_cache`'s `action`: move a folder of other
    settings aside, remove the leftovers of an interrupted run, record the settings, link shared images."""
    if action == "move":
        logger.warning("synthetic settings changed: moved the old images to %s", _move_aside(synthetic_dir))
    removed = remove_stale_temporaries(synthetic_dir)
    if removed:
        logger.info("removed %d unfinished file(s) of an interrupted run from %s", removed, synthetic_dir)
    if action != "reuse":
        atomic_write_text(synthetic_dir / SETTINGS_NAME, json.dumps(settings, indent=1, sort_keys=True))
    link_identical_images(synthetic_dir, settings["fingerprint"], paths, shared_dirs)


def _write_manifest(manifest_file: Path, manifest: pd.DataFrame) -> None:
    """Write the planned manifest once every image exists, unless the one on disk already describes them (it may
    hold the filter's scores, which a rerun keeps)."""
    missing = [p for p in manifest["path"].tolist() if not Path(p).is_file()]
    if missing:
        raise UserError(f"{len(missing)} synthetic images are missing in {manifest_file.parent} (first: "
                        f"{missing[0]}); rerun to resume")
    if _stored_manifest(manifest_file, manifest) is None:
        atomic_write_csv(manifest, manifest_file)


def _stored_manifest(manifest_file: Path, planned: pd.DataFrame) -> pd.DataFrame | None:
    """The manifest on disk if its `MANIFEST_COLUMNS` equal the plan, with any columns added later (the filter's
    scores), so that a rerun keeps them; None if it is missing or describes other images."""
    if not manifest_file.is_file():
        return None
    stored = pd.read_csv(manifest_file, keep_default_na=False)
    if list(stored.columns[: len(MANIFEST_COLUMNS)]) != list(MANIFEST_COLUMNS) or len(stored) != len(planned):
        return None
    base = stored[list(MANIFEST_COLUMNS)]
    if base.astype(str).equals(planned[list(MANIFEST_COLUMNS)].astype(str).reset_index(drop=True)):
        return stored
    return None


def _read_manifest(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise UserError(f"synthetic manifest not found: {path}")
    try:
        return pd.read_csv(path, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read the synthetic manifest {path} ({error}); delete it to regenerate") from None


# ----------------------------------------------------------------------------------------------------------
# the set as training sees it


@dataclass(frozen=True)
class SyntheticSet:
    """The synthetic images of one run: their folder, their manifest, the settings fingerprint they were made
    with, and, once DIAGen's filter has scored them, how training weights them. The only reader and writer of
    `manifest.csv`; each `with_*` method returns a new set.

    Attributes:
        folder: the synthetic folder (`--synthetic-dir`).
        manifest: one row per image, `MANIFEST_COLUMNS` and, once scored, `SCORE_COLUMNS` (as on disk).
        fingerprint: the settings fingerprint of `settings.json` (None for a set made elsewhere).
        weights: None (siblings drawn uniformly, every loss weighs 1), or one row per manifest row, in its order,
            with `WEIGHT_COLUMNS`: `kept` (the image may be drawn), `probability` (its chance among the kept
            siblings of its real image; NaN: uniform) and `loss_weight` (the multiplier of its loss).
    """

    folder: Path
    manifest: pd.DataFrame
    fingerprint: str | None = None
    weights: pd.DataFrame | None = None

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "SyntheticSet":
        """The set in `folder` (or of the `manifest.csv` named), as `generate_synthetic_images` left it.

        Raises:
            UserError: no readable manifest.
        """
        folder = Path(folder)
        if folder.name == MANIFEST_NAME and not folder.is_dir():
            folder = folder.parent
        manifest = _read_manifest(folder / MANIFEST_NAME)
        try:
            fingerprint = json.loads((folder / SETTINGS_NAME).read_text()).get("fingerprint")
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            fingerprint = None
        return cls(folder, manifest, fingerprint)

    @classmethod
    def from_siblings(cls, siblings: dict[int, Sequence[str | os.PathLike]],
                      folder: str | os.PathLike = ".") -> "SyntheticSet":
        """A set of images made elsewhere (benchmarks, tests): real index -> its synthetic images, in order."""
        rows = [(int(idx), n, str(path)) for idx, paths in siblings.items() for n, path in enumerate(paths)]
        return cls(Path(folder), pd.DataFrame(rows, columns=["real_idx", "synthetic_idx", "path"]))

    def __len__(self) -> int:
        return len(self.manifest)

    def with_filter_scores(self, scores: pd.DataFrame) -> "SyntheticSet":
        """The set with the filter's `SCORE_COLUMNS` (one row per manifest row, in its order) in its manifest,
        which is written to `{folder}/manifest.csv` (atomically, if it changed): the manifest is the scores' cache.

        Args:
            scores: `confidence`, `filter_weight` and `filter_id` per image (`filtering.filter_scores`).
        """
        if len(scores) != len(self.manifest) or not set(SCORE_COLUMNS) <= set(scores.columns):
            raise ValueError(f"scores need {', '.join(SCORE_COLUMNS)} for each of the {len(self.manifest)} images")
        manifest = self.manifest.copy()
        for column in SCORE_COLUMNS:
            manifest[column] = scores[column].to_numpy()
        manifest["confidence"] = manifest["confidence"].astype(np.float64)
        manifest["filter_weight"] = manifest["filter_weight"].astype(np.float64)
        text, manifest_file = manifest.to_csv(index=False), self.folder / MANIFEST_NAME
        if not manifest_file.is_file() or manifest_file.read_text() != text:
            atomic_write_text(manifest_file, text)
        return replace(self, manifest=manifest)

    def with_filter_weights(self, weights: pd.DataFrame) -> "SyntheticSet":
        """The set with its per-image weights (`WEIGHT_COLUMNS`, one row per manifest row, in its order), the one
        channel through which the filter reaches training: the sibling draws and the loss read them from
        `siblings`."""
        if len(weights) != len(self.manifest) or not set(WEIGHT_COLUMNS) <= set(weights.columns):
            raise ValueError(f"weights need {', '.join(WEIGHT_COLUMNS)} for each of the {len(self.manifest)} images")
        return replace(self, weights=weights[list(WEIGHT_COLUMNS)].reset_index(drop=True))

    def siblings(self) -> dict[int, Siblings]:
        """Real index -> its kept synthetic images (ordered by synthetic index) with their draw probabilities
        and loss weights, for `FewShotDataset.set_synthetic_images`. A real image with no kept image is absent."""
        frame = self.manifest[["real_idx", "synthetic_idx", "path"]].reset_index(drop=True)
        if self.weights is not None:
            frame = frame.join(self.weights)
            frame = frame[frame["kept"].astype(bool)]
        result: dict[int, Siblings] = {}
        for real_idx, group in frame.sort_values(["real_idx", "synthetic_idx"]).groupby("real_idx", sort=True):
            paths = group["path"].astype(str).tolist()
            if self.weights is None:
                result[int(real_idx)] = Siblings(paths)
                continue
            probability = group["probability"].to_numpy(dtype=np.float64)
            result[int(real_idx)] = Siblings(paths, None if np.isnan(probability).all() else probability,
                                             group["loss_weight"].to_numpy(dtype=np.float64))
        return result

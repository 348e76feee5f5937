"""Few-shot classifier training (`fit`), evaluation (`evaluate`), result tables and checkpoint files.

The reference fed every training draw through a PIL pipeline in DataLoader workers (decode, crop, rotate,
normalise), which bounds a linear probe at a few hundred images/s. Here each image, real or synthetic, is
decoded once into a uint8 tensor kept on the training device (validation and test images at `image_size`², the
val/test `Resize`; training images at `CACHE_SCALE` times that side), and the training transform runs there in
batch. The reference's semantics are kept:

* draws: DIAGen's class-balanced sampler (`class_balanced_sampler`), `batch_size × iterations_per_epoch` per epoch;
* each draw becomes one of the real image's synthetic siblings with probability `synthetic_probability`, the
  sibling picked uniformly or with the filter's sibling probabilities, and its loss weighted by the filter in
  mode `loss`, both read from the synthetic set attached with `FewShotDataset.set_synthetic_images`;
* train transform: RandomResizedCrop(scale 0.7-1, ratio 3/4-4/3; a plain resize for COCO), horizontal flip,
  rotation up to ±15° with black corners (nearest neighbour, torchvision's default); with RandAugment the
  reference's other chain, a resize then RandAugment; optional CutMix; val/test: the resize alone;
* Adam (weight decay as the reference's coupled L2 term, `make_optimizer`), cross-entropy, best epoch by mean per-class validation accuracy (strict >),
  kept as a real copy of the weights (the reference kept the last epoch's by mistake);
* validation: the whole val split once, without replacement (the reference sampled it with replacement);
  classes absent from a split are left out of its mean instead of counting as 0.

The crop is drawn in the original image's pixel geometry (area fraction and aspect ratio), so the cache changes
only the resampling, not which part of the image is seen. The crop is sampled from the cache at the cache's own
resolution and then reduced to `image_size` with an antialiased bilinear resize, as torchvision resizes a crop
of the decoded image; `tests/test_training.py` measures the difference against torchvision's chain. On CUDA the
model runs in bf16 autocast with channels_last; on the CPU in float32.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import pickle
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from semantic_aug.core.classifiers import FewShotClassifier
from semantic_aug.datasets.few_shot_dataset import RANDOM_CROP_SCALE, RANDOM_ROTATION_DEGREES, class_balanced_sampler
from semantic_aug.core.utils import StageTimer, UserError, atomic_torch_save, load_image

logger = logging.getLogger(__name__)

RESULTS_COLUMNS = ["idx", "seed", "examples_per_class", "epoch", "value", "metric", "split"]
TEST_COLUMNS = ["idx", "value", "metric"]
SELECT_BY = ("accuracy", "loss")
DEFAULT_EVAL_BATCH_SIZE = 64
RANDOM_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # torchvision RandomResizedCrop's default aspect-ratio range
RANDOM_CROP_ATTEMPTS = 10  # torchvision's tries before falling back to a centre crop
CUTMIX_PROBABILITY = 0.5  # chance that a draw gets a patch of another image (the reference's CutMix(prob=0.5))
OUTSIDE_GRID = -4.0  # a grid_sample coordinate far outside [-1, 1]: samples zeros (the rotation's black corners)
# training images are cached at up to twice the output side, never enlarged: a crop (70-100% of the area) is then
# reduced with PIL's antialiased filter almost as torchvision reduces the crop of the decoded image (a square cache
# at the output side had to enlarge every crop: 2.4 uint8 levels off torchvision, 23% less sharp)
CACHE_SCALE = 2
MAX_DECODE_THREADS = 8


def default_num_workers() -> int:
    """Decoding threads: one per CPU core, at most `MAX_DECODE_THREADS`."""
    return max(1, min(MAX_DECODE_THREADS, os.cpu_count() or 1))


# ----------------------------------------------------------------------------------------------------------
# decoded-image cache


@dataclass
class ImageCache:
    """Images decoded once, each resized into an S × S tensor.

    Attributes:
        images: uint8 (N, 3, S, S) on the training device; for a square cache `images / 255` is the val/test
            transform's output.
        sizes: float (N, 2) original (height, width) in pixels, on the CPU (the crop geometry needs them).
        stored: float (N, 2) (height, width) of the image inside its S × S slot (top left), on the device: S, S
            for a square cache; at most S and never more than the original for a training cache.
    """

    images: torch.Tensor
    sizes: torch.Tensor
    stored: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.images.shape[0]


def _decode_resized(load: Callable[[], object], image_size: int,
                    square: bool = True) -> tuple[np.ndarray, tuple[int, int]]:
    from PIL import Image

    image = load()
    width, height = image.size
    # torchvision's Resize((S, S)) on a PIL image is exactly this call (bilinear with PIL's antialiasing); the
    # training cache only shrinks a side longer than S
    target = (image_size, image_size) if square else (min(width, image_size), min(height, image_size))
    resized = image.resize(target, Image.BILINEAR) if target != (width, height) else image
    return np.array(resized, dtype=np.uint8), (height, width)  # a writable copy


def build_image_cache(loaders: Sequence[Callable[[], object]], image_size: int, device: torch.device | str,
                      num_workers: int | None = None, progress: bool = False, desc: str = "decode",
                      square: bool = True) -> ImageCache:
    """Decode images in parallel threads into one uint8 tensor on `device`.

    Args:
        loaders: one zero-argument function per image returning an RGB PIL image.
        image_size: side S of the square slot of each image.
        square: True resizes every image to S × S (the val/test transform); False keeps each side at its
            original length up to S (the training cache, from which crops are resized).
        device: where the image tensor lives.
        num_workers: decoding threads (PIL releases the GIL while decoding); default `default_num_workers()`.
        progress: show a progress bar.
        desc: the progress bar's label.

    Returns:
        An `ImageCache` with the images in `loaders` order.
    """
    images = torch.zeros((len(loaders), image_size, image_size, 3), dtype=torch.uint8)
    sizes = torch.empty((len(loaders), 2), dtype=torch.float32)
    stored = torch.empty((len(loaders), 2), dtype=torch.float32)
    workers = num_workers or default_num_workers()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        decoded = pool.map(partial(_decode_resized, image_size=image_size, square=square), loaders)
        for i, (array, size) in enumerate(tqdm(decoded, total=len(loaders), desc=desc, disable=not progress,
                                               leave=False)):
            images[i, : array.shape[0], : array.shape[1]] = torch.from_numpy(array)
            sizes[i] = torch.tensor(size, dtype=torch.float32)
            stored[i] = torch.tensor(array.shape[:2], dtype=torch.float32)
    return ImageCache(images.permute(0, 3, 1, 2).contiguous().to(device), sizes, stored.to(device))


def cache_dataset(dataset, device: torch.device | str, num_workers: int | None = None,
                  progress: bool = False) -> ImageCache:
    """The real images of `dataset` (no synthetic ones) at `dataset.image_size`, in index order."""
    loaders = [partial(dataset.get_image_by_idx, idx) for idx in range(len(dataset))]
    return build_image_cache(loaders, dataset.image_size, device, num_workers, progress,
                             desc=f"decode {getattr(dataset, 'split', '')}".strip())


# ----------------------------------------------------------------------------------------------------------
# the training transform, in batch on the device


def sample_crop_boxes(sizes: torch.Tensor, generator: torch.Generator, random_crop: bool = True) -> torch.Tensor:
    """RandomResizedCrop boxes (torchvision's algorithm, vectorised), in `grid_sample` coordinates.

    Args:
        sizes: float (n, 2) original (height, width) of each image.
        generator: seeds the draws (CPU).
        random_crop: False gives the whole image (COCO's plain resize).

    Returns:
        float (n, 4): centre x, centre y, half width, half height, in [-1, 1] image coordinates.
    """
    n = sizes.shape[0]
    boxes = torch.zeros((n, 4))
    boxes[:, 2:] = 1.0
    if not random_crop or n == 0:
        return boxes
    height, width = sizes[:, :1], sizes[:, 1:]
    area_fraction = torch.empty((n, RANDOM_CROP_ATTEMPTS)).uniform_(*RANDOM_CROP_SCALE, generator=generator)
    log_ratio = torch.empty((n, RANDOM_CROP_ATTEMPTS)).uniform_(*map(math.log, RANDOM_CROP_RATIO), generator=generator)
    ratio = log_ratio.exp()  # crop width / crop height, in pixels
    crop_w = torch.sqrt(area_fraction * ratio * height / width)  # fractions of the image's width and height
    crop_h = torch.sqrt(area_fraction / ratio * width / height)
    valid = (crop_w <= 1) & (crop_h <= 1)
    first = valid.float().argmax(dim=1, keepdim=True)
    crop_w, crop_h = crop_w.gather(1, first)[:, 0], crop_h.gather(1, first)[:, 0]
    # torchvision's fallback after failed attempts: the largest centred crop with a clamped aspect ratio
    aspect = (width / height)[:, 0]
    fallback_w = torch.where(aspect > RANDOM_CROP_RATIO[1], RANDOM_CROP_RATIO[1] / aspect, torch.ones_like(aspect))
    fallback_h = torch.where(aspect < RANDOM_CROP_RATIO[0], aspect / RANDOM_CROP_RATIO[0], torch.ones_like(aspect))
    found = valid.any(dim=1)
    crop_w, crop_h = torch.where(found, crop_w, fallback_w), torch.where(found, crop_h, fallback_h)
    offset = torch.rand((n, 2), generator=generator)
    left = torch.where(found, offset[:, 0] * (1 - crop_w), (1 - crop_w) / 2)
    top = torch.where(found, offset[:, 1] * (1 - crop_h), (1 - crop_h) / 2)
    return torch.stack([2 * left + crop_w - 1, 2 * top + crop_h - 1, crop_w, crop_h], dim=1)


def pixel_centres(image_size: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, x) grids (S, S) of pixel centres in [-1, 1] (`align_corners=False` convention)."""
    line = (torch.arange(image_size, device=device, dtype=torch.float32) * 2 + 1) / image_size - 1
    return torch.meshgrid(line, line, indexing="ij")


def resize_weights(starts: torch.Tensor, lengths: torch.Tensor, in_size: int, out_size: int,
                   limits: torch.Tensor | None = None) -> torch.Tensor:
    """Matrices that resize a span of pixels as PIL's antialiased bilinear `resize(box=...)` does, one per row.

    Output pixel i samples source position `start + (i + 0.5) · scale` (scale = length / out_size) with a triangle
    filter as wide as max(scale, 1) source pixels on each side, clipped to the image and normalised to sum 1.

    Args:
        starts: (B,) first source coordinate of each span, in pixels (fractional).
        lengths: (B,) span lengths in pixels.
        in_size: source side in pixels.
        out_size: output side in pixels.
        limits: (B,) length of each source image along this side (pixels beyond it are padding); None: in_size.

    Returns:
        float (B, out_size, in_size).
    """
    scale = (lengths / out_size)[:, None, None]
    support = scale.clamp(min=1.0)
    centres = starts[:, None, None] + (torch.arange(out_size, device=starts.device)[None, :, None] + 0.5) * scale
    source = torch.arange(in_size, device=starts.device, dtype=torch.float32)[None, None, :] + 0.5
    weights = (1 - ((source - centres) / support).abs()).clamp(min=0)
    if limits is not None:
        weights = weights * (source < limits[:, None, None])
    return weights / weights.sum(dim=2, keepdim=True).clamp(min=1e-12)


def warp_images(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, angles: torch.Tensor,
                image_size: int, stored: torch.Tensor | None = None) -> torch.Tensor:
    """Crop, resize, flip and rotate a batch: torchvision's RandomResizedCrop → RandomHorizontalFlip → RandomRotation.

    1. The crop is resized to `image_size` by two batched matrix products that apply PIL's antialiased bilinear
       filter (`resize_weights`, the mirror image folded in), and rounded to 8 bits, as torchvision's
       RandomResizedCrop resizes a PIL image.
    2. The rotation samples that image with nearest neighbour (torchvision's default) about its centre; the
       corners it uncovers are black.

    Args:
        images: uint8 (B, 3, H, H) cached images.
        boxes: (B, 4) crop boxes from `sample_crop_boxes`.
        flips: (B,) +1 to keep, -1 to mirror horizontally.
        angles: (B,) counter-clockwise rotation in radians (torchvision's `rotate` convention).
        image_size: output side.
        stored: (B, 2) (height, width) of each image in the top left of its slot (`ImageCache.stored`); None: the
            whole slot.

    Returns:
        float32 (B, 3, image_size, image_size) in [0, 1].
    """
    side = images.shape[-1]
    if stored is None:
        stored = torch.full((images.shape[0], 2), float(side), device=images.device)
    height, width = stored[:, 0], stored[:, 1]
    rows = resize_weights((boxes[:, 1] - boxes[:, 3] + 1) / 2 * height, boxes[:, 3] * height, side, image_size,
                          height)
    columns = resize_weights((boxes[:, 0] - boxes[:, 2] + 1) / 2 * width, boxes[:, 2] * width, side, image_size,
                             width)
    columns = torch.where(flips[:, None, None] < 0, columns.flip(1), columns)
    crops = rows[:, None] @ images.float() @ columns[:, None].transpose(-1, -2)  # (B, 3, S, S)
    crops = crops.round().clamp(0, 255)
    if bool((angles != 0).any()):
        y, x = pixel_centres(image_size, images.device)
        cos, sin = angles.cos()[:, None, None], angles.sin()[:, None, None]
        u = cos * x - sin * y  # output pixel -> the point of the unrotated image that lands there
        v = sin * x + cos * y
        grid = torch.stack([u, v], dim=-1).masked_fill(((u.abs() > 1) | (v.abs() > 1))[..., None], OUTSIDE_GRID)
        crops = F.grid_sample(crops, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return crops / 255.0


def randaugment_batch(images: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
    """torchvision's RandAugment with one policy per image, as the per-image PIL pipeline had; [0, 1] in and out.

    Args:
        images: float (B, 3, S, S) in [0, 1].
        seeds: one seed per image for its random policy (RandAugment draws from torch's global generator, which
            is set aside meanwhile).
    """
    from torchvision.transforms import v2

    augment = v2.RandAugment()
    as_uint8 = (images * 255).round().clamp(0, 255).to(torch.uint8)  # the PIL pipeline augmented 8-bit images
    augmented = []
    with torch.random.fork_rng(devices=[]):
        for image, seed in zip(as_uint8, seeds):
            torch.manual_seed(seed)
            augmented.append(augment(image))
    return torch.stack(augmented).float() / 255.0


# ----------------------------------------------------------------------------------------------------------
# the training split on the device: real images, synthetic siblings, per-epoch draws


@dataclass
class EpochDraws:
    """Everything random about one epoch, drawn on the CPU from the run's generator, then moved to the device.

    One row per training draw (`batch_size × iterations_per_epoch`); batch b is rows [b·B, (b+1)·B).
    """

    real_index: torch.Tensor  # long: the real image the class-balanced sampler drew
    cache_index: torch.Tensor  # long: row of the image cache (that image or one of its synthetic siblings)
    labels: torch.Tensor  # long
    synthetic: torch.Tensor  # bool: the draw was replaced by a synthetic sibling
    loss_weights: torch.Tensor  # float: 1 for real images, the filter's loss weight for synthetic ones
    boxes: torch.Tensor  # float (n, 4) crop boxes
    flips: torch.Tensor  # float ±1
    angles: torch.Tensor  # float radians
    randaugment_seeds: torch.Tensor | None = None  # long: seeds each draw's RandAugment policy
    cutmix_partner: torch.Tensor | None = None  # long: position in the batch of the image pasted in
    cutmix_boxes: torch.Tensor | None = None  # float (n, 4): x0, y0, x1, y1 in [-1, 1]; empty when not mixed

    def to(self, device: torch.device | str) -> "EpochDraws":
        return EpochDraws(**{name: (value.to(device) if value is not None else None)
                             for name, value in self.__dict__.items()})

    def rows(self, start: int, stop: int) -> "EpochDraws":
        return EpochDraws(**{name: (value[start:stop] if value is not None else None)
                             for name, value in self.__dict__.items()})


class TrainingData:
    """The training split decoded onto `device`, with its synthetic siblings, drawing and augmenting batches.

    Synthetic images are decoded only when `dataset.synthetic_probability > 0`, so a run with probability 0
    never reads one.

    Args:
        dataset: a `FewShotDataset` (its `synthetic_images`, the siblings of its synthetic set with their draw
            probabilities and loss weights, `synthetic_probability`, `image_size` and `random_crop` are honoured; a
            custom `transform` is not used). Real images weigh 1 in the loss.
        device: where images live and batches are built.
        use_randaugment: the reference's RandAugment chain, a resize then RandAugment, in place of the crop, flip
            and rotation (None: `dataset.use_randaugment`).
        use_cutmix: paste a box of another image of the batch into half of the draws (labels mixed by area).
        num_workers: decoding threads.
        progress: show decoding progress.
    """

    def __init__(self, dataset, device: torch.device | str,
                 use_randaugment: bool | None = None, use_cutmix: bool = False, num_workers: int | None = None,
                 progress: bool = False):
        self.device = torch.device(device)
        self.image_size = dataset.image_size
        self.random_crop = getattr(dataset, "random_crop", True)
        self.synthetic_probability = float(getattr(dataset, "synthetic_probability", 0.0))
        self.use_randaugment = (getattr(dataset, "use_randaugment", False) if use_randaugment is None
                                else use_randaugment)
        self.use_cutmix = use_cutmix
        self.real_labels = torch.as_tensor(np.asarray(dataset.labels, dtype=np.int64))
        num_real = len(self.real_labels)
        if num_real == 0:
            raise UserError("the training split is empty")

        loaders: list[Callable[[], object]] = [partial(dataset.get_image_by_idx, idx) for idx in range(num_real)]
        siblings: list[list[int]] = [[] for _ in range(num_real)]
        probabilities: list[np.ndarray] = [np.zeros(0)] * num_real
        loss_weights = [1.0] * num_real
        if self.synthetic_probability > 0:
            for idx, images in sorted(getattr(dataset, "synthetic_images", {}).items()):
                if not 0 <= idx < num_real:
                    raise UserError(f"synthetic images are attached to real image {idx}, but the split has {num_real}")
                paths = images.paths
                siblings[idx] = list(range(len(loaders), len(loaders) + len(paths)))
                loaders += [partial(load_image, path) for path in paths]
                probabilities[idx] = (np.asarray(images.probabilities, dtype=np.float64)
                                      if images.probabilities is not None else np.full(len(paths), 1.0 / len(paths)))
                loss_weights += ([float(weight) for weight in images.loss_weights] if images.loss_weights is not None
                                 else [1.0] * len(paths))
        self.num_synthetic_images = len(loaders) - num_real
        self.cache = build_image_cache(loaders, self.image_size * CACHE_SCALE, self.device, num_workers, progress,
                                       desc="decode train", square=False)
        self.loss_weights = torch.tensor(loss_weights, dtype=torch.float32)

        # sibling table: (num_real, K) cache rows and cumulative pick probabilities, padded with +inf
        width = max([len(s) for s in siblings] + [1])
        self.sibling_count = torch.tensor([len(s) for s in siblings], dtype=torch.int64)
        self.sibling_rows = torch.zeros((num_real, width), dtype=torch.int64)
        self.sibling_cdf = torch.full((num_real, width), math.inf, dtype=torch.float64)
        for idx, rows in enumerate(siblings):
            if rows:
                self.sibling_rows[idx, : len(rows)] = torch.tensor(rows)
                self.sibling_cdf[idx, : len(rows)] = torch.from_numpy(np.cumsum(probabilities[idx]))
        self._pixel_grid = pixel_centres(self.image_size, self.device)

    def draw_epoch(self, num_samples: int, batch_size: int, generator: torch.Generator) -> EpochDraws:
        """All random choices of one epoch: which images, real or synthetic, and their transform parameters.

        Args:
            num_samples: draws in the epoch (`batch_size × iterations_per_epoch`).
            batch_size: rows per batch (CutMix partners are picked within a batch).
            generator: the run's CPU generator.

        Returns:
            `EpochDraws` on the device.
        """
        real_idx = torch.as_tensor(list(class_balanced_sampler(self.real_labels.numpy(), num_samples, generator)),
                                   dtype=torch.int64)
        # 1. replace a draw by a synthetic sibling with probability synthetic_probability (FewShotDataset semantics)
        uniforms = torch.rand((num_samples, 2), generator=generator, dtype=torch.float64)
        synthetic = (uniforms[:, 0] < self.synthetic_probability) & (self.sibling_count[real_idx] > 0)
        choice = torch.searchsorted(self.sibling_cdf[real_idx], uniforms[:, 1:].contiguous(), right=True)[:, 0]
        choice = torch.minimum(choice, (self.sibling_count[real_idx] - 1).clamp(min=0))
        cache_index = torch.where(synthetic, self.sibling_rows[real_idx].gather(1, choice[:, None])[:, 0], real_idx)
        # 2. the geometric transform's parameters; the reference's RandAugment chain is a plain resize before it
        geometric = not self.use_randaugment
        boxes = sample_crop_boxes(self.cache.sizes[cache_index], generator, self.random_crop and geometric)
        flips = torch.where(torch.rand(num_samples, generator=generator) < 0.5, -1.0, 1.0)
        max_angle = math.radians(RANDOM_ROTATION_DEGREES)
        angles = torch.empty(num_samples).uniform_(-max_angle, max_angle, generator=generator)
        if not geometric:
            flips, angles = torch.ones_like(flips), torch.zeros_like(angles)
        draws = EpochDraws(real_index=real_idx, cache_index=cache_index, labels=self.real_labels[real_idx],
                           synthetic=synthetic, loss_weights=self.loss_weights[cache_index], boxes=boxes, flips=flips,
                           angles=angles)
        if self.use_randaugment:
            draws.randaugment_seeds = torch.randint(0, 2**62, (num_samples,), generator=generator)
        if self.use_cutmix:
            draws.cutmix_partner, draws.cutmix_boxes = self._draw_cutmix(num_samples, batch_size, generator)
        return draws.to(self.device)

    @staticmethod
    def _draw_cutmix(num_samples: int, batch_size: int,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        position = torch.arange(num_samples)
        batch_start = position - position % batch_size
        batch_len = torch.clamp(num_samples - batch_start, max=batch_size)
        offset = 1 + (torch.rand(num_samples, generator=generator) * (batch_len - 1).clamp(min=1)).long()
        partner = (position - batch_start + offset) % batch_len
        mixed = torch.rand(num_samples, generator=generator) < CUTMIX_PROBABILITY
        kept_area = torch.rand(num_samples, generator=generator)  # λ ~ Beta(1, 1), the reference's CutMix(beta=1)
        half_side = torch.sqrt(1 - kept_area) * mixed  # the pasted box covers 1 - λ of the image (before clipping)
        centre = torch.rand((num_samples, 2), generator=generator) * 2 - 1
        low, high = (centre - half_side[:, None]).clamp(-1, 1), (centre + half_side[:, None]).clamp(-1, 1)
        return partner, torch.cat([low, high], dim=1)

    def batch(self, draws: EpochDraws) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Augmented images for the rows of `draws` (one batch).

        Returns:
            images float (B, 3, S, S) in [0, 1]; labels (B,); partner labels (B,) for CutMix (the labels themselves
            without it); kept fraction λ (B,) of each image (1 without CutMix).
        """
        images = warp_images(self.cache.images.index_select(0, draws.cache_index), draws.boxes, draws.flips,
                             draws.angles, self.image_size, self.cache.stored.index_select(0, draws.cache_index))
        if self.use_randaugment:
            images = randaugment_batch(images, draws.randaugment_seeds.tolist())
        labels, partner_labels = draws.labels, draws.labels
        kept = torch.ones(labels.shape[0], device=images.device)
        if draws.cutmix_partner is not None:
            y, x = self._pixel_grid
            box = draws.cutmix_boxes[:, :, None, None]
            pasted = (x >= box[:, 0]) & (x < box[:, 2]) & (y >= box[:, 1]) & (y < box[:, 3])  # (B, S, S)
            images = torch.where(pasted[:, None], images[draws.cutmix_partner], images)
            kept = 1 - pasted.flatten(1).float().mean(dim=1)
            partner_labels = labels[draws.cutmix_partner]
        return images, labels, partner_labels, kept


# ----------------------------------------------------------------------------------------------------------
# metrics


def autocast(device: torch.device):
    """The model's precision context: bf16 autocast on GPUs that support it; float32 elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_model_layout(images: torch.Tensor) -> torch.Tensor:
    """Images in the memory layout the models run fastest with."""
    # channels_last: cuDNN's tensor-core kernels want it, and oneDNN's CPU convolutions run ~3x faster with it
    return images.contiguous(memory_format=torch.channels_last)


def _class_sums(per_sample_loss: torch.Tensor, correct: torch.Tensor, labels: torch.Tensor,
                num_classes: int) -> torch.Tensor:
    """(3, C) per-class sums of loss, correct predictions and counts; stays on the device (no host sync)."""
    sums = torch.zeros((3, num_classes), device=labels.device)
    sums[0].index_add_(0, labels, per_sample_loss.detach().float())
    sums[1].index_add_(0, labels, correct.float())
    sums[2].index_add_(0, labels, torch.ones_like(per_sample_loss, dtype=torch.float32))
    return sums


@dataclass
class ClassMetrics:
    """Per-class mean loss and accuracy (NaN for classes absent from the split) and their means over present classes."""

    loss: np.ndarray
    accuracy: np.ndarray

    @classmethod
    def from_sums(cls, sums: torch.Tensor) -> "ClassMetrics":
        loss_sum, correct, count = sums.double().cpu().numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            return cls(loss=np.where(count > 0, loss_sum / count, np.nan),
                       accuracy=np.where(count > 0, correct / count, np.nan))

    @property
    def mean_loss(self) -> float:
        return float(np.nanmean(self.loss)) if np.isfinite(self.loss).any() else math.nan

    @property
    def mean_accuracy(self) -> float:
        return float(np.nanmean(self.accuracy)) if np.isfinite(self.accuracy).any() else math.nan


class _SplitEvaluator:
    """Loss and accuracy of a model on a cached split, in batches, without replacement.

    For a frozen `FewShotClassifier` the backbone features of the split are computed once and reused, since the
    val/test transform is deterministic and the backbone does not change.
    """

    def __init__(self, model: nn.Module, cache: ImageCache, labels: np.ndarray, num_classes: int, batch_size: int):
        self.model, self.cache, self.num_classes, self.batch_size = model, cache, num_classes, batch_size
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64), device=cache.images.device)
        self.reuse_features = isinstance(model, FewShotClassifier) and not model.finetune_backbone
        self.features: list[torch.Tensor] | None = None

    @torch.no_grad()
    def __call__(self) -> ClassMetrics:
        self.model.eval()
        device = self.cache.images.device
        sums = torch.zeros((3, self.num_classes), device=device)
        starts = range(0, len(self.cache), self.batch_size)
        if self.reuse_features and self.features is None:
            with autocast(device):
                self.features = [self.model.features(self._images(s)) for s in starts]
        for i, start in enumerate(starts):
            with autocast(device):
                logits = (self.model.classify_features(self.features[i]) if self.reuse_features
                          else self.model(self._images(start)))
            labels = self.labels[start: start + self.batch_size]
            loss = F.cross_entropy(logits.float(), labels, reduction="none")
            sums += _class_sums(loss, logits.argmax(dim=1) == labels, labels, self.num_classes)
        return ClassMetrics.from_sums(sums)

    def _images(self, start: int) -> torch.Tensor:
        return to_model_layout(self.cache.images[start: start + self.batch_size].float() / 255.0)


def metric_rows(metrics: ClassMetrics, class_names: Sequence[str], mean_prefix: str = "") -> list[tuple[float, str]]:
    """(value, metric) pairs: the means, then per-class losses and accuracies named `Loss {Class.title()}`."""
    rows = [(metrics.mean_loss, f"{mean_prefix}Loss"), (metrics.mean_accuracy, f"{mean_prefix}Accuracy")]
    rows += [(float(v), f"Loss {name.title()}") for v, name in zip(metrics.loss, class_names)]
    rows += [(float(v), f"Accuracy {name.title()}") for v, name in zip(metrics.accuracy, class_names)]
    return rows


# ----------------------------------------------------------------------------------------------------------
# fit / evaluate


@dataclass
class FitResult:
    """What `fit` returns.

    Attributes:
        best_state_dict: a deep copy of the model's weights at the best epoch (already loaded into the model).
        best_epoch: 0-based epoch of those weights.
        history: the reference's results table (`RESULTS_COLUMNS`), one row per metric, split and epoch.
        best_value: the selection metric at the best epoch (NaN without a validation split).
        timings: seconds spent decoding (`decode_seconds`), training (`train_seconds`, summed over epochs, and
            `epoch_train_seconds`, per epoch) and validating (`val_seconds`), and `train_images` drawn.
    """

    best_state_dict: dict[str, torch.Tensor]
    best_epoch: int
    history: pd.DataFrame
    best_value: float = math.nan
    timings: dict = field(default_factory=dict)


def make_optimizer(parameters, lr: float, weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    """The reference's optimiser: `torch.optim.Adam(lr, weight_decay)`, whose decay is an L2 term in the gradient.

    Args:
        parameters: the trainable parameters.
        lr: learning rate.
        weight_decay: L2 coefficient (0: plain Adam).
        device: the parameters' device (CUDA gets the fused kernel, which computes the same update).
    """
    return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay, fused=torch.device(device).type == "cuda")


def _deep_copy_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def _is_improvement(value: float, best: float | None, select_by: str) -> bool:
    """Strictly better than the best so far (the first finite value always is); a tie keeps the earlier epoch."""
    if math.isnan(value):
        return best is None
    if best is None or math.isnan(best):
        return True
    return value > best if select_by == "accuracy" else value < best


@dataclass(frozen=True)
class FitOptions:
    """The hyperparameters of `fit` (the reference train_classifier.py's training flags).

    Attributes:
        num_epochs: epochs of `iterations_per_epoch` batches of `batch_size` class-balanced draws.
        iterations_per_epoch: batches per epoch.
        batch_size: draws per batch.
        lr: Adam learning rate.
        weight_decay: L2 penalty added to the gradient (`torch.optim.Adam`'s coupled weight decay, the reference's
            filter optimiser).
        select_by: `accuracy` keeps the epoch of the highest mean per-class val accuracy, `loss` of the lowest
            mean per-class val loss (the filter's rule); ties keep the earlier epoch.
        early_stopping_patience: stop after this many epochs without improvement (None: never).
        use_randaugment: the reference's RandAugment chain (a resize, then RandAugment) in place of the crop,
            flip and rotation (None: the training dataset's setting).
        use_cutmix: CutMix within each batch.
        num_workers: image-decoding threads (None: `default_num_workers()`).
        progress: show a progress bar.
    """

    num_epochs: int
    iterations_per_epoch: int
    batch_size: int
    lr: float = 1e-4
    weight_decay: float = 0.0
    select_by: str = "accuracy"
    early_stopping_patience: int | None = None
    use_randaugment: bool | None = None
    use_cutmix: bool = False
    num_workers: int | None = None
    progress: bool = True

    def __post_init__(self):
        if self.select_by not in SELECT_BY:
            raise ValueError(f"select_by must be one of {SELECT_BY}, got {self.select_by!r}")
        if self.num_epochs < 1 or self.iterations_per_epoch < 1 or self.batch_size < 1:
            raise UserError(f"num_epochs, iterations_per_epoch and batch_size must be at least 1, got "
                            f"{self.num_epochs}, {self.iterations_per_epoch}, {self.batch_size}")

    @property
    def draws_per_epoch(self) -> int:
        return self.batch_size * self.iterations_per_epoch


@dataclass
class _BestEpoch:
    """The selection rule: the best epoch so far, its metric and a real copy of its weights."""

    select_by: str
    state: dict[str, torch.Tensor] | None = None
    epoch: int = -1
    value: float | None = None

    def keep_last(self, model: nn.Module, epoch: int) -> None:
        """Without a validation split every epoch replaces the previous one (the last is kept)."""
        self.state, self.epoch = _deep_copy_state(model), epoch

    def offer(self, model: nn.Module, epoch: int, val_metrics: ClassMetrics) -> None:
        """Keep this epoch if its validation metric strictly improves on the best so far."""
        value = val_metrics.mean_accuracy if self.select_by == "accuracy" else val_metrics.mean_loss
        if _is_improvement(value, self.value, self.select_by):
            self.state, self.epoch, self.value = _deep_copy_state(model), epoch, value

    def patience_exhausted(self, epoch: int, patience: int | None) -> bool:
        return patience is not None and epoch - self.epoch >= patience


def _prepare_model(model: nn.Module, device: torch.device) -> list[nn.Parameter]:
    """Move `model` to `device` in channels_last and return its trainable parameters."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels once
    model.to(device, memory_format=torch.channels_last)
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise ValueError("the model has no trainable parameters")
    return parameters


def _decode_splits(model: nn.Module, train_dataset, val_dataset, options: FitOptions,
                   device: torch.device) -> tuple[TrainingData, _SplitEvaluator | None]:
    """The training images (with their synthetic siblings) and the validation split, decoded onto `device`."""
    train_data = TrainingData(train_dataset, device, options.use_randaugment, options.use_cutmix, options.num_workers,
                              options.progress)
    if val_dataset is None:
        return train_data, None
    eval_batch_size = max(options.batch_size, DEFAULT_EVAL_BATCH_SIZE)
    evaluator = _SplitEvaluator(model, cache_dataset(val_dataset, device, options.num_workers, options.progress),
                                val_dataset.labels, len(train_dataset.class_names), eval_batch_size)
    return train_data, evaluator


def _train_epoch(model: nn.Module, train_data: TrainingData, optimizer: torch.optim.Optimizer, options: FitOptions,
                 generator: torch.Generator, num_classes: int, device: torch.device, bar: tqdm) -> ClassMetrics:
    """One epoch of class-balanced draws; returns its per-class training loss and accuracy."""
    model.train()
    draws = train_data.draw_epoch(options.draws_per_epoch, options.batch_size, generator)
    sums = torch.zeros((3, num_classes), device=device)
    for iteration in range(options.iterations_per_epoch):
        rows = draws.rows(iteration * options.batch_size, (iteration + 1) * options.batch_size)
        images, labels, partner_labels, kept = train_data.batch(rows)
        with autocast(device):
            logits = model(to_model_layout(images))
        logits = logits.float()
        loss_per_sample = kept * F.cross_entropy(logits, labels, reduction="none")
        if train_data.use_cutmix:
            loss_per_sample = loss_per_sample + (1 - kept) * F.cross_entropy(logits, partner_labels,
                                                                             reduction="none")
        loss = (rows.loss_weights * loss_per_sample).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sums += _class_sums(loss_per_sample, logits.argmax(dim=1) == labels, labels, num_classes)
        bar.update(1)
    return ClassMetrics.from_sums(sums)  # the epoch's one host sync


def _history_table(records: list[tuple], seed: int, examples_per_class: int | None) -> pd.DataFrame:
    """The reference's results table (`RESULTS_COLUMNS`) from (epoch, value, metric, split) records."""
    return pd.DataFrame.from_records(
        [(i, seed, examples_per_class, epoch, value, metric, split)
         for i, (epoch, value, metric, split) in enumerate(records)], columns=RESULTS_COLUMNS)


def fit(model: nn.Module, train_dataset, val_dataset, options: FitOptions, *, device: torch.device | str,
        generator: torch.Generator) -> FitResult:
    """Train `model` on the few-shot split and keep its best epoch (the reference's train_classifier.py loop).

    Args:
        model: maps [0, 1] images (N, 3, S, S) to logits; a `FewShotClassifier` gets its frozen backbone kept in
            eval mode and its validation features computed once.
        train_dataset: a `FewShotDataset`; its synthetic set (`set_synthetic_images`) gives the synthetic siblings,
            their draw probabilities and their loss weights (the batch loss is the mean of weight × cross-entropy).
        val_dataset: the validation split, evaluated whole once per epoch; None trains without selection (the
            last epoch is kept).
        options: the training hyperparameters (`FitOptions`).
        device: where to train.
        generator: every draw of the run (images, synthetic replacement, transform parameters) comes from it;
            the caller seeds it (`torch.Generator().manual_seed(seed)`).

    Returns:
        A `FitResult`; the model holds the best epoch's weights on `device`.
    """
    device = torch.device(device)
    class_names = list(train_dataset.class_names)
    num_classes = len(class_names)
    parameters = _prepare_model(model, device)

    # 1. decode every image once onto the device
    started = time.perf_counter()
    train_data, evaluator = _decode_splits(model, train_dataset, val_dataset, options, device)
    timings = {"decode_seconds": time.perf_counter() - started, "train_seconds": 0.0, "val_seconds": 0.0,
               "epoch_train_seconds": [], "train_images": 0}
    optimizer = make_optimizer(parameters, options.lr, options.weight_decay, device)
    logger.info("training: %d real + %d synthetic images (synthetic_probability %.2f), %d classes, %d epochs x %d "
                "iterations x batch %d, device %s", len(train_data.real_labels), train_data.num_synthetic_images,
                train_data.synthetic_probability, num_classes, options.num_epochs, options.iterations_per_epoch,
                options.batch_size, device)

    # 2. epochs of class-balanced draws, each followed by one pass over the whole validation split
    records: list[tuple] = []
    best = _BestEpoch(options.select_by)
    bar = tqdm(total=options.num_epochs * options.iterations_per_epoch, desc="train", disable=not options.progress,
               unit="it")
    timer = StageTimer("training", "iterations")
    for epoch in range(options.num_epochs):
        started = time.perf_counter()
        train_metrics = _train_epoch(model, train_data, optimizer, options, generator, num_classes, device, bar)
        timer.step(options.iterations_per_epoch)
        timings["epoch_train_seconds"].append(time.perf_counter() - started)
        timings["train_images"] += options.draws_per_epoch
        records += [(epoch, value, metric, "Training") for value, metric in metric_rows(train_metrics, class_names)]

        # 3. validation and selection of the best epoch
        if evaluator is None:
            best.keep_last(model, epoch)
            continue
        started = time.perf_counter()
        val_metrics = evaluator()
        timings["val_seconds"] += time.perf_counter() - started
        records += [(epoch, value, metric, "Validation") for value, metric in metric_rows(val_metrics, class_names)]
        best.offer(model, epoch, val_metrics)
        bar.set_postfix(val_accuracy=f"{val_metrics.mean_accuracy:.3f}", best_epoch=best.epoch)
        if best.patience_exhausted(epoch, options.early_stopping_patience):
            logger.info("early stopping after epoch %d: no improvement since epoch %d", epoch, best.epoch)
            break
    bar.close()
    timings["train_seconds"] = float(sum(timings["epoch_train_seconds"]))
    logger.info("%s (validation %.1f s of it)", timer.summary(), timings["val_seconds"])

    # 4. the best epoch's weights back into the model
    model.load_state_dict(best.state)
    history = _history_table(records, generator.initial_seed(), getattr(train_dataset, "examples_per_class", None))
    return FitResult(best_state_dict=best.state, best_epoch=best.epoch, history=history,
                     best_value=math.nan if best.value is None else best.value, timings=timings)


def evaluate(model: nn.Module, dataset, device: torch.device | str, batch_size: int = DEFAULT_EVAL_BATCH_SIZE,
             num_workers: int | None = None, progress: bool = False) -> pd.DataFrame:
    """Loss and accuracy of `model` on every image of `dataset` (its val/test transform: a resize).

    Args:
        model: maps [0, 1] images to logits.
        dataset: a `FewShotDataset` split.
        device: where to run.
        batch_size: images per forward pass (results do not depend on it).
        num_workers: image-decoding threads.
        progress: show decoding progress.

    Returns:
        The reference's test table (`TEST_COLUMNS`): `Mean Loss`, `Mean Accuracy`, then `Loss {Class.title()}` and
        `Accuracy {Class.title()}` per class (NaN for classes absent from the split, which the means leave out).
    """
    device = torch.device(device)
    model.to(device, memory_format=torch.channels_last)
    cache = cache_dataset(dataset, device, num_workers, progress)
    metrics = _SplitEvaluator(model, cache, dataset.labels, dataset.num_classes, batch_size)()
    rows = metric_rows(metrics, list(dataset.class_names), mean_prefix="Mean ")
    return pd.DataFrame([(i, value, metric) for i, (value, metric) in enumerate(rows)], columns=TEST_COLUMNS)


# ----------------------------------------------------------------------------------------------------------
# classifier checkpoints (their names: `semantic_aug.core.layout.RunLayout`)


def save_classifier(model: FewShotClassifier, path: str | os.PathLike, metadata: dict) -> None:
    """Write a classifier checkpoint atomically.

    Args:
        model: the trained `FewShotClassifier`.
        path: target `.pth` file.
        metadata: plain values (str, numbers, lists, dicts) stored beside the weights; `class_names` is
            stored as its own field.
    """
    payload = {"backbone": model.backbone_name, "num_classes": model.head.out_features,
               "class_names": list(metadata.get("class_names", [])), "finetune_backbone": model.finetune_backbone,
               "state_dict": {name: value.detach().cpu() for name, value in model.state_dict().items()},
               "metadata": copy.deepcopy(metadata)}
    atomic_torch_save(payload, path)


def load_classifier(path: str | os.PathLike, device: torch.device | str = "cpu") -> FewShotClassifier:
    """Rebuild a classifier saved by `save_classifier` (no weights are downloaded: they all come from the file).

    Args:
        path: the `.pth` file.
        device: where to put the model.

    Returns:
        The `FewShotClassifier` in eval mode, with `class_names` and `metadata` attributes from the file.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"classifier checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        model = FewShotClassifier(payload["backbone"], payload["num_classes"],
                                  finetune_backbone=payload["finetune_backbone"], pretrained=False)
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, KeyError, TypeError, ValueError, EOFError, OSError, pickle.UnpicklingError) as error:
        raise UserError(f"corrupt or incompatible classifier checkpoint {path}: {error}".splitlines()[0]) from None
    model.class_names = payload["class_names"]
    model.metadata = payload["metadata"]
    return model.to(device).eval()

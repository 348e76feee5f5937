"""Benchmark the classifier training loop (`semantic_aug.stages.training.fit`), data loading included.

Builds a Custom-COCO-sized few-shot set on disk (default: 23 classes x 8 real JPEGs + 10 synthetic PNGs each, at
384x288, plus 2 validation images per class), then trains in two modes and prints training images/s:
  probe     the faithful default: frozen backbone, linear head (target >= 6000 img/s for ResNet-50 at 256² on an H100)
  finetune  --finetune-backbone (target >= 2500 img/s)
`steady` is the rate over the epochs after the first (which pays for cuDNN autotuning); `end to end` divides
every training image by the whole `fit` time, decoding into the cache and validation included. `model only`
runs the same model step on one fixed batch with no data path: the gap to `steady` is what loading costs.

Random weights (`pretrained=False`) keep it offline; speed does not depend on them.

From the checkout's root, with the package installed (`make setup`) or `PYTHONPATH=.` in front:
    python -m benchmarks.bench_classifier                     # the logged figures (about a minute on a GPU)
    python -m benchmarks.bench_classifier --device cpu --backbone efficientnet_lite0 --num-classes 3 \\
        --real-per-class 2 --num-synthetic 2 --image-size 64 --batch-size 8 --iterations-per-epoch 2   # smoke test
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from semantic_aug.core.classifiers import FewShotClassifier, list_backbones
from semantic_aug.datasets.few_shot_dataset import FolderFewShotDataset
from semantic_aug.stages.training import FitOptions, autocast, default_num_workers, fit, to_model_layout
from semantic_aug.stages.synthetic import SyntheticSet
from semantic_aug.core.utils import pick_device, run_cli

MODES = ("probe", "finetune")
NOISE_SIDE = 16  # random pixels per side, upsampled: smooth pictures that compress like photos, not like noise


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="training modes to time")
    parser.add_argument("--backbone", default="resnet50", choices=list_backbones(), help="classifier backbone")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: a GPU if present)")
    parser.add_argument("--num-classes", type=int, default=23, help="classes (Custom COCO: 23)")
    parser.add_argument("--real-per-class", type=int, default=8, help="real training images per class")
    parser.add_argument("--val-per-class", type=int, default=2, help="validation images per class")
    parser.add_argument("--num-synthetic", type=int, default=10, help="synthetic images per real image")
    parser.add_argument("--synthetic-probability", type=float, default=0.7, help="as train_classifier.py")
    parser.add_argument("--source-size", type=int, nargs=2, default=[384, 288], metavar=("WIDTH", "HEIGHT"),
                        help="size of the image files (the shipped Custom COCO's)")
    parser.add_argument("--image-size", type=int, default=256, help="training resolution")
    parser.add_argument("--batch-size", type=int, default=256, help="images per training batch")
    parser.add_argument("--iterations-per-epoch", type=int, default=40, help="batches per epoch")
    parser.add_argument("--num-epochs", type=int, default=3, help="epochs per mode (the first is warm-up)")
    parser.add_argument("--num-workers", type=int, default=default_num_workers(), help="image-decoding threads")
    parser.add_argument("--workdir", default=None,
                        help="folder for the generated images (kept and reused; default: a temporary folder)")
    return parser.parse_args()


def write_image(path: Path, seed: int, size: tuple[int, int]) -> None:
    """A smooth random picture (JPEG or PNG by extension); an existing file is kept (a reused --workdir)."""
    if path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (NOISE_SIDE, NOISE_SIDE, 3), dtype=np.uint8)
    Image.fromarray(pixels).resize(size, Image.BICUBIC).save(path)


def make_datasets(root: Path, args: argparse.Namespace):
    """The training split (with synthetic siblings) and the validation split of a generated Custom-COCO-sized set."""
    class_names = tuple(f"class_{i:02d}" for i in range(args.num_classes))
    real = [root / "train-val" / name / f"{i:03d}.jpg" for name in class_names
            for i in range(args.real_per_class + args.val_per_class)]
    size = tuple(args.source_size)
    with ThreadPoolExecutor(args.num_workers) as pool:
        list(pool.map(write_image, real, range(len(real)), [size] * len(real)))

    class BenchDataset(FolderFewShotDataset):
        train_pool_size = args.real_per_class

    BenchDataset.class_names = class_names
    train = BenchDataset(split="train", data_dir=root, image_size=args.image_size,
                         synthetic_probability=args.synthetic_probability)
    val = BenchDataset(split="val", data_dir=root, image_size=args.image_size)
    synthetic = {idx: [root / "synthetic" / path.parent.name / f"{path.stem}-{n:02d}.png"
                       for n in range(args.num_synthetic)] for idx, path in enumerate(train.image_paths)}
    paths = [path for siblings in synthetic.values() for path in siblings]
    with ThreadPoolExecutor(args.num_workers) as pool:
        list(pool.map(write_image, paths, range(len(real), len(real) + len(paths)), [size] * len(paths)))
    train.set_synthetic_images(SyntheticSet.from_siblings(synthetic))
    return train, val, len(paths)


def model_only_rate(model: FewShotClassifier, args: argparse.Namespace, device: torch.device) -> float:
    """Images/s of the bare model step (forward, and backward + Adam for trainable parameters) on one fixed batch."""
    images = to_model_layout(torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device))
    labels = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                 fused=device.type == "cuda")
    model.train()

    def step():
        with autocast(device):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):  # warm-up: cuDNN autotuning, allocator
        step()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(args.iterations_per_epoch):
        step()
    synchronize(device)
    return args.iterations_per_epoch * args.batch_size / (time.perf_counter() - started)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING)
    device = pick_device(args.device)
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(args.workdir or temporary)
        started = time.perf_counter()
        train, val, num_synthetic = make_datasets(root, args)
        print(f"data: {len(train)} real + {num_synthetic} synthetic training images, {len(val)} "
              f"validation, {args.source_size[0]}x{args.source_size[1]} files ({time.perf_counter() - started:.1f} s "
              f"to write and index)")
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(f"{args.backbone} at {args.image_size}², batch {args.batch_size}, {args.num_epochs} epochs x "
              f"{args.iterations_per_epoch} iterations on {name}\n")
        print(f"{'mode':<10}{'steady img/s':>14}{'end to end':>12}{'model only':>12}{'decode s':>10}{'val s':>8}")
        for mode in args.modes:
            torch.manual_seed(0)
            model = FewShotClassifier(args.backbone, args.num_classes, finetune_backbone=mode == "finetune",
                                      pretrained=False)
            started = time.perf_counter()
            options = FitOptions(num_epochs=args.num_epochs, iterations_per_epoch=args.iterations_per_epoch,
                                 batch_size=args.batch_size, num_workers=args.num_workers, progress=False)
            result = fit(model, train, val, options, device=device, generator=torch.Generator().manual_seed(0))
            total = time.perf_counter() - started
            timings = result.timings
            per_epoch = args.iterations_per_epoch * args.batch_size
            steady_epochs = timings["epoch_train_seconds"][1:] or timings["epoch_train_seconds"]
            steady = per_epoch * len(steady_epochs) / sum(steady_epochs)
            bare = model_only_rate(model, args, device)
            print(f"{mode:<10}{steady:>14.0f}{timings['train_images'] / total:>12.0f}{bare:>12.0f}"
                  f"{timings['decode_seconds']:>10.1f}{timings['val_seconds']:>8.1f}")
            del model, result
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    run_cli(main, parse_args)

"""Training DIAGen's filter (contribution c): the classifier behind `train_filter.py` and
`train_classifier.py --synthetic_filter train`.

The filter is a few-shot classifier on the real training images only (a frozen pretrained backbone under a linear
head, the shared training loop of `semantic_aug.stages.training`), then calibrated by temperature scaling on the
validation split and saved where `semantic_aug.stages.filtering.load_filter` finds it. What the filter does with
synthetic images lives in `semantic_aug.stages.filtering`.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from semantic_aug.core.classifiers import FewShotClassifier
from semantic_aug.core.layout import RunLayout
from semantic_aug.core.utils import atomic_write_csv, pick_device, restart_marker, set_seed
from semantic_aug.datasets import create_dataset
from semantic_aug.datasets.few_shot_dataset import TRAIN_SPLIT
from semantic_aug.stages.filtering import (FILTER_BACKBONE, TEMPERATURE_ITERATIONS, TEMPERATURE_LR, FilterModel,
                                           calibration_metrics, fit_temperature, predict_logits,
                                           save_filter)
from semantic_aug.stages.training import FitOptions, FitResult, fit

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FilterTrainingOptions:
    """The hyperparameters of `train_filter` (the reference's filter training), defaults as the reference's.

    Attributes:
        backbone: classifier backbone name (`efficientnet_lite0`, `resnet50`, `deit`, ...).
        iterations_per_epoch: batches per epoch.
        max_epochs: upper bound on epochs (early stopping usually ends sooner).
        batch_size: images per batch.
        lr: learning rate of the head.
        weight_decay: Adam's (coupled, L2) weight decay, as the reference.
        early_stopping_patience: stop after this many epochs without a lower validation loss (None: never).
        image_size: side of the square input images in pixels.
        use_randaugment: add RandAugment to the training transform (the reference did).
        temperature_lr: LBFGS learning rate of temperature scaling.
        temperature_iterations: LBFGS iterations of temperature scaling.
    """

    backbone: str = FILTER_BACKBONE
    iterations_per_epoch: int = 200
    max_epochs: int = 50
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 1e-2
    early_stopping_patience: int | None = 6
    image_size: int = 256
    use_randaugment: bool = True
    temperature_lr: float = TEMPERATURE_LR
    temperature_iterations: int = TEMPERATURE_ITERATIONS

    def fit_options(self, progress: bool) -> FitOptions:
        """The shared loop's options: best epoch by the mean per-class validation loss."""
        return FitOptions(num_epochs=self.max_epochs, iterations_per_epoch=self.iterations_per_epoch,
                          batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay, select_by="loss",
                          early_stopping_patience=self.early_stopping_patience,
                          use_randaugment=self.use_randaugment, progress=progress)


def _real_splits(dataset_name: str, seed: int, examples_per_class: int, options: FilterTrainingOptions,
                 data_dir: str | os.PathLike | None, bad_images: str, train_pool_size: int | None):
    """The few-shot training split (with RandAugment as `options` says) and the whole validation split."""
    train_dataset = create_dataset(dataset_name, split=TRAIN_SPLIT, examples_per_class=examples_per_class, seed=seed,
                                   data_dir=data_dir, image_size=options.image_size,
                                   use_randaugment=options.use_randaugment, bad_images=bad_images,
                                   train_pool_size=train_pool_size)
    val_dataset = create_dataset(dataset_name, split="val", seed=seed, data_dir=data_dir, image_size=options.image_size,
                                 bad_images=bad_images, train_pool_size=train_pool_size)
    return train_dataset, val_dataset


def _calibrate(classifier: FewShotClassifier, val_dataset, options: FilterTrainingOptions, result: FitResult,
               device: torch.device, progress: bool) -> tuple[float, dict]:
    """Temperature scaling on the validation logits of the best epoch.

    Returns:
        The log temperature and the calibration row (temperature, NLL and ECE before and after) without the run's
        dataset, seed and examples per class.
    """
    logits, labels = predict_logits(classifier, val_dataset, device, batch_size=max(options.batch_size, 64),
                                    progress=progress)
    log_temperature = fit_temperature(logits, labels, lr=options.temperature_lr,
                                      max_iter=options.temperature_iterations)
    before = calibration_metrics(logits, labels)
    after = calibration_metrics(logits, labels, math.exp(log_temperature))
    logger.info("filter calibrated: T = %.3f, NLL %.4f -> %.4f, ECE %.4f -> %.4f", math.exp(log_temperature),
                before["nll"], after["nll"], before["ece"], after["ece"])
    return log_temperature, {"backbone": options.backbone, "best_epoch": result.best_epoch,
                             "temperature": math.exp(log_temperature), "nll_before": before["nll"],
                             "nll_after": after["nll"], "ece_before": before["ece"], "ece_after": after["ece"]}


def train_filter(layout: RunLayout, options: FilterTrainingOptions | None = None, *,
                 data_dir: str | os.PathLike | None = None, logdir: str | os.PathLike = "logs", overwrite: bool = False,
                 bad_images: str = "error", device: str | torch.device | None = None,
                 train_pool_size: int | None = None, progress: bool = True) -> Path:
    """Train, calibrate and save the filter of one (dataset, seed, examples_per_class) run, as the reference did.

    Steps: the real few-shot training split only (RandAugment on), a frozen pretrained backbone plus a linear
    head trained with the shared loop (class-balanced sampling, Adam with L2 weight decay as the reference, early
    stopping on the mean per-class validation loss, best epoch kept as a copy); temperature scaling on the validation
    logits; NLL and ECE before and after calibration and the training curves logged to the CSVs of
    `RunLayout.filter_logs(logdir)`.

    Args:
        layout: the run (its dataset key, seed and examples per class; the filter goes to `layout.filter`).
        options: the training and calibration hyperparameters (None: `FilterTrainingOptions()`, the reference's).
        data_dir: the dataset's folder (None: its default / environment variable).
        logdir: folder of the CSV logs.
        overwrite: retrain even if the filter file exists (otherwise an existing filter is kept: resume).
        bad_images: `error` or `skip` for empty/corrupt image files (see `FewShotDataset`).
        device: `cpu`, `cuda`, `cuda:1`, a GPU index, or None for CUDA when present.
        train_pool_size: the split rule the classifier uses (`--train-pool-size`; None: the dataset's).
        progress: show progress bars.

    Returns:
        The path of the saved filter.
    """
    options = options or FilterTrainingOptions()
    fit_options = options.fit_options(progress)  # checks the loop's settings before any image is read
    dataset_name, seed, examples_per_class = layout.dataset, layout.seed, layout.examples_per_class
    path = layout.filter
    if path.is_file() and not overwrite:
        logger.info("filter %s exists; keeping it (pass overwrite / --overwrite to retrain)", path)
        return path
    logs = layout.filter_logs(logdir)
    with restart_marker(path, f"filter {layout.run_id}: training", logs):
        device = device if isinstance(device, torch.device) else pick_device(device)
        set_seed(seed)

        # 1. the real images: the few-shot training split (with RandAugment) and the whole validation split
        train_dataset, val_dataset = _real_splits(dataset_name, seed, examples_per_class, options, data_dir,
                                                  bad_images, train_pool_size)
        logger.info("filter %s seed %d epc %d: %d training / %d validation images, %s, up to %d epochs x %d batches "
                    "of %d", dataset_name, seed, examples_per_class, len(train_dataset), len(val_dataset),
                    options.backbone, options.max_epochs, options.iterations_per_epoch, options.batch_size)

        # 2. a linear head on the frozen backbone, best epoch by mean per-class validation loss (its weights loaded)
        classifier = FewShotClassifier(options.backbone, train_dataset.num_classes)
        result = fit(classifier, train_dataset, val_dataset, fit_options, device=device,
                     generator=torch.Generator().manual_seed(seed))

        # 3. temperature scaling on the validation logits of the best epoch
        log_temperature, calibration = _calibrate(classifier, val_dataset, options, result, device, progress)
        calibration = {"dataset": dataset_name, "seed": seed, "examples_per_class": examples_per_class, **calibration}

        # 4. logs and the filter, each written atomically
        atomic_write_csv(result.history, logs[0])
        atomic_write_csv(pd.DataFrame([calibration]), logs[1])
        save_filter(FilterModel(classifier.cpu(), log_temperature, train_dataset.class_names, options.image_size),
                    path, metadata=calibration)
        logger.info("saved filter to %s", path)
    return path

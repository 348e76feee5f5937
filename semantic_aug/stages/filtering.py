"""DIAGen's filter (contribution c): a calibrated classifier that weights synthetic images.

The filter is a few-shot classifier trained on the real training images only (frozen pretrained backbone,
linear head), calibrated by temperature scaling on the validation split. Each synthetic image gets a
`confidence`: the mean calibrated probability of its intended class over a few random training views. The
paper's `filter_weights` rule maps it to a weight (1 at or above `FILTER_CONFIDENCE_THRESHOLD`, a linear ramp
to 0 below), and the weights of the siblings of one real image become the probabilities of choosing which
sibling replaces that image (`FewShotDataset.set_synthetic_images`). The loss is untouched.

`apply_filter_mode` also offers two modes that go beyond the paper: `loss` (the weight multiplies the per-sample
loss, siblings chosen uniformly) and `threshold` (images below a confidence are dropped, the rest chosen
uniformly).

Fixes over the reference: the best epoch is a real copy (the reference kept the last), a temperature that is not
positive or does not lower the validation NLL falls back to T = 1, the calibration log is named per
dataset/seed/epc (the reference overwrote one file), and the scores are cached in the synthetic manifest so a rerun
does not rescore.
"""

from __future__ import annotations

import logging
import math
import os
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from semantic_aug.core.classifiers import FewShotClassifier
from semantic_aug.core.layout import RunLayout
from semantic_aug.datasets.few_shot_dataset import TRAIN_SPLIT, build_transform
from semantic_aug.core.utils import (UserError, atomic_torch_save, atomic_write_csv, atomic_write_text, load_image,
                                pick_device)

logger = logging.getLogger(__name__)

FILTER_BACKBONE = "resnet50"  # the reference's filter: a frozen ImageNet ResNet-50 under a linear head
FILTER_CONFIDENCE_THRESHOLD = 0.5  # paper: weight 1 at or above, confidence / 0.5 (= 2 × confidence) below
NUM_VIEWS = 5  # random training views averaged per synthetic image (paper)
TEMPERATURE_LR = 1e-2  # LBFGS learning rate of the reference's temperature scaling
TEMPERATURE_ITERATIONS = 500  # LBFGS iterations of the reference's temperature scaling
ECE_NUM_BINS = 15  # equal-width confidence bins of the expected calibration error (Guo et al., 2017)
FILTER_MODES = ("sampling", "loss", "threshold")
DEFAULT_FILTER_MODE = "sampling"  # the paper
FILTER_MODE_HELP = (
    "how the filter's weights are used: `sampling` (default, the paper) makes them the probabilities of choosing "
    "which synthetic sibling replaces a real image; `loss` (beyond the paper) multiplies each synthetic sample's "
    "loss by its weight and picks siblings uniformly; `threshold` (beyond the paper) drops synthetic images whose "
    "confidence is below --filter-threshold and picks the rest uniformly")
MANIFEST_SCORE_COLUMNS = ("confidence", "filter_weight", "filter_id")
FILTER_FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------------------
# the model and its file


class FilterModel(nn.Module):
    """A `FewShotClassifier` whose logits are divided by a learned temperature (the calibrated filter).

    The temperature is stored as its logarithm, so any real value the optimiser reaches is a valid temperature.

    Args:
        classifier: the trained classifier (frozen backbone + linear head).
        log_temperature: log of the temperature; 0 means uncalibrated.
        class_names: the names behind the output indices.
        image_size: side in pixels of the images it was trained on (synthetic images are scored at this size);
            None: the size of the dataset being scored.
        filter_id: a short identifier of the saved filter; written next to the scores it produced.
    """

    def __init__(self, classifier: FewShotClassifier, log_temperature: float = 0.0,
                 class_names: Sequence[str] = (), image_size: int | None = None, filter_id: str = ""):
        super().__init__()
        self.classifier = classifier
        self.register_buffer("log_temperature", torch.tensor(float(log_temperature)))
        self.class_names = list(class_names)
        self.image_size = image_size
        self.filter_id = filter_id

    @property
    def temperature(self) -> float:
        return float(self.log_temperature.exp())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Calibrated logits (N, num_classes) of images in [0, 1]."""
        return self.classifier(images) / self.log_temperature.exp()


def save_filter(filter_model: FilterModel, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write a filter atomically: backbone name, class names, the linear head and the temperature.

    The backbone is frozen and pretrained, so only its name is stored; `load_filter` rebuilds it.

    Args:
        filter_model: the calibrated filter.
        path: target file (`RunLayout.filter`).
        metadata: extra JSON-like facts to keep (dataset, seed, calibration metrics, ...).
    """
    classifier = filter_model.classifier
    atomic_torch_save({
        "format_version": FILTER_FORMAT_VERSION,
        "backbone": classifier.backbone_name,
        "class_names": list(filter_model.class_names),
        "num_classes": classifier.head.out_features,
        "image_size": filter_model.image_size,
        "head_state_dict": {k: v.detach().cpu() for k, v in classifier.head.state_dict().items()},
        "log_temperature": float(filter_model.log_temperature),
        "metadata": dict(metadata or {}),
    }, path)


def check_filter_file(path: str | os.PathLike) -> None:
    """A `UserError` naming the expected filter file and how to make it, when it does not exist."""
    if not Path(path).is_file():
        raise UserError(f"no trained filter at {path}: create it with `python train_filter.py` (same --dataset, "
                        f"--seed, --examples-per-class and --models-root) or pass --synthetic_filter train")


def load_filter(path: str | os.PathLike, device: str | torch.device | None = None) -> FilterModel:
    """Load a filter saved by `train_filter` / `save_filter`, in eval mode on `device`.

    Args:
        path: the filter file, usually `RunLayout(dataset, seed, examples_per_class, models_root=...).filter`.
        device: where to put it (default: CUDA when present, else CPU).

    Returns:
        The `FilterModel`.

    Raises:
        UserError: the file is missing (naming the expected path and how to create it) or unreadable.
    """
    path = Path(path)
    check_filter_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("format_version") != FILTER_FORMAT_VERSION:
            raise ValueError(f"format version {state.get('format_version')}, expected {FILTER_FORMAT_VERSION}")
        classifier = FewShotClassifier(state["backbone"], int(state["num_classes"]))
        classifier.head.load_state_dict(state["head_state_dict"])
        log_temperature = float(state["log_temperature"])
        class_names, image_size = state["class_names"], state["image_size"]
    except UserError:
        raise
    except Exception as error:  # pickle, zip and key errors all mean the same thing to the user
        raise UserError(f"cannot read filter file {path} ({type(error).__name__}: {error}); delete it and retrain "
                        f"with `python train_filter.py`") from None
    filter_id = f"{path.name}@{zlib.crc32(path.read_bytes()):08x}"
    device = device if isinstance(device, torch.device) else pick_device(device)
    return FilterModel(classifier, log_temperature, class_names, image_size, filter_id).to(device).eval()


# ----------------------------------------------------------------------------------------------------------
# calibration


@torch.no_grad()
def predict_logits(model: nn.Module, dataset, device: torch.device, batch_size: int = 64,
                   progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of every image of `dataset`, in order, with its own transform (one pass, no replacement).

    Args:
        model: maps image batches to logits.
        dataset: yields (image tensor, label).
        device: where the model lives.
        batch_size: images per forward pass.
        progress: show a tqdm bar.

    Returns:
        (logits (N, C) float32 on the CPU, labels (N,) int64).
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    model.eval()
    logits, labels = [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for images, targets in tqdm(loader, desc="validation logits", disable=not progress, leave=False):
        logits.append(model(images.to(device)).float().cpu())
        labels.append(torch.as_tensor(targets))
    return torch.cat(logits), torch.cat(labels).long()


def expected_calibration_error(probabilities: torch.Tensor, labels: torch.Tensor,
                               num_bins: int = ECE_NUM_BINS) -> float:
    """ECE: the sample-weighted mean gap between confidence and accuracy over equal-width confidence bins.

    Args:
        probabilities: (N, C) predicted class probabilities.
        labels: (N,) true classes.
        num_bins: bins over [0, 1] of the top-1 confidence.

    Returns:
        The ECE in [0, 1].
    """
    confidence, prediction = probabilities.max(dim=1)
    correct = (prediction == labels).float()
    bins = torch.clamp((confidence * num_bins).long(), max=num_bins - 1)  # confidence 1.0 goes in the last bin
    error = torch.zeros(())
    for b in range(num_bins):
        in_bin = bins == b
        if in_bin.any():
            error += in_bin.float().mean() * (confidence[in_bin].mean() - correct[in_bin].mean()).abs()
    return float(error)


def calibration_metrics(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> dict[str, float]:
    """NLL (mean cross-entropy) and ECE of `logits / temperature`.

    Returns:
        {"nll": ..., "ece": ...}.
    """
    scaled = logits.float() / temperature
    return {"nll": float(F.cross_entropy(scaled, labels)),
            "ece": expected_calibration_error(scaled.softmax(dim=1), labels)}


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, lr: float = TEMPERATURE_LR,
                    max_iter: int = TEMPERATURE_ITERATIONS) -> float:
    """Temperature scaling as the reference ran it: plain LBFGS (no line search) on T, from T = 1, minimising the
    NLL of `softmax(logits / T)` (Guo et al., 2017).

    The one addition is a guard: if LBFGS ends at a T that is not positive and finite, or that does not lower the
    NLL below that of T = 1, T = 1 is kept (the reference would have saved it).

    Args:
        logits: (N, C) uncalibrated validation logits.
        labels: (N,) true classes.
        lr: LBFGS learning rate.
        max_iter: LBFGS iterations.

    Returns:
        The log-temperature (0 = uncalibrated), the form the filter file stores.
    """
    logits, labels = logits.detach().float(), labels.detach().long()
    temperature = torch.ones(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([temperature], lr=lr, max_iter=max_iter)

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / temperature, labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    result = float(temperature.detach())
    with torch.no_grad():
        before = float(F.cross_entropy(logits, labels))
        after = float(F.cross_entropy(logits / result, labels)) if math.isfinite(result) and result > 0 else math.inf
    if not after <= before:
        logger.warning("temperature scaling ended at T = %s without lowering the validation NLL (%.4f -> %.4f); "
                       "keeping T = 1", result, before, after)
        return 0.0
    return math.log(result)


# ----------------------------------------------------------------------------------------------------------
# training


def train_filter(dataset_name: str, seed: int, examples_per_class: int, *, data_dir: str | os.PathLike | None = None,
                 backbone: str = FILTER_BACKBONE, models_root: str | os.PathLike = "models",
                 logdir: str | os.PathLike = "logs", iterations_per_epoch: int = 200, max_epochs: int = 50,
                 batch_size: int = 16, lr: float = 1e-4, weight_decay: float = 1e-2,
                 early_stopping_patience: int | None = 6, image_size: int = 256, use_randaugment: bool = True,
                 temperature_lr: float = TEMPERATURE_LR, temperature_iterations: int = TEMPERATURE_ITERATIONS,
                 overwrite: bool = False, bad_images: str = "error", device: str | torch.device | None = None,
                 train_pool_size: int | None = None,
                 progress: bool = True) -> Path:
    """Train, calibrate and save the filter of one (dataset, seed, examples_per_class) run, as the reference did.

    Steps: the real few-shot training split only (RandAugment on), a frozen pretrained backbone plus a linear
    head trained with the shared loop (class-balanced sampling, Adam with L2 weight decay as the reference, early
    stopping on the mean per-class validation loss, best epoch kept as a copy); temperature scaling on the validation logits;
    NLL and ECE before and after calibration and the training curves logged to the CSVs of
    `RunLayout.filter_logs(logdir)`.

    Args:
        dataset_name: registered dataset (`custom_coco`, `coco`, `focus`).
        seed: seeds the few-shot selection, the sampler and the initialisation.
        examples_per_class: real training images per class.
        data_dir: the dataset's folder (None: its default / environment variable).
        backbone: classifier backbone name (`efficientnet_lite0`, `resnet50`, `deit`, ...).
        models_root: folder of the saved filter (`RunLayout.filter`).
        logdir: folder of the CSV logs.
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
        overwrite: retrain even if the filter file exists (otherwise an existing filter is kept: resume).
        bad_images: `error` or `skip` for empty/corrupt image files (see `FewShotDataset`).
        train_pool_size: the split rule the classifier uses (`--train-pool-size`; None: the dataset's).
        device: `cpu`, `cuda`, `cuda:1`, a GPU index, or None for CUDA when present.
        progress: show progress bars.

    Returns:
        The path of the saved filter.
    """
    from semantic_aug.datasets import create_dataset
    from semantic_aug.stages.training import fit
    from semantic_aug.core.utils import restart_marker, set_seed

    layout = RunLayout(dataset_name, seed, examples_per_class, models_root=models_root)
    path = layout.filter
    if path.is_file() and not overwrite:
        logger.info("filter %s exists; keeping it (pass overwrite / --overwrite to retrain)", path)
        return path
    logs = layout.filter_logs(logdir)
    with restart_marker(path, f"filter {layout.run_id}: training", logs):
        device = device if isinstance(device, torch.device) else pick_device(device)
        set_seed(seed)

        # 1. the real images: the few-shot training split (with RandAugment) and the whole validation split
        train_dataset = create_dataset(dataset_name, split=TRAIN_SPLIT, examples_per_class=examples_per_class,
                                       seed=seed,
                                       data_dir=data_dir, image_size=image_size, use_randaugment=use_randaugment,
                                       bad_images=bad_images, train_pool_size=train_pool_size)
        val_dataset = create_dataset(dataset_name, split="val", seed=seed, data_dir=data_dir, image_size=image_size,
                                     bad_images=bad_images, train_pool_size=train_pool_size)
        logger.info("filter %s seed %d epc %d: %d training / %d validation images, %s, up to %d epochs x %d batches "
                    "of %d",
                    dataset_name, seed, examples_per_class, len(train_dataset), len(val_dataset), backbone, max_epochs,
                    iterations_per_epoch, batch_size)

        # 2. a linear head on the frozen backbone, best epoch by mean per-class validation loss
        classifier = FewShotClassifier(backbone, train_dataset.num_classes)
        result = fit(classifier, train_dataset, val_dataset, num_epochs=max_epochs,
                     iterations_per_epoch=iterations_per_epoch, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                     select_by="loss", early_stopping_patience=early_stopping_patience, device=device,
                     generator=torch.Generator().manual_seed(seed), use_randaugment=use_randaugment, progress=progress)  # returns with the best epoch's weights loaded

        # 3. temperature scaling on the validation logits of the best epoch
        logits, labels = predict_logits(classifier, val_dataset, device, batch_size=max(batch_size, 64),
                                        progress=progress)
        log_temperature = fit_temperature(logits, labels, lr=temperature_lr, max_iter=temperature_iterations)
        before = calibration_metrics(logits, labels)
        after = calibration_metrics(logits, labels, math.exp(log_temperature))
        calibration = {"dataset": dataset_name, "seed": seed, "examples_per_class": examples_per_class,
                       "backbone": backbone, "best_epoch": result.best_epoch, "temperature": math.exp(log_temperature),
                       "nll_before": before["nll"], "nll_after": after["nll"],
                       "ece_before": before["ece"], "ece_after": after["ece"]}
        logger.info("filter calibrated: T = %.3f, NLL %.4f -> %.4f, ECE %.4f -> %.4f", calibration["temperature"],
                    before["nll"], after["nll"], before["ece"], after["ece"])

        # 4. logs and the filter, each written atomically
        atomic_write_csv(result.history, logs[0])
        atomic_write_csv(pd.DataFrame([calibration]), logs[1])
        save_filter(FilterModel(classifier.cpu(), log_temperature, train_dataset.class_names, image_size), path,
                    metadata=calibration)
        logger.info("saved filter to %s", path)
    return path


# ----------------------------------------------------------------------------------------------------------
# weights of synthetic images


def filter_weights(confidences) -> np.ndarray:
    """The paper's weight rule: 1 if confidence >= `FILTER_CONFIDENCE_THRESHOLD` (0.5), else 2 × confidence.

    Below the threshold the weight is confidence / threshold, so it falls linearly from 1 to 0.

    Args:
        confidences: array-like of calibrated probabilities of the intended class, each in [0, 1].

    Returns:
        Float64 array of weights in [0, 1], same shape.
    """
    confidences = np.asarray(confidences, dtype=np.float64)
    if confidences.size and (np.isnan(confidences).any() or confidences.min() < 0 or confidences.max() > 1):
        raise ValueError("confidences must lie in [0, 1]")
    return np.where(confidences >= FILTER_CONFIDENCE_THRESHOLD, 1.0, confidences / FILTER_CONFIDENCE_THRESHOLD)


def normalise_sibling_weights(weights, groups) -> np.ndarray:
    """Normalise weights within each group (the synthetic siblings of one real image) to sum to 1.

    A group whose weights are all zero becomes uniform, so every group stays a valid probability distribution
    (the paper never drops an image outright).

    Args:
        weights: array-like of non-negative weights.
        groups: array-like of group keys (e.g. the real image index), one per weight.

    Returns:
        Float64 array of probabilities aligned with `weights`.
    """
    weights = np.asarray(weights, dtype=np.float64)
    groups = np.asarray(groups)
    if weights.shape != groups.shape:
        raise ValueError(f"{weights.size} weights for {groups.size} group keys")
    if weights.size and (np.isnan(weights).any() or weights.min() < 0):
        raise ValueError("weights must be non-negative numbers")
    probabilities = np.empty_like(weights)
    _, group_index = np.unique(groups, return_inverse=True)
    group_index = group_index.reshape(-1)
    totals = np.bincount(group_index, weights=weights)
    sizes = np.bincount(group_index)
    positive = totals[group_index] > 0
    probabilities[positive] = weights[positive] / totals[group_index][positive]
    probabilities[~positive] = 1.0 / sizes[group_index][~positive]
    return probabilities


def scoring_transform(dataset, image_size: int | None = None):
    """The random views used for scoring: the training transform of `dataset`, as the reference scored with it.

    Args:
        dataset: the classifier's training dataset (gives the crop style, whether RandAugment is on, and the image
            size unless `image_size` is given).
        image_size: output side in pixels (the filter's training size).

    Returns:
        A torchvision transform, PIL image -> [0, 1] tensor.
    """
    return build_transform(TRAIN_SPLIT, image_size or dataset.image_size, dataset.random_crop,
                           use_randaugment=getattr(dataset, "use_randaugment", False))


def _image_seed(seed: int, path: str | os.PathLike) -> int:
    """A per-image seed from the run seed and the file name, so an image's views do not depend on order or batch."""
    return (seed * 1_000_003 + zlib.crc32(Path(path).name.encode("utf-8"))) % (2**63)


@torch.no_grad()
def score_synthetic_images(filter_model: FilterModel, image_paths: Sequence[str | os.PathLike], labels: Sequence[int],
                           transform, num_views: int = NUM_VIEWS, seed: int = 0,
                           device: str | torch.device | None = None, batch_size: int = 64,
                           progress: bool = False) -> np.ndarray:
    """Each image's confidence: the mean calibrated probability of its intended class over `num_views` random views.

    The views of an image are seeded by (`seed`, its file name), so scores repeat whatever the order or batch size.

    Args:
        filter_model: the calibrated filter.
        image_paths: image files.
        labels: the intended class of each image.
        transform: random view transform, PIL -> [0, 1] tensor (`scoring_transform(dataset)`).
        num_views: random views averaged per image (paper: 5).
        seed: run seed.
        device: where to run the filter (default: where it is).
        batch_size: views per forward pass.
        progress: show a tqdm bar.

    Returns:
        Float64 array of confidences in [0, 1], one per image.
    """
    from tqdm.auto import tqdm

    if len(image_paths) != len(labels):
        raise ValueError(f"{len(image_paths)} images but {len(labels)} labels")
    if num_views < 1:
        raise ValueError(f"num_views must be at least 1, got {num_views}")
    if device is None:
        device = filter_model.log_temperature.device
    device = device if isinstance(device, torch.device) else pick_device(device)
    filter_model = filter_model.to(device).eval()
    confidences = np.zeros(len(image_paths), dtype=np.float64)
    pending_views, pending_owners = [], []

    def flush():
        probabilities = filter_model(torch.stack(pending_views).to(device)).float().softmax(dim=1).cpu().numpy()
        for row, owner in enumerate(pending_owners):
            confidences[owner] += probabilities[row, labels[owner]] / num_views
        pending_views.clear()
        pending_owners.clear()

    for owner, path in enumerate(tqdm(image_paths, desc="scoring synthetic images", disable=not progress)):
        image = load_image(path)
        with torch.random.fork_rng(devices=[]):  # torchvision's random transforms draw from the global generator
            torch.manual_seed(_image_seed(seed, path))
            for _ in range(num_views):
                pending_views.append(transform(image))
                pending_owners.append(owner)
        if len(pending_views) >= batch_size:
            flush()
    if pending_views:
        flush()
    return np.clip(confidences, 0.0, 1.0)  # float rounding of the mean can leave [0, 1] by an ulp


def _cached_scores(manifest: pd.DataFrame, manifest_path: str | os.PathLike | None) -> pd.DataFrame:
    """`manifest` with the score columns filled from the file at `manifest_path` where it has them (matched by path).

    The manifest file may hold scores that the in-memory manifest (e.g. freshly planned by the generator) lacks.
    """
    if manifest_path is None or not Path(manifest_path).is_file():
        return manifest
    try:
        saved = pd.read_csv(manifest_path, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read the synthetic manifest {manifest_path} ({error}); "
                        f"delete it to regenerate") from None
    if not {"path", *MANIFEST_SCORE_COLUMNS} <= set(saved.columns):
        return manifest
    saved = saved.assign(path=saved["path"].astype(str)).drop_duplicates("path").set_index("path")
    keys = manifest["path"].astype(str)
    known = keys.isin(saved.index).to_numpy() & manifest["confidence"].isna().to_numpy()
    for column in MANIFEST_SCORE_COLUMNS:
        manifest.loc[known, column] = saved.loc[keys[known], column].to_numpy()
    return manifest


def add_filter_weights(manifest: pd.DataFrame, filter_model: FilterModel, dataset, num_views: int = NUM_VIEWS,
                       seed: int = 0, device: str | torch.device | None = None, batch_size: int = 64,
                       manifest_path: str | os.PathLike | None = None, progress: bool = True) -> pd.DataFrame:
    """Score the synthetic images of a manifest and store `confidence`, `filter_weight` and `filter_id` in it.

    The manifest is the cache: rows already scored by the same filter (same `filter_id`), in `manifest` or in
    the file at `manifest_path`, are not rescored, so a rerun costs nothing; rows scored by another filter, or
    not at all, are (re)scored.

    Args:
        manifest: the synthetic manifest (columns include `path`, as stored by the generator, and `label`).
        filter_model: the calibrated filter (`load_filter`).
        dataset: the training dataset the images were generated from (gives the image size and crop style).
        num_views: random views per image (paper: 5).
        seed: run seed (seeds the views).
        device: where to run the filter.
        batch_size: views per forward pass.
        manifest_path: the manifest file (`{synthetic_dir}/manifest.csv`): scores found there are reused, and the
            updated manifest is written there atomically. None: nothing is read or written; the caller keeps it.
        progress: show a tqdm bar.

    Returns:
        A copy of `manifest` with the three score columns filled.
    """
    missing = {"path", "label"} - set(manifest.columns)
    if missing:
        raise UserError(f"synthetic manifest lacks column(s) {', '.join(sorted(missing))}; "
                        f"regenerate the synthetic images")
    manifest = manifest.copy()
    for column, empty in zip(MANIFEST_SCORE_COLUMNS, (np.nan, np.nan, "")):
        if column not in manifest.columns:
            manifest[column] = empty
    manifest["confidence"] = manifest["confidence"].astype(np.float64)
    manifest = _cached_scores(manifest, manifest_path)
    manifest["filter_id"] = manifest["filter_id"].fillna("").astype(str)
    todo = manifest["confidence"].isna().to_numpy() | (manifest["filter_id"] != filter_model.filter_id).to_numpy()
    if todo.any():
        rows = manifest.index[todo]
        logger.info("scoring %d synthetic images with the filter (%d already scored)", len(rows), int((~todo).sum()))
        confidences = score_synthetic_images(filter_model, manifest.loc[rows, "path"].astype(str).tolist(),
                                             manifest.loc[rows, "label"].astype(int).tolist(),
                                             scoring_transform(dataset, filter_model.image_size),
                                             num_views=num_views, seed=seed,
                                             device=device, batch_size=batch_size, progress=progress)
        manifest.loc[rows, "confidence"] = confidences
        manifest.loc[rows, "filter_id"] = filter_model.filter_id
    manifest["filter_weight"] = filter_weights(manifest["confidence"].to_numpy(dtype=np.float64))
    if manifest_path is not None:
        text = manifest.to_csv(index=False)
        if not Path(manifest_path).is_file() or Path(manifest_path).read_text() != text:
            atomic_write_text(manifest_path, text)
    return manifest


def apply_filter_mode(manifest: pd.DataFrame, mode: str = DEFAULT_FILTER_MODE,
                      threshold: float = FILTER_CONFIDENCE_THRESHOLD):
    """Turn a scored manifest into what the classifier's training data needs, for one `--filter-mode`.

    Modes:
        `sampling` (the paper): every synthetic image kept; sibling probabilities = normalised filter weights.
        `loss` (beyond the paper): every image kept, siblings uniform; each synthetic sample's loss × its weight.
        `threshold` (beyond the paper): images with confidence < `threshold` dropped; survivors uniform. A real
            image that loses all its siblings is always shown as itself.

    Args:
        manifest: synthetic manifest scored by `add_filter_weights` (columns real_idx, synthetic_idx, path,
            confidence, filter_weight).
        mode: one of `FILTER_MODES`.
        threshold: minimum confidence kept in `threshold` mode.

    Returns:
        (synthetic_images: real idx -> sibling paths ordered by synthetic_idx, for `set_synthetic_images`;
         sibling_weights: real idx -> probabilities aligned with those paths, or None for uniform;
         loss_weights: synthetic path (str) -> loss multiplier, for `fit(sample_loss_weights=...)`, or None for
         an unweighted loss).
    """
    from semantic_aug.stages.synthetic import synthetic_images_from_manifest

    if mode not in FILTER_MODES:
        raise UserError(f"unknown filter mode {mode!r}; choose one of {', '.join(FILTER_MODES)}")
    missing = {"real_idx", "synthetic_idx", "path", "confidence", "filter_weight"} - set(manifest.columns)
    if missing:
        raise UserError(f"synthetic manifest has not been scored by the filter (missing {', '.join(sorted(missing))})")
    if manifest["confidence"].isna().any():
        raise UserError("some synthetic images have no filter score; run add_filter_weights on the manifest first")
    if mode == "threshold":
        manifest = manifest[manifest["confidence"] >= threshold]
    synthetic_images = synthetic_images_from_manifest(manifest)
    if mode == "threshold":
        return synthetic_images, None, None
    weight_of = dict(zip(manifest["path"].astype(str), manifest["filter_weight"].astype(float)))
    if mode == "loss":
        return synthetic_images, None, weight_of
    real_idx = [idx for idx, paths in synthetic_images.items() for _ in paths]
    weights = [weight_of[path] for paths in synthetic_images.values() for path in paths]
    probabilities = normalise_sibling_weights(weights, real_idx)
    sibling_weights, start = {}, 0
    for idx, paths in synthetic_images.items():
        sibling_weights[idx] = probabilities[start: start + len(paths)]
        start += len(paths)
    return synthetic_images, sibling_weights, None

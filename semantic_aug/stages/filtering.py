"""DIAGen's filter (contribution c): a calibrated classifier that weights synthetic images.

The filter is a few-shot classifier trained on the real training images only (frozen pretrained backbone,
linear head), calibrated by temperature scaling on the validation split. Each synthetic image gets a
`confidence`: the mean calibrated probability of its intended class over a few random training views. The
paper's `filter_weights` rule maps it to a weight (1 at or above `FILTER_CONFIDENCE_THRESHOLD`, a linear ramp
to 0 below), and the weights of the siblings of one real image become the probabilities of choosing which
sibling replaces that image. The loss is untouched. This module returns these numbers (`filter_scores`,
`filter_mode_weights`); the synthetic set (`semantic_aug.stages.synthetic.SyntheticSet`) keeps them and hands them
to training. Training the filter itself is `semantic_aug.stages.filter_training.train_filter`.

`filter_mode_weights` also offers two modes that go beyond the paper: `loss` (the weight multiplies the per-sample
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
from semantic_aug.datasets.few_shot_dataset import TRAIN_SPLIT, build_transform
from semantic_aug.core.utils import UserError, atomic_torch_save, load_image, pick_device

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


def filter_scores(filter_model: FilterModel, manifest: pd.DataFrame, dataset, num_views: int = NUM_VIEWS,
                  seed: int = 0, device: str | torch.device | None = None, batch_size: int = 64,
                  progress: bool = True) -> pd.DataFrame:
    """Each synthetic image's `confidence`, `filter_weight` and `filter_id`, scoring only what is not yet scored.

    Rows of `manifest` that already hold a score of the same filter (same `filter_id`) keep it, so a rerun on a
    set whose manifest holds the scores (`SyntheticSet.with_filter_scores`) reads no image.

    Args:
        manifest: the synthetic manifest (`path`, `label`, and the score columns where a filter scored it).
        filter_model: the calibrated filter (`load_filter`).
        dataset: the training dataset the images were generated from (gives the image size and crop style).
        num_views: random views per image (paper: 5).
        seed: run seed (seeds the views).
        device: where to run the filter.
        batch_size: views per forward pass.
        progress: show a tqdm bar.

    Returns:
        A DataFrame with `SCORE_COLUMNS`, one row per manifest row, in its order.
    """
    missing = {"path", "label"} - set(manifest.columns)
    if missing:
        raise UserError(f"synthetic manifest lacks column(s) {', '.join(sorted(missing))}; "
                        f"regenerate the synthetic images")
    count = len(manifest)
    confidence = (pd.to_numeric(manifest["confidence"], errors="coerce").to_numpy(dtype=np.float64)
                  if "confidence" in manifest.columns else np.full(count, np.nan))
    filter_id = (manifest["filter_id"].fillna("").astype(str).to_numpy(dtype=object)
                 if "filter_id" in manifest.columns else np.full(count, "", dtype=object))
    todo = np.isnan(confidence) | (filter_id != filter_model.filter_id)
    if todo.any():
        rows = np.flatnonzero(todo)
        logger.info("scoring %d synthetic images with the filter (%d already scored)", len(rows), int((~todo).sum()))
        confidence[rows] = score_synthetic_images(filter_model, manifest["path"].astype(str).to_numpy()[rows].tolist(),
                                                  manifest["label"].astype(int).to_numpy()[rows].tolist(),
                                                  scoring_transform(dataset, filter_model.image_size),
                                                  num_views=num_views, seed=seed, device=device,
                                                  batch_size=batch_size, progress=progress)
        filter_id[rows] = filter_model.filter_id
    return pd.DataFrame({"confidence": confidence, "filter_weight": filter_weights(confidence),
                         "filter_id": filter_id})


def filter_mode_weights(scores: pd.DataFrame, real_idx, mode: str = DEFAULT_FILTER_MODE,
                        threshold: float = FILTER_CONFIDENCE_THRESHOLD) -> pd.DataFrame:
    """How training uses the filter's scores, for one `--filter-mode`, per image.

    Modes:
        `sampling` (the paper): every synthetic image kept; its probability among its siblings is its
            `filter_weight` normalised over them (`normalise_sibling_weights`).
        `loss` (beyond the paper): every image kept, siblings uniform; each synthetic sample's loss × its weight.
        `threshold` (beyond the paper): images with confidence < `threshold` dropped; survivors uniform. A real
            image that loses all its siblings is always shown as itself.

    Args:
        scores: `confidence` and `filter_weight` per image (`filter_scores`).
        real_idx: the real image each synthetic image was made from (its sibling group), aligned with `scores`.
        mode: one of `FILTER_MODES`.
        threshold: minimum confidence kept in `threshold` mode.

    Returns:
        A DataFrame aligned with `scores`: `kept` (bool), `probability` (NaN: uniform over the kept siblings) and
        `loss_weight` (1: an unweighted loss), what `SyntheticSet.with_filter_weights` takes.
    """
    if mode not in FILTER_MODES:
        raise UserError(f"unknown filter mode {mode!r}; choose one of {', '.join(FILTER_MODES)}")
    missing = {"confidence", "filter_weight"} - set(scores.columns)
    if missing:
        raise UserError(f"synthetic images have not been scored by the filter (missing {', '.join(sorted(missing))})")
    confidence = scores["confidence"].to_numpy(dtype=np.float64)
    if np.isnan(confidence).any():
        raise UserError("some synthetic images have no filter score; score them with filter_scores first")
    weights = scores["filter_weight"].to_numpy(dtype=np.float64)
    count = len(scores)
    kept = confidence >= threshold if mode == "threshold" else np.ones(count, dtype=bool)
    probability = (normalise_sibling_weights(weights, np.asarray(real_idx)) if mode == "sampling"
                   else np.full(count, np.nan))
    loss_weight = weights if mode == "loss" else np.ones(count)
    return pd.DataFrame({"kept": kept, "probability": probability, "loss_weight": loss_weight})

"""`FewShotDataset`: the base of every dataset, and `FolderFewShotDataset` for folder-per-class layouts.

A dataset is a list of real images with integer labels, selected few-shot for the `train` split. The base
class owns what every dataset shares: class counts, per-split transforms, and the DIAGen/DA-Fusion mixing of
real and synthetic images (`synthetic_probability`, optionally weighted by `filter_weights`), read from one
synthetic set (`semantic_aug.stages.synthetic.SyntheticSet`) through `set_synthetic_images`.

Images come out as float tensors in [0, 1]; each classifier backbone applies the normalisation its own
weights expect (the reference normalised to [-1, 1] for ImageNet weights, which is wrong).
"""

from __future__ import annotations

import abc
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torchvision.transforms as T
from torch.utils.data import Dataset

from semantic_aug.core.utils import IMAGE_EXTENSIONS, UserError, is_image_file, load_image

logger = logging.getLogger(__name__)

TRAIN_SPLIT = "train"
EVAL_SPLITS = ("val", "test", "test_uncommon_context")
DEFAULT_IMAGE_SIZE = 256
RANDOM_CROP_SCALE = (0.7, 1.0)  # RandomResizedCrop area range used by DIAGen for Custom COCO and FOCUS
RANDOM_ROTATION_DEGREES = 15
BAD_IMAGE_POLICIES = ("error", "skip")
TRAIN_POOL_SIZE = 8  # DIAGen's split rule: the first 8 shuffled train-val images of a class are its training pool
MIN_VAL_IMAGES = 1  # every class keeps at least this many validation images (model selection needs them)


@dataclass(frozen=True)
class Siblings:
    """The synthetic images made from one real image, as training draws them (`SyntheticSet.siblings`).

    Attributes:
        paths: the image files, in synthetic-index order.
        probabilities: the chance of drawing each (DIAGen's filter, normalised over the siblings); None: uniform.
        loss_weights: the multiplier of each image's loss (filter mode `loss`); None: 1 for every image.
    """

    paths: list[str]
    probabilities: np.ndarray | None = None
    loss_weights: np.ndarray | None = None


def add_bad_images_argument(parser) -> None:
    """The `--bad-images` flag every script that reads a dataset takes (see `FewShotDataset`'s `bad_images`)."""
    parser.add_argument("--bad-images", default="error", choices=BAD_IMAGE_POLICIES,
                        help="what to do with an empty or corrupt image file in the dataset: stop with an error "
                             "naming it (default) or skip it with a warning")


def build_transform(split: str, image_size: int = DEFAULT_IMAGE_SIZE, random_crop: bool = True,
                    use_randaugment: bool = False) -> T.Compose:
    """The per-split image transform of the reference, ending in a [0, 1] float tensor.

    Args:
        split: `train` gets random crop/flip/rotation (or RandAugment if asked); every other split a plain resize.
        image_size: output side length in pixels.
        random_crop: RandomResizedCrop(0.7-1.0) for training (Custom COCO, FOCUS); False gives a resize (COCO).
        use_randaugment: the reference's RandAugment chain for training, a resize then torchvision's RandAugment,
            in place of the crop, flip and rotation.
    """
    resize = T.Resize((image_size, image_size))
    if split != TRAIN_SPLIT:
        return T.Compose([resize, T.ToTensor()])
    if use_randaugment:
        return T.Compose([resize, T.RandAugment(), T.ToTensor()])
    steps = [T.RandomResizedCrop(image_size, scale=RANDOM_CROP_SCALE) if random_crop else resize,
             T.RandomHorizontalFlip(), T.RandomRotation(RANDOM_ROTATION_DEGREES)]
    return T.Compose(steps + [T.ToTensor()])


class FewShotDataset(Dataset, abc.ABC):
    """Abstract few-shot dataset, with the reference's interface.

    Subclasses set `class_names` and implement `__len__`, `get_image_by_idx`, `get_label_by_idx` and
    `get_metadata_by_idx`. For image folders, subclass `FolderFewShotDataset` instead, which needs only the
    class names.

    Args:
        split: one of `splits`.
        examples_per_class: real training images per class (train split only; None keeps all).
        seed: seeds the few-shot selection; the same seed gives the same images.
        image_size: side of the square tensors the transform produces.
        synthetic_probability: chance that `__getitem__` returns one of the synthetic siblings of a real image.
        use_randaugment: the reference's RandAugment chain (resize, RandAugment) as the training transform.
        transform: overrides the default per-split transform.
        bad_images: `error` stops at the first empty or corrupt image (naming it); `skip` leaves it out with a
            warning (datasets that check their files up front, such as `FolderFewShotDataset`).
        train_pool_size: images per class that form the training pool, the rest being validation (None: the
            dataset's own `train_pool_size`; `FolderFewShotDataset` uses it, COCO keeps its pool of 16).
    """

    class_names: Sequence[str] = ()
    splits: Sequence[str] = (TRAIN_SPLIT, "val", "test")
    random_crop: bool = True
    train_pool_size: int | None = None

    def __init__(self, split: str = TRAIN_SPLIT, examples_per_class: int | None = None, seed: int = 0,
                 image_size: int = DEFAULT_IMAGE_SIZE, synthetic_probability: float = 0.0,
                 use_randaugment: bool = False, transform=None, bad_images: str = "error",
                 train_pool_size: int | None = None):
        if split not in self.splits:
            raise UserError(f"unknown split {split!r} for {type(self).__name__}; known splits: {', '.join(self.splits)}")
        if examples_per_class is not None and examples_per_class < 1:
            raise UserError(f"examples_per_class must be at least 1, got {examples_per_class}")
        if not 0.0 <= synthetic_probability <= 1.0:
            raise UserError(f"synthetic_probability must lie in [0, 1], got {synthetic_probability}")
        if bad_images not in BAD_IMAGE_POLICIES:
            raise UserError(f"bad_images must be one of {', '.join(BAD_IMAGE_POLICIES)}, got {bad_images!r}")
        if train_pool_size is not None and train_pool_size < 1:
            raise UserError(f"--train-pool-size must be at least 1, got {train_pool_size}")
        if train_pool_size is not None:
            self.train_pool_size = train_pool_size
        self.bad_images = bad_images
        self.split = split
        self.examples_per_class = examples_per_class
        self.seed = seed
        self.image_size = image_size
        self.synthetic_probability = synthetic_probability
        self.use_randaugment = use_randaugment
        self.transform = transform or build_transform(split, image_size, self.random_crop, use_randaugment)
        self.synthetic_set = None
        self.synthetic_images: dict[int, Siblings] = {}

    # -- the abstract API of the reference's FewShotDataset ---------------------------------------------------

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def get_image_by_idx(self, idx: int):
        """The real image `idx` as an RGB PIL image."""

    @abc.abstractmethod
    def get_label_by_idx(self, idx: int) -> int:
        """The integer label of image `idx` (an index into `class_names`)."""

    @abc.abstractmethod
    def get_metadata_by_idx(self, idx: int) -> dict:
        """A dict with at least `name` (the class name); COCO adds `mask` for inpainting."""

    # -- shared behaviour ------------------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def labels(self) -> np.ndarray:
        return np.array([self.get_label_by_idx(idx) for idx in range(len(self))], dtype=np.int64)

    @property
    def class_counts(self) -> np.ndarray:
        """Images per class in this split, zeros included for absent classes."""
        return np.bincount(self.labels, minlength=self.num_classes)

    def set_synthetic_images(self, synthetic_set) -> None:
        """Attach a synthetic set: each real image `idx` gets the siblings `synthetic_set.siblings()[idx]`, with
        their draw probabilities (DIAGen's filter, contribution c) and loss weights.

        Args:
            synthetic_set: a `semantic_aug.stages.synthetic.SyntheticSet` (anything with its `siblings()`), or
                None to detach.
        """
        self.synthetic_set = synthetic_set
        self.synthetic_images = {}
        for idx, siblings in (synthetic_set.siblings() if synthetic_set is not None else {}).items():
            if siblings.probabilities is not None and len(siblings.probabilities) != len(siblings.paths):
                raise ValueError(f"image {idx}: {len(siblings.probabilities)} probabilities for "
                                 f"{len(siblings.paths)} synthetic images")
            if len(siblings.paths):
                self.synthetic_images[int(idx)] = siblings

    def choose_synthetic(self, idx: int, uniform: float) -> str | None:
        """The synthetic sibling of `idx` that a uniform draw `uniform` in [0, 1) selects, or None if it has none."""
        siblings = self.synthetic_images.get(idx)
        if siblings is None:
            return None
        paths, probabilities = siblings.paths, siblings.probabilities
        if probabilities is None:
            return paths[min(int(uniform * len(paths)), len(paths) - 1)]
        choice = int(np.searchsorted(np.cumsum(probabilities), uniform, side="right"))
        return paths[min(choice, len(paths) - 1)]

    def __getitem__(self, idx: int):
        image = None
        if self.synthetic_probability > 0 and idx in self.synthetic_images:
            draw = torch.rand(2)  # torch's RNG is seeded per DataLoader worker, numpy's is not
            if draw[0].item() < self.synthetic_probability:
                image = load_image(self.choose_synthetic(idx, draw[1].item()))
        if image is None:
            image = self.get_image_by_idx(idx)
        return self.transform(image), self.get_label_by_idx(idx)


class FolderFewShotDataset(FewShotDataset):
    """A dataset stored as `data_dir/{train-val,test,test_uncommon_context}/{class_name}/*` image files.

    Splits follow DIAGen: within `train-val`, each class's sorted file list is permuted by one
    `numpy.random.default_rng(seed)` (class by class, in `class_names` order); the first `train_pool_size`
    images form the training pool (train = the first `examples_per_class` of it) and the rest is `val`.
    `test` and `test_uncommon_context` use every image of their folder. A class with too few train-val images
    for that rule (`examples_per_class` for training and `MIN_VAL_IMAGES` for validation) is a `UserError`.

    Every file Pillow reads is an image, whatever the case of its extension (`IMAGE_EXTENSIONS` at least); hidden
    files and files that are not images (`Thumbs.db`, text) are skipped with one log line counting them.

    A subclass sets `class_names`, and optionally `data_dir_env` (environment variable naming the folder)
    and `default_data_dir`.

    Args:
        data_dir: folder holding the split folders; falls back to `$data_dir_env`, then `default_data_dir`.
        (the rest as `FewShotDataset`)
    """

    splits = (TRAIN_SPLIT, "val", "test", "test_uncommon_context")
    split_folders = {TRAIN_SPLIT: "train-val", "val": "train-val", "test": "test",
                     "test_uncommon_context": "test_uncommon_context"}
    train_pool_size = TRAIN_POOL_SIZE
    data_dir_env: str | None = None
    default_data_dir: str | os.PathLike | None = None

    def __init__(self, split: str = TRAIN_SPLIT, examples_per_class: int | None = None, seed: int = 0,
                 data_dir: str | os.PathLike | None = None, **kwargs):
        super().__init__(split=split, examples_per_class=examples_per_class, seed=seed, **kwargs)
        if split == TRAIN_SPLIT and examples_per_class is not None and examples_per_class > self.train_pool_size:
            raise UserError(f"examples_per_class={examples_per_class} is larger than the training pool of "
                            f"{self.train_pool_size} images per class of {type(self).__name__}")
        self.data_dir = self.resolve_data_dir(data_dir)
        self.image_paths, self.image_labels = self.select_images(split, seed, examples_per_class)
        self.check_images()

    @classmethod
    def resolve_data_dir(cls, data_dir: str | os.PathLike | None) -> Path:
        """`data_dir`, else `$data_dir_env`, else `default_data_dir`; a `UserError` if none exists."""
        source = "--data-dir"
        if data_dir is None and cls.data_dir_env and os.environ.get(cls.data_dir_env):
            data_dir, source = os.environ[cls.data_dir_env], f"${cls.data_dir_env}"
        if data_dir is None and cls.default_data_dir is not None:
            data_dir, source = cls.default_data_dir, "the default location"
        if data_dir is None:
            hint = f" or set ${cls.data_dir_env}" if cls.data_dir_env else ""
            raise UserError(f"{cls.__name__} needs its data folder: pass --data-dir{hint}")
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            raise UserError(f"dataset directory does not exist: {path} (from {source})")
        return path

    def list_class_images(self, folder: Path) -> list[list[Path]]:
        """Sorted image files per class in `folder`; a `UserError` for a missing, empty or unknown class folder."""
        if not folder.is_dir():
            raise UserError(f"split folder not found: {folder}")
        known = set(self.class_names)
        unknown = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in known)
        if unknown:
            raise UserError(f"unknown class folder(s) {', '.join(unknown)} in {folder}; "
                            f"{type(self).__name__} knows: {', '.join(self.class_names)}")
        per_class, skipped = [], 0
        for class_name in self.class_names:
            class_dir = folder / class_name
            entries = sorted(p for p in class_dir.iterdir() if p.is_file()) if class_dir.is_dir() else []
            files = [p for p in entries if is_image_file(p)]
            skipped += len(entries) - len(files)
            if not files:
                raise UserError(f"no images for class {class_name!r}: {class_dir} is missing or holds no readable "
                                f"image (read: {' '.join(IMAGE_EXTENSIONS)} in any case, and any other format "
                                f"Pillow opens)")
            per_class.append(files)
        if skipped:
            logger.info("%s: skipped %d file(s) that are not images (hidden files, Thumbs.db, text, ...)", folder,
                        skipped)
        return per_class

    def check_split_rule(self, examples_per_class: int | None) -> None:
        """The split rule's minimum, checked by every script before any work (`check_dataset_arguments`): each class
        of `train-val` fills `examples_per_class` training images (None: not checked) and keeps `MIN_VAL_IMAGES`
        after its training pool for validation; otherwise a one-line `UserError` naming the class, its image count
        and the fix. (A split built without this check may lack a class, which evaluation leaves out of its means.)"""
        pool = self.train_pool_size
        per_class = self.list_class_images(self.data_dir / self.split_folders["val"])
        for class_name, files in zip(self.class_names, per_class):
            count = len(files)
            folder = self.data_dir / self.split_folders["val"] / class_name
            if examples_per_class is not None and count < examples_per_class + MIN_VAL_IMAGES:
                raise UserError(f"examples_per_class={examples_per_class} but class {class_name!r} has only {count} "
                                f"images in {folder}; it needs {examples_per_class} for training and "
                                f"{MIN_VAL_IMAGES} for validation: add images or lower --examples-per-class")
            if count < pool + MIN_VAL_IMAGES:
                fit = count - MIN_VAL_IMAGES
                raise UserError(f"class {class_name!r} has {count} images in {folder}: the training pool takes the "
                                f"first {pool} (--train-pool-size) and leaves none for validation; add images (at "
                                f"least {pool + MIN_VAL_IMAGES}) or pass --train-pool-size {fit} or less (at least "
                                f"your largest --examples-per-class)")

    @classmethod
    def data_fingerprint(cls, data_dir: str | os.PathLike | None) -> str:
        """A SHA-256 of the training data: the sorted relative paths and byte sizes of the image files in
        `train-val/` (the images tokens, synthetic images and models are made from). Copies of the same files give
        the same fingerprint; an added, removed, renamed or resized image changes it."""
        root = cls.resolve_data_dir(data_dir) / cls.split_folders["val"]
        digest = hashlib.sha256()
        if root.is_dir():
            for path in sorted(p for p in root.rglob("*") if is_image_file(p)):
                digest.update(f"{path.relative_to(root).as_posix()}\t{path.stat().st_size}\n".encode())
        return digest.hexdigest()

    def select_images(self, split: str, seed: int, examples_per_class: int | None) -> tuple[list[Path], list[int]]:
        """The (paths, labels) of `split`, few-shot selected by `seed` for `train`."""
        per_class = self.list_class_images(self.data_dir / self.split_folders[split])
        paths, labels = [], []
        rng = np.random.default_rng(seed)
        for label, files in enumerate(per_class):
            if self.split_folders[split] == "train-val":
                files = [files[i] for i in rng.permutation(len(files))]
                if split == TRAIN_SPLIT:
                    files = files[: min(self.train_pool_size, len(files))]
                    if examples_per_class is not None:
                        if examples_per_class > len(files):
                            raise UserError(f"examples_per_class={examples_per_class} but class "
                                            f"{self.class_names[label]!r} has only {len(files)} training images")
                        files = files[:examples_per_class]
                else:
                    files = files[self.train_pool_size:]
            paths += files
            labels += [label] * len(files)
        return paths, labels

    def check_images(self) -> None:
        """Decode every selected image once: empty or corrupt files stop the run or are skipped (`bad_images`)."""
        keep = []
        for idx, path in enumerate(self.image_paths):
            try:
                load_image(path)
                keep.append(idx)
            except UserError as error:
                if self.bad_images == "error":
                    raise UserError(f"{error} (pass --bad-images skip to leave such files out)") from None
                logger.warning("skipping %s", error)
        self.image_paths = [self.image_paths[i] for i in keep]
        self.image_labels = [self.image_labels[i] for i in keep]

    def __len__(self) -> int:
        return len(self.image_paths)

    def get_image_by_idx(self, idx: int):
        return load_image(self.image_paths[idx])

    def get_label_by_idx(self, idx: int) -> int:
        return self.image_labels[idx]

    def get_metadata_by_idx(self, idx: int) -> dict:
        return {"name": self.class_names[self.image_labels[idx]], "path": str(self.image_paths[idx])}

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self.image_labels, dtype=np.int64)


def class_balanced_sampler(labels: Sequence[int], num_samples: int, generator: torch.Generator | None = None):
    """DIAGen's sampler: each image is drawn with probability proportional to 1 / (its class's count), with replacement.

    Args:
        labels: the label of every image of the split.
        num_samples: draws per epoch (batch_size × iterations_per_epoch).
        generator: seeds the draws.
    """
    from torch.utils.data import WeightedRandomSampler

    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels)
    weights = 1.0 / counts[labels]
    return WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double), num_samples=num_samples,
                                 replacement=True, generator=generator)

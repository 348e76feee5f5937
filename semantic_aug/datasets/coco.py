"""MS COCO 2017 as a few-shot classification dataset: the label of an image is the category of its largest object.

`data_dir` (CLI `--data-dir`, or `$COCO_DIR`) holds `train2017/`, `val2017/` and
`annotations/instances_{train,val}2017.json`. Images without annotations are skipped.

Splits (the reference had no test split):
    train: per class, a seeded permutation of the train2017 images labelled with it; the first `examples_per_class`.
    val:   the next `val_examples_per_class` images of the same permutation, disjoint from every train selection
           of that seed (model selection never sees test images).
    test:  every annotated val2017 image (the official held-out set).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from semantic_aug.datasets.registry import register_dataset
from semantic_aug.datasets.few_shot_dataset import FewShotDataset
from semantic_aug.core.utils import UserError, load_image

COCO_SPLIT_SOURCES = {"train": "train2017", "val": "train2017", "test": "val2017"}
TRAIN_POOL_SIZE = 16  # the largest examples_per_class of the paper's grid; val starts after it
VAL_EXAMPLES_PER_CLASS = 16


def largest_object_labels(coco) -> dict[int, tuple[int, int]]:
    """image id -> (category id, annotation id) of the annotation with the largest `area`; unannotated images are absent."""
    best: dict[int, tuple[float, int, int]] = {}
    for annotation in coco.dataset["annotations"]:
        image_id, area = annotation["image_id"], float(annotation["area"])
        if image_id not in best or area > best[image_id][0]:
            best[image_id] = (area, annotation["category_id"], annotation["id"])
    return {image_id: (category, annotation_id) for image_id, (_, category, annotation_id) in best.items()}


@register_dataset("coco")
class COCODataset(FewShotDataset):
    """MS COCO 2017, label = largest object (see the module docstring for the splits).

    Args:
        data_dir: folder with `train2017/`, `val2017/`, `annotations/`; falls back to `$COCO_DIR`.
        val_examples_per_class: images per class in the `val` split.
        (the rest as `FewShotDataset`)
    """

    splits = ("train", "val", "test")
    random_crop = False  # the reference used a plain resize for COCO
    data_dir_env = "COCO_DIR"

    def __init__(self, split: str = "train", examples_per_class: int | None = None, seed: int = 0,
                 data_dir: str | os.PathLike | None = None, val_examples_per_class: int = VAL_EXAMPLES_PER_CLASS,
                 **kwargs):
        super().__init__(split=split, examples_per_class=examples_per_class, seed=seed, **kwargs)
        from pycocotools.coco import COCO

        if data_dir is None:
            data_dir = os.environ.get(self.data_dir_env)
        if data_dir is None:
            raise UserError(f"COCO needs its data folder: pass --data-dir or set ${self.data_dir_env}")
        self.data_dir = Path(data_dir).expanduser()
        source = COCO_SPLIT_SOURCES[split]
        annotation_file = self.data_dir / "annotations" / f"instances_{source}.json"
        self.image_dir = self.data_dir / source
        for needed in (annotation_file, self.image_dir):
            if not needed.exists():
                raise UserError(f"COCO file or folder not found: {needed}")
        try:
            self.coco = COCO(str(annotation_file))
        except (ValueError, KeyError) as error:
            raise UserError(f"malformed COCO annotation file {annotation_file}: {error}") from None
        categories = sorted(self.coco.loadCats(self.coco.getCatIds()), key=lambda c: c["id"])
        self.class_names = [c["name"] for c in categories]
        label_of_category = {c["id"]: label for label, c in enumerate(categories)}

        largest = largest_object_labels(self.coco)
        per_class: list[list[int]] = [[] for _ in self.class_names]
        for image_id in sorted(largest):
            per_class[label_of_category[largest[image_id][0]]].append(image_id)

        self.image_ids, self.image_labels, self.annotation_ids = [], [], []
        rng = np.random.default_rng(seed)  # one generator, advanced class by class, as the reference
        for label, image_ids in enumerate(per_class):
            if split != "test":
                image_ids = [image_ids[i] for i in rng.permutation(len(image_ids))]
                if split == "train":
                    if examples_per_class is not None and examples_per_class > len(image_ids):
                        raise UserError(f"examples_per_class={examples_per_class} but COCO class "
                                        f"{self.class_names[label]!r} has only {len(image_ids)} images")
                    image_ids = image_ids[: examples_per_class if examples_per_class is not None else TRAIN_POOL_SIZE]
                else:
                    image_ids = image_ids[TRAIN_POOL_SIZE: TRAIN_POOL_SIZE + val_examples_per_class]
            self.image_ids += image_ids
            self.image_labels += [label] * len(image_ids)
            self.annotation_ids += [largest[i][1] for i in image_ids]

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, idx: int) -> Path:
        return self.image_dir / self.coco.loadImgs(self.image_ids[idx])[0]["file_name"]

    def get_image_by_idx(self, idx: int):
        return load_image(self.image_path(idx))

    def get_label_by_idx(self, idx: int) -> int:
        return self.image_labels[idx]

    def get_metadata_by_idx(self, idx: int) -> dict:
        """`name`, `path`, and `mask`: the largest object's binary mask (uint8, H×W), used for inpainting."""
        annotation = self.coco.loadAnns(self.annotation_ids[idx])[0]
        return {"name": self.class_names[self.image_labels[idx]], "path": str(self.image_path(idx)),
                "mask": self.coco.annToMask(annotation).astype(np.uint8)}

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self.image_labels, dtype=np.int64)

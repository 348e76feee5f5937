"""`folder`: any folder of class folders, with no code (`--dataset folder --data-dir DIR`).

    DIR/train-val/{class}/*             the few-shot pool and validation images (DIAGen's split rule)
    DIR/test/{class}/*                  optional, every image is evaluated
    DIR/test_uncommon_context/{class}/* optional, the paper's third split

The classes are the sorted names of the folders in `train-val/`; `test/` and `test_uncommon_context/` must hold the
same set. A class's token is its folder name with spaces as `_` (`big cat` -> `<big_cat>`), so two folders that give
one token are refused. Because every such dataset is called `folder`, the paths of its tokens, synthetic images and
models carry the data's fingerprint (`folder-1a2b3c4d`, see `registry.dataset_key`), and a second folder never
reuses the first one's files.
"""

from __future__ import annotations

import os

from semantic_aug.datasets.registry import register_dataset
from semantic_aug.core.embeddings import class_folder_name
from semantic_aug.datasets.few_shot_dataset import EVAL_SPLITS, TRAIN_SPLIT, FolderFewShotDataset
from semantic_aug.core.utils import UserError


@register_dataset("folder")
class FolderDataset(FolderFewShotDataset):
    """Classes read from `data_dir/train-val/` (see the module docstring); the rest as `FolderFewShotDataset`."""

    fingerprint_in_name = True

    def __init__(self, split: str = TRAIN_SPLIT, examples_per_class: int | None = None, seed: int = 0,
                 data_dir: str | os.PathLike | None = None, **kwargs):
        self.class_names = self.classes_in(data_dir)
        super().__init__(split=split, examples_per_class=examples_per_class, seed=seed, data_dir=data_dir, **kwargs)

    @classmethod
    def classes_in(cls, data_dir: str | os.PathLike | None) -> tuple[str, ...]:
        """The sorted class folder names of `data_dir/train-val`, checked against the test folders and for tokens
        they would share; a one-line `UserError` otherwise."""
        root = cls.resolve_data_dir(data_dir)
        train_val = root / cls.split_folders[TRAIN_SPLIT]
        if not train_val.is_dir():
            raise UserError(f"split folder not found: {train_val} (lay the images out as {train_val}/<class>/*)")
        names = tuple(sorted(p.name for p in train_val.iterdir() if p.is_dir() and not p.name.startswith(".")))
        if not names:
            raise UserError(f"no class folders in {train_val}; put each class's images in a folder named after it")
        tokens: dict[str, str] = {}
        for name in names:
            token = class_folder_name(name)
            if token in tokens:
                raise UserError(f"class folders {tokens[token]!r} and {name!r} in {train_val} both give the token "
                                f"<{token}>; rename one of them")
            tokens[token] = name
        for split in EVAL_SPLITS:
            folder = root / cls.split_folders[split]
            if split == "val" or not folder.is_dir():
                continue
            found = {p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")}
            missing, extra = sorted(set(names) - found), sorted(found - set(names))
            if missing or extra:
                parts = ([f"lacks {', '.join(missing)}"] if missing else []) + \
                        ([f"has {', '.join(extra)}, which train-val lacks"] if extra else [])
                raise UserError(f"{folder} must hold the class folders of {train_val}, but it {' and '.join(parts)}")
        return names

"""FOCUS (Kattakinda & Feizi, 2022): 10 classes photographed in common and uncommon settings.

Lay the images out with `python -m semantic_aug.datasets.focus_create_splits` (seeded), then pass the
output folder as `data_dir` (CLI `--data-dir`, or `$FOCUS_DIR`).
"""

from semantic_aug.datasets.registry import register_dataset
from semantic_aug.datasets.few_shot_dataset import FolderFewShotDataset

FOCUS_CLASSES = ("bird", "car", "cat", "deer", "dog", "frog", "horse", "plane", "ship", "truck")


@register_dataset("focus")
class FOCUS(FolderFewShotDataset):
    class_names = FOCUS_CLASSES
    data_dir_env = "FOCUS_DIR"

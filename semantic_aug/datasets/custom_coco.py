"""Custom COCO (DIAGen, GCPR 2024): handmade photos of 23 MS COCO classes.

A downscaled copy ships in `semantic_aug/datasets/custom_coco/{train-val,test}`; pass `data_dir` (CLI
`--data-dir`, or `$CUSTOM_COCO_DIR`) for the full-resolution images or the `test_uncommon_context` split.
"""

from pathlib import Path

from semantic_aug.datasets.registry import register_dataset
from semantic_aug.datasets.few_shot_dataset import FolderFewShotDataset

CUSTOM_COCO_CLASSES = (
    "bench", "bicycle", "book", "bottle", "bowl", "car", "cell_phone", "chair", "clock", "computer_mouse", "cup",
    "fork", "keyboard", "knife", "laptop", "motorcycle", "potted_plant", "spoon", "sports_ball", "tie",
    "traffic_light", "tv_remote", "wine_glass",
)


@register_dataset("custom_coco")
class CustomCOCO(FolderFewShotDataset):
    class_names = CUSTOM_COCO_CLASSES
    data_dir_env = "CUSTOM_COCO_DIR"
    default_data_dir = Path(__file__).parent / "custom_coco"

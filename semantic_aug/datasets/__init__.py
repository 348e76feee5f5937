"""Datasets. Importing this package registers every dataset in `DATASETS` (as timm's model modules do)."""

from semantic_aug.datasets.registry import (DATASETS, add_dataset_arguments, create_dataset, get_dataset_class,
                                            list_datasets, register_dataset)
from semantic_aug.datasets import coco, custom_coco, focus  # noqa: F401  (registration side effect)

__all__ = ["DATASETS", "add_dataset_arguments", "create_dataset", "get_dataset_class", "list_datasets", "register_dataset"]

"""Datasets. Importing this package registers every dataset in `DATASETS` (as timm's model modules do)."""

from semantic_aug.datasets.registry import (DATASETS, DatasetChoices, add_dataset_arguments,
                                            add_dataset_module_argument, check_dataset_arguments, create_dataset,
                                            data_fingerprint, dataset_key, get_dataset_class, list_datasets,
                                            load_dataset_plugins, register_dataset, split_dataset_key)
from semantic_aug.datasets import coco, custom_coco, focus, folder  # noqa: F401  (registration side effect)

__all__ = ["DATASETS", "DatasetChoices", "add_dataset_arguments", "add_dataset_module_argument",
           "check_dataset_arguments", "create_dataset", "data_fingerprint", "dataset_key", "get_dataset_class",
           "list_datasets", "load_dataset_plugins", "register_dataset", "split_dataset_key"]

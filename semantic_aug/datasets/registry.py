"""Dataset registry, in the style of timm's `register_model` / `create_model` / `list_models`."""

from __future__ import annotations

from typing import Callable

from semantic_aug.utils import UserError

DATASETS: dict[str, type] = {}


def register_dataset(name: str) -> Callable[[type], type]:
    """Class decorator: make a `FewShotDataset` subclass available as `--dataset name`."""

    def register(cls: type) -> type:
        DATASETS[name] = cls
        cls.dataset_name = name
        return cls

    return register


def list_datasets() -> list[str]:
    """Registered dataset names, sorted (feeds argparse `choices`)."""
    return sorted(DATASETS)


def get_dataset_class(name: str) -> type:
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; known datasets: {', '.join(list_datasets())}")
    return DATASETS[name]


def create_dataset(name: str, **kwargs):
    """Build dataset `name` with constructor keyword arguments (`split`, `examples_per_class`, `seed`, `data_dir`, ...)."""
    return get_dataset_class(name)(**kwargs)

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


def add_dataset_arguments(parser, default: str = "custom_coco", purpose: str = "dataset to use") -> None:
    """`--dataset`, `--data-dir` and `--bad-images`, as every script that reads images takes them.

    Args:
        parser: an argparse parser or argument group.
        default: the default `--dataset` (the reference's default differs between scripts).
        purpose: the start of `--dataset`'s help text.
    """
    from semantic_aug.few_shot_dataset import add_bad_images_argument

    parser.add_argument("--dataset", default=default, choices=list_datasets(), help=f"{purpose} (default: %(default)s)")
    parser.add_argument("--data-dir", default=None,
                        help="the dataset's folder (default: its shipped copy or its environment variable, e.g. "
                             "$FOCUS_DIR, $COCO_DIR)")
    add_bad_images_argument(parser)


def create_dataset(name: str, **kwargs):
    """Build dataset `name` with constructor keyword arguments (`split`, `examples_per_class`, `seed`, `data_dir`, ...)."""
    return get_dataset_class(name)(**kwargs)

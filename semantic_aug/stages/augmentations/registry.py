"""Registry of the `--aug` names, in the style of timm's `register_model` / `list_models`."""

from __future__ import annotations

from semantic_aug.core.utils import UserError

AUGMENTATIONS: dict[str, type] = {}


def register_augmentation(cls: type) -> type:
    """Class decorator: make a `GenerativeAugmentation` subclass available as `--aug {cls.name}`."""
    AUGMENTATIONS[cls.name] = cls
    return cls


def list_augmentations() -> list[str]:
    """Registered `--aug` names, sorted (feeds argparse `choices`)."""
    return sorted(AUGMENTATIONS)


def get_augmentation_class(name: str) -> type:
    """The class registered as `name`; a `UserError` listing the known names otherwise."""
    if name not in AUGMENTATIONS:
        raise UserError(f"unknown augmentation {name!r}; known: {', '.join(list_augmentations())}")
    return AUGMENTATIONS[name]

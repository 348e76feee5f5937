"""Generative augmentations. Importing this package registers every `--aug` name in `AUGMENTATIONS`
(`textual-inversion`, `real-guidance`), as timm's model modules do."""

from semantic_aug.stages.augmentations.registry import (AUGMENTATIONS, get_augmentation_class, list_augmentations,
                                                 register_augmentation)
from semantic_aug.stages.augmentations.generative_augmentation import (Choice, GenerativeAugmentation, PromptedAugmentation,
                                                                cycle_indices)
from semantic_aug.stages.augmentations.sampler import DiffusionSampler, GeneratedImages
from semantic_aug.stages.augmentations.compose import COMPOSE_MODES, COMPOSERS, ComposeParallel, ComposeSequential
from semantic_aug.stages.augmentations.real_guidance import RealGuidance
from semantic_aug.stages.augmentations.textual_inversion import TextualInversion, noisy_tokens

__all__ = ["AUGMENTATIONS", "COMPOSE_MODES", "COMPOSERS", "Choice", "ComposeParallel", "ComposeSequential",
           "DiffusionSampler", "GenerativeAugmentation", "GeneratedImages", "PromptedAugmentation", "RealGuidance",
           "TextualInversion", "cycle_indices", "get_augmentation_class", "list_augmentations", "noisy_tokens",
           "register_augmentation"]

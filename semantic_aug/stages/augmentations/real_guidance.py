"""`RealGuidance`: img2img whose prompt names the class in plain words (DA-Fusion's baseline)."""

from __future__ import annotations

from semantic_aug.stages.augmentations.generative_augmentation import PromptedAugmentation
from semantic_aug.stages.augmentations.registry import register_augmentation


@register_augmentation
class RealGuidance(PromptedAugmentation):
    """Img2img with the class name (underscores read as spaces: `cell_phone` -> `cell phone`) in the prompt.

    Args: as `PromptedAugmentation`.
    """

    name = "real-guidance"

    def class_tokens(self, class_name: str) -> list[str]:
        return [class_name.replace("_", " ")]


"""`TextualInversion`: img2img whose prompt names the class by its learned token (DA-Fusion), optionally cycling
through the token's noisy copies (DIAGen contribution a, `use_embedding_noise`)."""

from __future__ import annotations

import os
from typing import Iterable, Sequence

from semantic_aug.stages.augmentations.generative_augmentation import PromptedAugmentation
from semantic_aug.stages.augmentations.registry import register_augmentation
from semantic_aug.stages.augmentations.sampler import DiffusionSampler, file_sha256
from semantic_aug.core.embeddings import (load_tokens_into_pipeline, noisy_token_name, second_encoder_path,
                                          token_name)
from semantic_aug.core.utils import UserError


def noisy_tokens(tokens: Iterable[str], class_name: str, class_names: Sequence[str],
                 std_deviations: Sequence[float] | None = None) -> list[str]:
    """The noisy copies `<class_σ>` of a class's token present in `tokens`, by increasing σ.

    Names are matched exactly, never by substring (the reference took `<carrot_0.01>` for a noisy `car`): a
    token belongs to the class only if it is `noisy_token_name(class_name, σ)` for the σ it spells, and it is not
    itself the token of another class.

    Args:
        tokens: the token names of a token file.
        class_name: the class.
        class_names: all classes of the dataset (their own tokens are never noise).
        std_deviations: the σ to use; None takes every σ the file holds for this class.

    Returns:
        The noisy token names, smallest σ first.
    """
    tokens = list(tokens)
    if std_deviations is not None:
        return [noisy_token_name(class_name, std) for std in sorted(std_deviations)
                if noisy_token_name(class_name, std) in tokens]
    prefix = token_name(class_name)[:-1] + "_"
    class_tokens = {token_name(name) for name in class_names}
    found = []
    for token in tokens:
        if not token.startswith(prefix) or token in class_tokens:
            continue
        try:
            std = float(token[len(prefix):-1])
        except ValueError:
            continue
        if noisy_token_name(class_name, std) == token:
            found.append((std, token))
    return [token for _, token in sorted(found)]


@register_augmentation
class TextualInversion(PromptedAugmentation):
    """Img2img with the learned class token `<class_>` in the prompt (DA-Fusion's augmentation).

    Every token of the file is added to the text encoder. With `use_embedding_noise`, each class cycles through
    its original and noisy tokens (`[<c>, <c_0.005>, <c_0.01>, <c_0.025>]`), one per synthetic image.

    Args:
        sampler: the loaded diffusion model.
        class_names: the dataset's classes (each needs its token in the file).
        embed_path: the token file (`RunLayout.tokens()`, or with noise `RunLayout.tokens(noise=True)`; for SDXL
            also its second-encoder file `..._2.pt`).
        use_embedding_noise: cycle through the noisy tokens; the file must hold them for every class.
        std_deviations: the noise levels to use; None uses those the file holds.
        **kwargs: `PromptedAugmentation` options (prompt, strength, guidance_scale, mask, inverted, class_prompts).
    """

    name = "textual-inversion"

    def __init__(self, sampler: DiffusionSampler, class_names: Sequence[str], embed_path: str | os.PathLike,
                 use_embedding_noise: bool = False, std_deviations: Sequence[float] | None = None, **kwargs):
        tokens = load_tokens_into_pipeline(embed_path, sampler.tokenizer, sampler.text_encoder, sampler.tokenizer_2,
                                           sampler.text_encoder_2, class_names)
        self.embed_path, self.tokens_sha256 = str(embed_path), file_sha256(embed_path)
        if sampler.text_encoder_2 is not None:  # SDXL: the second encoder's vectors change the images too
            self.tokens_sha256 += "+" + file_sha256(second_encoder_path(embed_path))
        self.use_embedding_noise = bool(use_embedding_noise)
        self.tokens_per_class = {}
        for name in class_names:
            noisy = noisy_tokens(tokens, name, class_names, std_deviations) if use_embedding_noise else []
            if use_embedding_noise and not noisy:
                raise UserError(f"--use-embedding-noise 1, but token file {embed_path} has no noisy copies of "
                                f"{token_name(name)}; make them with aggregate_embeddings.py --augment-embeddings True")
            self.tokens_per_class[name] = [token_name(name)] + noisy
        super().__init__(sampler, class_names, **kwargs)

    def class_tokens(self, class_name: str) -> list[str]:
        return self.tokens_per_class[class_name]

    def settings(self) -> dict:
        return {**super().settings(), "tokens_sha256": self.tokens_sha256,
                "use_embedding_noise": self.use_embedding_noise}


"""The base of the generative augmentations (the reference's `GenerativeAugmentation`) and the prompted img2img
augmentation they share.

A generative augmentation turns a real image of a class into a synthetic one. It is split in two so that a
whole synthetic set can be planned before any image is made (which makes generation resumable, shardable over
processes, and independent of the batch size):

* `choose(class_name, counter, seed)` decides what the image is made with (augmentation, token, prompt) from the
  class, the image's running number within its class (`counter`) and its seed. It is a pure function.
* `generate(images, metadata, choices, seeds)` makes a batch of images from those decisions.

`forward(image, label, metadata)` keeps the reference's one-image interface on top of the two.
"""

from __future__ import annotations

import abc
import hashlib
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Mapping, Sequence

from semantic_aug.stages.augmentations.sampler import DiffusionSampler, GeneratedImages
from semantic_aug.core.embeddings import stable_seed
from semantic_aug.core.utils import UserError

DEFAULT_PROMPT = "a photo of a {name}"


@dataclass(frozen=True)
class Choice:
    """What one synthetic image is made with.

    Attributes:
        augmentation: the registry name of the augmentation (or `a+b` for a composed chain).
        token: the class token or class name written into the prompt.
        prompt: the full prompt.
        steps: for composed augmentations, the (member index, member choice) pairs applied in order.
    """

    augmentation: str
    token: str
    prompt: str
    steps: tuple = ()


def cycle_indices(counter: int, num_tokens: int, num_prompts: int) -> tuple[int, int]:
    """DIAGen's per-class cycling over noisy tokens (a) and LLM prompts (b), with decorrelated counters.

    The token advances every image (`counter mod num_tokens`). The reference drew the prompt from the same
    counter, so with 10 prompts and 4 noise levels only 20 of the 40 (prompt, noise) pairs could ever occur.
    Here the prompt counter is the image counter plus one for every `lcm(num_tokens, num_prompts)` images already
    made (taken modulo `gcd(num_tokens, num_prompts)`), so every `num_tokens * num_prompts` consecutive images of
    a class use each pair exactly once. With one token or coprime sizes it is the reference's `counter mod P`.

    Args:
        counter: the image's running number among the synthetic images of its class (0, 1, ...).
        num_tokens: how many tokens the class cycles through (1 without embedding noise).
        num_prompts: how many prompts the class cycles through (1 without generated prompts).

    Returns:
        (token index, prompt index).
    """
    period = math.lcm(num_tokens, num_prompts)
    offset = (counter // period) % math.gcd(num_tokens, num_prompts)
    return counter % num_tokens, (counter + offset) % num_prompts


def check_strength_and_guidance(strength: float | None, guidance_scale: float | None) -> None:
    """A one-line `UserError` naming the flag unless strength is in (0, 1] and guidance_scale >= 1.

    The reference crashed deep inside diffusers when `--strength`/`--guidance-scale` were left at None.
    """
    if strength is None:
        raise UserError("--strength is required to generate synthetic images (the paper uses 0.7)")
    if guidance_scale is None:
        raise UserError("--guidance-scale is required to generate synthetic images (the paper uses 15)")
    if not 0.0 < float(strength) <= 1.0:
        raise UserError(f"--strength must lie in (0, 1], got {strength}")
    if float(guidance_scale) < 1.0:
        raise UserError(f"--guidance-scale must be at least 1, got {guidance_scale}")


def settings_digest(value: object) -> str:
    """A sha256 of a JSON-able value (sorted keys), for fingerprints of prompt lists and settings."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode("utf-8")).hexdigest()


class GenerativeAugmentation(abc.ABC):
    """A generative augmentation: `choose` plans an image, `generate` makes a batch (see the module docstring)."""

    name = ""  # the `--aug` name it is registered under

    def __init__(self):
        self._forward_counters: dict[str, int] = defaultdict(int)

    @abc.abstractmethod
    def choose(self, class_name: str, counter: int, seed: int) -> Choice:
        """What the `counter`-th synthetic image of `class_name` (with seed `seed`) is made with."""

    @abc.abstractmethod
    def generate(self, images: Sequence, metadata: Sequence[dict], choices: Sequence[Choice],
                 seeds: Sequence[int]) -> GeneratedImages:
        """Make one synthetic image per real image.

        Args:
            images: RGB PIL images (siblings of one real image may be the same object).
            metadata: per image, the dataset's `get_metadata_by_idx` dict (`name`, COCO's `mask`).
            choices: per image, its `choose` result.
            seeds: per image, its seed.

        Returns:
            The synthetic images, each the size of its real image.
        """

    @abc.abstractmethod
    def settings(self) -> dict:
        """Everything that changes the images (JSON-able), for the synthetic cache's fingerprint."""

    @abc.abstractmethod
    def set_prompt(self, prompt: str) -> None:
        """Replace the prompt template (`{name}` is filled with the class token or name)."""

    def forward(self, image, label: int, metadata: dict):
        """The reference's one-image interface: a synthetic version of `image`, with its label unchanged.

        Each class keeps its own counter across calls, as the reference did; the seed follows from the class and
        the counter, so a fresh augmentation repeats the same sequence.

        Returns:
            (PIL image the size of `image`, `label`).
        """
        class_name = metadata["name"]
        counter = self._forward_counters[class_name]
        self._forward_counters[class_name] += 1
        seed = stable_seed("forward", class_name, counter)
        generated = self.generate([image], [metadata], [self.choose(class_name, counter, seed)], [seed])
        return generated.pil(0), label

    __call__ = forward


class PromptedAugmentation(GenerativeAugmentation):
    """Img2img (or inpainting) from a real image with a prompt naming its class: the common part of
    `TextualInversion` and `RealGuidance`, which differ only in how they name the class (`class_tokens`).

    Args:
        sampler: the loaded diffusion model (shared by every augmentation of a run).
        class_names: the dataset's classes.
        prompt: template with a `{name}` placeholder.
        strength: img2img strength in (0, 1]: the fraction of the noise schedule that is run.
        guidance_scale: classifier-free guidance weight, >= 1.
        mask: inpaint the dataset's object mask (COCO) instead of changing the whole image.
        inverted: with `mask`, repaint the background instead of the object.
        class_prompts: DIAGen (b): class name -> prompts with `{name}`, cycled per class instead of `prompt`.
    """

    def __init__(self, sampler: DiffusionSampler, class_names: Sequence[str], prompt: str = DEFAULT_PROMPT,
                 strength: float = 0.5, guidance_scale: float = 7.5, mask: bool = False, inverted: bool = False,
                 class_prompts: Mapping[str, Sequence[str]] | None = None):
        super().__init__()
        check_strength_and_guidance(strength, guidance_scale)
        if inverted and not mask:
            raise UserError("--inverted 1 needs --mask 1 for the same augmentation")
        self.sampler = sampler
        self.class_names = list(class_names)
        self.strength, self.guidance_scale = float(strength), float(guidance_scale)
        self.mask, self.inverted = bool(mask), bool(inverted)
        self.class_prompts = {name: list(prompts) for name, prompts in class_prompts.items()} if class_prompts else None
        if self.class_prompts is not None:
            missing = [name for name in self.class_names if not self.class_prompts.get(name)]
            if missing:
                raise UserError(f"no generated prompts for class(es) {', '.join(missing)}")
        self.set_prompt(prompt)

    @abc.abstractmethod
    def class_tokens(self, class_name: str) -> list[str]:
        """The words that name `class_name` in prompts, cycled per image (several with embedding noise)."""

    def set_prompt(self, prompt: str) -> None:
        try:
            prompt.format(name="x")
        except (KeyError, IndexError, ValueError):
            raise UserError(f"--prompt {prompt!r} may contain only the placeholder {{name}} in braces") from None
        self.prompt = prompt

    def choose(self, class_name: str, counter: int, seed: int) -> Choice:
        tokens = self.class_tokens(class_name)
        prompts = self.class_prompts[class_name] if self.class_prompts is not None else [self.prompt]
        token_index, prompt_index = cycle_indices(counter, len(tokens), len(prompts))
        token = tokens[token_index]
        return Choice(self.name, token, prompts[prompt_index].format(name=token))

    def generate(self, images, metadata, choices, seeds) -> GeneratedImages:
        masks = None
        if self.mask:
            masks = [entry.get("mask") for entry in metadata]
            if any(mask is None for mask in masks):
                raise UserError(f"--mask 1 needs object masks, but the dataset gives none for class "
                                f"{metadata[masks.index(None)]['name']!r} (only coco has masks)")
        return self.sampler.img2img(images, [choice.prompt for choice in choices], seeds, self.strength,
                                    self.guidance_scale, masks=masks, invert_mask=self.inverted)

    def settings(self) -> dict:
        return {"augmentation": self.name, "prompt": self.prompt, "strength": self.strength,
                "guidance_scale": self.guidance_scale, "mask": self.mask, "inverted": self.inverted,
                "class_prompts_sha256": settings_digest(self.class_prompts) if self.class_prompts is not None else None,
                "class_tokens": {name: self.class_tokens(name) for name in self.class_names},
                "sampler": self.sampler.settings()}

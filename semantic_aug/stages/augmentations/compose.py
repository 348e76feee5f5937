"""Several augmentations at once, as the reference composed them: `ComposeParallel` makes each image with one of
them, drawn with `probs`; `ComposeSequential` applies each in turn with its own probability. Draws come from the
image's seed, so a composed synthetic set is planned, resumed and sharded like a single augmentation's."""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np

from semantic_aug.stages.augmentations.generative_augmentation import Choice, GenerativeAugmentation
from semantic_aug.stages.augmentations.sampler import GeneratedImages
from semantic_aug.core.embeddings import stable_seed
from semantic_aug.core.utils import UserError

COMPOSE_MODES = ("parallel", "sequential")
CHAIN_SEPARATOR = " | "  # joins the tokens and prompts of a sequential chain in the manifest


class _Compose(GenerativeAugmentation):
    def __init__(self, augmentations: Sequence[GenerativeAugmentation], probs: Sequence[float] | None, default: float):
        super().__init__()
        if not augmentations:
            raise UserError("composing needs at least one augmentation")
        probs = [default] * len(augmentations) if probs is None else [float(p) for p in probs]
        if len(probs) != len(augmentations):
            raise UserError(f"--probs has {len(probs)} values for {len(augmentations)} augmentations; "
                            f"give one per --aug")
        if any(p < 0 or p > 1 for p in probs):
            raise UserError(f"--probs must lie in [0, 1], got {probs}")
        self.augmentations, self.probs = list(augmentations), probs

    def set_prompt(self, prompt: str) -> None:
        for augmentation in self.augmentations:
            augmentation.set_prompt(prompt)

    def settings(self) -> dict:
        return {"compose": self.mode, "probs": self.probs, "members": [a.settings() for a in self.augmentations]}


class ComposeParallel(_Compose):
    """Each image is made by one member augmentation, drawn with probabilities `probs` (uniform by default).

    Args:
        augmentations: the members.
        probs: one weight per member in [0, 1] (normalised to sum to 1).
    """

    mode = "parallel"

    def __init__(self, augmentations: Sequence[GenerativeAugmentation], probs: Sequence[float] | None = None):
        super().__init__(augmentations, probs, default=1.0 / max(len(augmentations), 1))
        total = sum(self.probs)
        if total <= 0:
            raise UserError("--probs must not all be 0 with --compose parallel")
        self.weights = np.asarray(self.probs) / total

    def choose(self, class_name: str, counter: int, seed: int) -> Choice:
        draw = np.random.default_rng(stable_seed("compose", seed))
        member = int(draw.choice(len(self.augmentations), p=self.weights))
        choice = self.augmentations[member].choose(class_name, counter, seed)
        return Choice(choice.augmentation, choice.token, choice.prompt, steps=((member, choice),))

    def generate(self, images, metadata, choices, seeds) -> GeneratedImages:
        groups = defaultdict(list)
        for position, choice in enumerate(choices):
            groups[choice.steps[0][0]].append(position)
        parts = []
        for member, positions in sorted(groups.items()):
            parts.append((positions, self.augmentations[member].generate(
                [images[p] for p in positions], [metadata[p] for p in positions],
                [choices[p].steps[0][1] for p in positions], [seeds[p] for p in positions])))
        return GeneratedImages.gather(parts, len(images))


class ComposeSequential(_Compose):
    """Each member is applied in turn, with probability `probs[i]` (1 by default); an image none was applied to
    is a copy of the real image.

    Args:
        augmentations: the members, in application order.
        probs: one probability per member in [0, 1].
    """

    mode = "sequential"

    def __init__(self, augmentations: Sequence[GenerativeAugmentation], probs: Sequence[float] | None = None):
        super().__init__(augmentations, probs, default=1.0)

    def choose(self, class_name: str, counter: int, seed: int) -> Choice:
        draws = np.random.default_rng(stable_seed("compose", seed)).random(len(self.augmentations))
        steps = tuple((i, self.augmentations[i].choose(class_name, counter, seed))
                      for i, p in enumerate(self.probs) if draws[i] < p)
        return Choice("+".join(c.augmentation for _, c in steps) or "none",
                      CHAIN_SEPARATOR.join(c.token for _, c in steps), CHAIN_SEPARATOR.join(c.prompt for _, c in steps),
                      steps=steps)

    def generate(self, images, metadata, choices, seeds) -> GeneratedImages:
        current = list(images)
        for stage in range(max((len(choice.steps) for choice in choices), default=0)):
            groups = defaultdict(list)
            for position, choice in enumerate(choices):
                if stage < len(choice.steps):
                    groups[choice.steps[stage][0]].append(position)
            for member, positions in sorted(groups.items()):
                # the first stage uses the image's own seed, so a one-member chain equals the member alone
                stage_seeds = [seeds[p] if stage == 0 else stable_seed(seeds[p], stage) for p in positions]
                generated = self.augmentations[member].generate(
                    [current[p] for p in positions], [metadata[p] for p in positions],
                    [choices[p].steps[stage][1] for p in positions], stage_seeds)
                for k, position in enumerate(positions):
                    current[position] = generated.pil(k)
        return GeneratedImages(current)


COMPOSERS = {"parallel": ComposeParallel, "sequential": ComposeSequential}

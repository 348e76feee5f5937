"""SDXL's text conditioning for the sampler, computed as diffusers' `StableDiffusionXLImg2ImgPipeline` computes it.

An SDXL UNet reads three things from the prompt and the image size (SDXL paper, sections 2.1-2.2):

1. `encoder_hidden_states`: the penultimate hidden states of both text encoders, concatenated along the width
   (CLIP ViT-L 768 + OpenCLIP bigG 1280 = 2048 for SDXL base);
2. `text_embeds`: the pooled, projected output of the second encoder;
3. `time_ids`: the size/crop micro-conditioning, (original height, width, crop top, left, target height, width)
   = (side, side, 0, 0, side, side) for a generated square of `side` pixels; a model whose pipeline config sets
   `requires_aesthetics_score` (the refiner) takes (side, side, 0, 0, aesthetic score) instead, 6.0 for the prompt
   and 2.5 for the unconditional half, the pipeline's defaults.

The unconditional half of classifier-free guidance is the empty prompt, or zeros where the pipeline's config
sets `force_zeros_for_empty_prompt` (SDXL base does).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from semantic_aug.core.embeddings import expand_vector_tokens
from semantic_aug.core.model_family import SDXL_CROP_TOP_LEFT, sdxl_time_ids

AESTHETIC_SCORE = 6.0  # the img2img pipeline's default aesthetic score for the prompt (refiner-style models only)
NEGATIVE_AESTHETIC_SCORE = 2.5  # and for the unconditional half


class SDXLConditioning:
    """The UNet inputs of SDXL for a batch of prompts, unconditional rows first (see the module docstring).

    Args:
        pipe: a diffusers SDXL pipeline (its tokenizers, text encoders and config are used).
        resolution: the side of the generated images in pixels.
        dtype: the dtype of the UNet's weights (the size/crop ids are made in it, as the pipeline does).
    """

    def __init__(self, pipe, resolution: int, dtype: torch.dtype):
        self.tokenizers = (pipe.tokenizer, pipe.tokenizer_2)
        self.text_encoders = (pipe.text_encoder, pipe.text_encoder_2)
        self.zeros_for_empty_prompt = bool(pipe.config.get("force_zeros_for_empty_prompt", False))
        size = (resolution, resolution)
        if pipe.config.get("requires_aesthetics_score", False):
            conditional = size + SDXL_CROP_TOP_LEFT + (AESTHETIC_SCORE,)
            unconditional = size + SDXL_CROP_TOP_LEFT + (NEGATIVE_AESTHETIC_SCORE,)
        else:
            conditional = unconditional = sdxl_time_ids(resolution)
        self.time_ids = (torch.tensor([unconditional], dtype=dtype), torch.tensor([conditional], dtype=dtype))
        self._unconditional = None

    def encode(self, prompts: Sequence[str], to_device: Callable) -> tuple[torch.Tensor, torch.Tensor]:
        """(states [N, 77, width_1 + width_2], pooled [N, projection]) of `prompts`; each distinct prompt once."""
        unique = list(dict.fromkeys(prompts))
        states = []
        for tokenizer, text_encoder in zip(self.tokenizers, self.text_encoders):
            expanded = [expand_vector_tokens(prompt, tokenizer) for prompt in unique]  # multi-vector tokens
            ids = tokenizer(expanded, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            output = text_encoder(to_device(ids), output_hidden_states=True)
            states.append(output.hidden_states[-2])
            pooled = output[0]  # the last encoder's pooled projection (`text_embeds`)
        position = to_device(torch.tensor([unique.index(prompt) for prompt in prompts]))
        return torch.cat(states, dim=-1)[position], pooled[position]

    def __call__(self, prompts: Sequence[str], to_device: Callable) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """The UNet's inputs for guidance-paired rows: text states, and (pooled embedding, size/crop ids).

        Args:
            prompts: one prompt per image.
            to_device: moves a CPU tensor to the models' device.

        Returns:
            (states [2N, 77, width], (text_embeds [2N, projection], time_ids [2N, 6 or 5])), unconditional rows first.
        """
        count = len(prompts)
        if self._unconditional is None:
            states, pooled = self.encode([""], to_device)
            if self.zeros_for_empty_prompt:
                states, pooled = torch.zeros_like(states), torch.zeros_like(pooled)
            self._unconditional = states, pooled
        states, pooled = self.encode(prompts, to_device)
        empty_states, empty_pooled = self._unconditional
        time_ids = torch.cat([self.time_ids[0].expand(count, -1), self.time_ids[1].expand(count, -1)])
        return (torch.cat([empty_states.expand(count, -1, -1), states]),
                (torch.cat([empty_pooled.expand(count, -1), pooled]), to_device(time_ids)))

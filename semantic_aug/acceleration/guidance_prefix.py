"""Compute the UNet's guidance-independent prefix once per image instead of twice.

Classifier-free guidance runs the UNet on the rows [latents, latents] with the empty prompt's text for the first
half and the image's prompt for the second. Text enters a Stable Diffusion UNet only through cross-attention, so
everything before the first cross-attention sees the same numbers in both halves: in SD v1 that is the first
ResNet block and the first transformer block's self-attention at 64², about 5% of the UNet's FLOPs and, since
attention at that size is the slowest part of the call, more of its time. `share_guidance_prefix(unet)` makes those
modules, while `paired_halves(modules)` is active, run on the first half of their rows and return it twice.
The result is the same computation on the same numbers; only the second, identical copy is skipped.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def _run_paired_once(module: nn.Module, forward):
    """A forward for `module` that, while `module.paired` is set, runs `forward` on the first half of the batch and
    repeats the result (see the module doc). Tensor arguments with the input's batch size (the ResNet's time
    embedding) are halved too; others pass as they are."""

    def paired_forward(hidden: torch.Tensor, *args, **kwargs):
        if not module.paired:
            return forward(hidden, *args, **kwargs)
        rows = hidden.shape[0]

        def half(value):
            return value[: rows // 2] if torch.is_tensor(value) and value.dim() and value.shape[0] == rows else value

        out = forward(half(hidden), *(half(a) for a in args), **{k: half(v) for k, v in kwargs.items()})
        return torch.cat([out, out])

    return paired_forward


def share_guidance_prefix(unet: nn.Module) -> list[nn.Module]:
    """Give the modules of a diffusers SD-style UNet that precede its first cross-attention a paired-halves forward
    (parameters and state dict untouched); returns those modules, for `paired_halves`.

    Walks the down blocks in order: a block without attention (SD-XL's and the tiny model's first) is shared whole,
    ResNets and downsampler; in the first block with transformers, its first ResNet and, where the first transformer
    block is the plain norm, self-attention, norm, cross-attention kind (SD v1/v2), that self-attention.
    """
    shared = []
    for block in getattr(unet, "down_blocks", []):
        attentions = getattr(block, "attentions", None)
        if not attentions:
            shared += [*block.resnets, *(block.downsamplers or [])]
            continue
        shared.append(block.resnets[0])
        first = attentions[0].transformer_blocks[0]
        if (getattr(first, "norm_type", None) == "layer_norm" and not first.only_cross_attention
                and getattr(first, "pos_embed", None) is None and first.attn2 is not None):
            shared.append(first.attn1)
        break
    for module in shared:
        if not hasattr(module, "paired"):  # a second sampler over the same UNet must not halve the rows twice
            module.paired = False
            module.forward = _run_paired_once(module, module.forward)
    return shared


@contextlib.contextmanager
def paired_halves(modules: list[nn.Module]):
    """Within this context the UNet's input rows are two identical halves: the wrapped prefix runs once."""
    for module in modules:
        module.paired = True
    try:
        yield
    finally:
        for module in modules:
            module.paired = False

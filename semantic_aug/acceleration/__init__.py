"""How fast the diffusion models run, kept apart from what they compute (`semantic_aug.stages.augmentations.sampler`).

`Acceleration` holds every switch (compilation with static batches, the attention backend with FlashAttention-4,
fused QKV projections, the shared guidance prefix, fused GroupNorm kernels, channels_last, pinned-memory copies,
cuDNN autotuning); `Acceleration.none()` is the reference computation. The sampler calls its models through the
runner that `Acceleration.prepare` returns (`runner.py`); the kernels and module rewrites live in
`fused_group_norm.py`, `guidance_prefix.py` and `flash_attention4.py`.
"""

from semantic_aug.acceleration.options import ATTENTION_BACKENDS, COMPILE_MODES, DEFAULT_COMPILE_MODE, Acceleration
from semantic_aug.acceleration.fused_group_norm import GroupNormLaunch
from semantic_aug.acceleration.runner import (INDUCTOR_OPTIONS, AcceleratedRunner, HostCopy, ReferenceRunner,
                                              StaticBatches, prefer_sdpa_backend, sdpa_backends_by_name)

__all__ = ["ATTENTION_BACKENDS", "AcceleratedRunner", "Acceleration", "COMPILE_MODES", "DEFAULT_COMPILE_MODE",
           "GroupNormLaunch", "HostCopy", "INDUCTOR_OPTIONS", "ReferenceRunner", "StaticBatches",
           "prefer_sdpa_backend", "sdpa_backends_by_name"]

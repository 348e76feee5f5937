"""`Acceleration`: the one set of switches for how the sampler runs its models.

Each option changes how fast the images are made, never the algorithm: the images agree with the reference
computation (`Acceleration.none()`, diffusers' own calls) within float rounding. The defaults are on where they were
measured to pay (`benchmarks/`, README "Performance"); the CUDA-only options apply on a CUDA device and are ignored
elsewhere. `torch.compile` is off by default here: it pays only for long GPU runs, where the scripts turn it on.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Mapping

import torch

from semantic_aug.acceleration.fused_group_norm import DEFAULT_LAUNCH, GroupNormLaunch
from semantic_aug.acceleration.runner import AcceleratedRunner, ReferenceRunner
from semantic_aug.core.utils import UserError

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DEFAULT_COMPILE_MODE = "default"  # max-autotune spent >8 min autotuning SD v1.4 GEMMs on an H100
ATTENTION_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math", "flash4")  # flash4: FlashAttention-4, optional


@dataclass(frozen=True)
class Acceleration:
    """How the sampler runs its UNet and VAE (see the module docstring); pass it to `DiffusionSampler`.

    Attributes:
        compile: `torch.compile` the UNet and the VAE decoder; batches are padded (with copies of their first row)
            to the largest seen, so that one compiled graph serves every batch.
        compile_mode: a `torch.compile` mode (`COMPILE_MODES`).
        inductor_options: Inductor options laid over `runner.INDUCTOR_OPTIONS` (for profiling other settings).
        attention: `auto`, an SDPA kernel to prefer (`flash`, `cudnn`, `efficient`, `math`; the others stay as
            fall-backs), or `flash4` (FlashAttention-4 for the UNet's head-dim-40 self-attention,
            `semantic_aug.acceleration.flash_attention4`; needs `fused_qkv`). `auto` is `flash4` on a Hopper GPU
            where `flash-attn-4` is installed and the projections are fused, else PyTorch's SDPA choice.
        fused_qkv: one matmul for the Q, K and V projections (diffusers' `fuse_qkv_projections`).
        shared_guidance_prefix: compute the UNet's part before its first cross-attention once for both guidance
            halves (`semantic_aug.acceleration.guidance_prefix`).
        fused_group_norm: (CUDA) GroupNorm(+SiLU) Triton kernels that read channels_last tensors as they lie
            (`semantic_aug.acceleration.fused_group_norm`), in the UNet and the VAE.
        group_norm_launch: the launch configuration of those kernels.
        channels_last: (CUDA) the models and their image-shaped inputs in channels_last.
        pinned_memory: (CUDA) copies to the device from pinned memory without waiting for the GPU, and images back
            to pinned host memory without waiting: a batch's PNGs are written while the next one runs.
        cudnn_benchmark: (CUDA) cuDNN autotuning of the convolutions (the batch shape is fixed, so it pays). It is a
            process-wide setting: `configure_process`, which a script calls once, makes it.
    """

    compile: bool = False
    compile_mode: str = DEFAULT_COMPILE_MODE
    inductor_options: Mapping[str, object] = field(default_factory=dict)
    attention: str = "auto"
    fused_qkv: bool = True
    shared_guidance_prefix: bool = True
    fused_group_norm: bool = True
    group_norm_launch: GroupNormLaunch = DEFAULT_LAUNCH
    channels_last: bool = True
    pinned_memory: bool = True
    cudnn_benchmark: bool = True

    def __post_init__(self):
        if self.compile_mode not in COMPILE_MODES:
            raise UserError(f"unknown compile mode {self.compile_mode!r}; choose one of {', '.join(COMPILE_MODES)}")
        if self.attention not in ATTENTION_BACKENDS:
            raise UserError(f"unknown attention backend {self.attention!r}; "
                            f"choose one of {', '.join(ATTENTION_BACKENDS)}")
        if self.attention == "flash4" and not self.fused_qkv:
            raise UserError("attention backend flash4 runs on fused projections: keep fused_qkv on")

    @classmethod
    def none(cls) -> "Acceleration":
        """No acceleration: the models run exactly as diffusers' img2img pipeline runs them."""
        return cls(**{option.name: False for option in fields(cls) if option.type in (bool, "bool")})

    @property
    def is_reference(self) -> bool:
        """Whether every option that changes how the models run is off (`none()`; cuDNN autotuning aside)."""
        return self.attention == "auto" and not any(
            getattr(self, name) for name in ("compile", "fused_qkv", "shared_guidance_prefix", "fused_group_norm",
                                             "channels_last", "pinned_memory"))

    def configure_process(self, device: str | torch.device) -> None:
        """Make the process-wide settings these options ask for: cuDNN autotuning on a CUDA device. Call it once,
        from the script, before generating (building a sampler changes nothing outside its own models)."""
        if torch.device(device).type == "cuda" and self.cudnn_benchmark:
            torch.backends.cudnn.benchmark = True

    def prepare(self, sampler):
        """Set up `sampler`'s models for these options (in place: their modules change, their parameters do not)
        and return the runner the sampler calls them through (`semantic_aug.acceleration.runner`)."""
        return ReferenceRunner(sampler) if self.is_reference else AcceleratedRunner(sampler, self)

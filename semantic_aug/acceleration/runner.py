"""The runners the sampler calls its models through: `ReferenceRunner` runs them as diffusers does,
`AcceleratedRunner` applies an `Acceleration`.

A runner offers the few operations in which speed work hides: `session()` (the context of one img2img call),
`to_device` (a CPU tensor onto the model's device), `layout` (an image batch in the models' memory layout), `unet`
and `decode` (one model call each) and `to_host` (a uint8 image back to the CPU). The sampler's rows for the UNet are
always two halves for classifier-free guidance, the same latents under the empty and the real prompts.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

import torch

from semantic_aug.acceleration.flash_attention4 import (check_flash_attention4, flash_attention4_preferred,
                                                        use_flash_attention4)
from semantic_aug.acceleration.fused_group_norm import fuse_group_norms
from semantic_aug.acceleration.guidance_prefix import paired_halves, share_guidance_prefix

if TYPE_CHECKING:
    from semantic_aug.acceleration.options import Acceleration

# Inductor settings from diffusers' SD speed guide: 1x1 convolutions as matmuls (so they fuse). Triton convolution
# templates are left out of autotuning (cuDNN wins on SD's 3x3 convolutions), and so is coordinate-descent
# tuning: both add many minutes of compile time for little gain.
logger = logging.getLogger(__name__)

INDUCTOR_OPTIONS = {"conv_1x1_as_mm": True, "epilogue_fusion": False, "max_autotune_conv_backends": "ATEN"}


def sdpa_backends_by_name() -> dict:
    """PyTorch's SDPA kernels by the names `Acceleration.attention` takes: flash, cudnn, efficient, math."""
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def prefer_sdpa_backend(name: str):
    """A context in which SDPA tries the kernel `name` first (the others stay as fall-backs for shapes it cannot
    run); `auto` and `flash4` (whose layers bypass SDPA) keep PyTorch's choice."""
    if name in ("auto", "flash4"):
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    backends = sdpa_backends_by_name()
    preferred = backends.pop(name)
    return sdpa_kernel([preferred] + list(backends.values()), set_priority=True)


class HostCopy:
    """A uint8 image on its way from the GPU to pinned host memory; `wait()` returns it once the copy is done."""

    def __init__(self, pixels: torch.Tensor):
        self.host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
        self.host.copy_(pixels, non_blocking=True)
        self.ready = torch.cuda.Event()
        self.ready.record()

    def wait(self) -> torch.Tensor:
        self.ready.synchronize()
        return self.host


class StaticBatches:
    """Calls on inputs of one memory layout; with `pad`, batches are padded (with copies of row 0) to the largest
    seen so far, so that one compiled graph serves every batch.

    Args:
        memory_format: the layout of 4-d inputs.
        pad: pad batches (compiled functions).
        cudagraphs: the function replays CUDA graphs, whose output buffers the next replay reuses.
    """

    def __init__(self, memory_format: torch.memory_format, pad: bool, cudagraphs: bool):
        self.memory_format, self.pad, self.cudagraphs = memory_format, pad, cudagraphs
        self.rows = 0  # the padded batch size

    def __call__(self, function, *tensors: torch.Tensor, paired: bool = False) -> torch.Tensor:
        """`function(*tensors)` on the real rows. `paired` rows are two halves (guidance), padded each on its own,
        so that row i of one half still meets row i of the other."""
        rows = tensors[0].shape[0]
        target = rows
        if self.pad:
            self.rows = target = max(self.rows, rows)
        tensors = tuple(self.static_input(t, target, paired) for t in tensors)
        if self.cudagraphs:
            # a CUDA-graph replay reuses its output buffers: mark the step and copy the rows out before the next one
            torch.compiler.cudagraph_mark_step_begin()
        out = function(*tensors)
        if paired and target > rows:
            out = torch.cat([out[: rows // 2], out[target // 2: target // 2 + rows // 2]])
        else:
            out = out[:rows].clone() if self.cudagraphs else out[:rows]
        return out

    def static_input(self, tensor: torch.Tensor, rows: int, paired: bool = False) -> torch.Tensor:
        if tensor.dim() == 0:
            return tensor
        if paired and tensor.shape[0] < rows:
            tensor = torch.cat([self.static_input(half, rows // 2) for half in tensor.chunk(2)])
        elif tensor.shape[0] < rows:
            tensor = torch.cat([tensor, tensor[:1].expand(rows - tensor.shape[0], *tensor.shape[1:])])
        # one layout for every call (CPU convolutions may return channels_last): no recompilation on strides
        return tensor.contiguous(memory_format=self.memory_format if tensor.dim() == 4 else torch.contiguous_format)


class ReferenceRunner:
    """The models as diffusers runs them: eager calls in the default layout, copies that wait.

    Args:
        sampler: the `DiffusionSampler` (its `device`, `unet_forward` and `vae_decode` are used).
    """

    def __init__(self, sampler):
        self.device = sampler.device
        self.unet_forward, self.vae_decode = sampler.unet_forward, sampler.vae_decode

    def session(self):
        """The context of one img2img call."""
        return contextlib.nullcontext()

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device)

    def layout(self, images: torch.Tensor) -> torch.Tensor:
        """An image batch (N, C, H, W) in the models' memory layout."""
        return images

    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
             *added: torch.Tensor) -> torch.Tensor:
        """The UNet's prediction for guidance-paired rows (see the module docstring); `added` is SDXL's added
        conditioning, paired like the rows."""
        return self.unet_forward(sample, timestep, text, *added)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae_decode(latents)

    def to_host(self, pixels: torch.Tensor):
        """A uint8 image (3, H, W) on the CPU, or a pending copy with `wait()` (see `GeneratedImages`)."""
        return pixels.cpu()


class AcceleratedRunner(ReferenceRunner):
    """The models run under an `Acceleration` (see its attributes); set up in the order the options build on each
    other: fused projections, attention processors, fused norms, layout, compilation, then the guidance prefix
    (which wraps the fused norms' forwards).

    Args:
        sampler: the `DiffusionSampler` whose `unet` and `vae` are set up in place.
        acceleration: the options.
    """

    def __init__(self, sampler, acceleration: Acceleration):
        super().__init__(sampler)
        unet, vae = sampler.unet, sampler.vae
        on_cuda = self.device.type == "cuda"
        self.attention = acceleration.attention
        if self.attention == "flash4":
            check_flash_attention4(self.device)
        elif self.attention == "auto" and acceleration.fused_qkv and flash_attention4_preferred(self.device):
            self.attention = "flash4"
        self.memory_format = torch.channels_last if on_cuda and acceleration.channels_last else torch.contiguous_format
        self.pinned_memory = on_cuda and acceleration.pinned_memory
        if acceleration.fused_qkv:
            unet.fuse_qkv_projections()  # one matmul for Q, K and V instead of three
        if self.attention == "flash4":
            use_flash_attention4(unet)
        if on_cuda:
            if acceleration.fused_group_norm:  # GroupNorm(+SiLU) kernels that read channels_last as it lies
                fuse_group_norms(unet, acceleration.group_norm_launch)
                fuse_group_norms(vae, acceleration.group_norm_launch)
            unet.to(memory_format=self.memory_format)
            vae.to(memory_format=self.memory_format)
        self.unet_call, self.decode_call = self.unet_forward, self.vae_decode
        cudagraphs = False
        if acceleration.compile:
            import torch._inductor as inductor  # `import torch._inductor` would shadow the name `torch` here

            options = {**inductor.list_mode_options(acceleration.compile_mode), **INDUCTOR_OPTIONS,
                       **acceleration.inductor_options}
            cudagraphs = bool(options.get("triton.cudagraphs", False))
            self.unet_call = torch.compile(self.unet_forward, fullgraph=False, dynamic=False, options=options)
            self.decode_call = torch.compile(self.vae_decode, dynamic=False,
                                             options=inductor.list_mode_options("default"))
        self.unet_batches = StaticBatches(self.memory_format, acceleration.compile, cudagraphs)
        self.decode_batches = StaticBatches(self.memory_format, acceleration.compile, cudagraphs)
        self.shared_prefix = []
        if acceleration.shared_guidance_prefix:
            if getattr(unet.config, "addition_embed_type", None) is not None:
                logger.info("shared_guidance_prefix is off for this model: its UNet's time embedding carries the "
                            "prompt's pooled embedding (%s), so the guidance halves differ from the first layer",
                            unet.config.addition_embed_type)
            else:
                self.shared_prefix = share_guidance_prefix(unet)

    @contextlib.contextmanager
    def session(self):
        """The attention backend preferred, and the guidance prefix run once for both halves of every UNet call."""
        with prefer_sdpa_backend(self.attention), paired_halves(self.shared_prefix):
            yield

    def layout(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=self.memory_format)

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """Without waiting for the GPU's queue (pinned memory, asynchronous copy)."""
        if not self.pinned_memory:
            return tensor.to(self.device)
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
             *added: torch.Tensor) -> torch.Tensor:
        return self.unet_batches(self.unet_call, sample, timestep, text, *added, paired=True)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decode_batches(self.decode_call, latents)

    def to_host(self, pixels: torch.Tensor):
        return HostCopy(pixels) if self.pinned_memory else pixels.cpu()

"""Batched img2img and inpainting with Stable Diffusion: the sampler every augmentation generates through.

One call turns a batch of real images into synthetic ones, each with its own prompt and its own seed:

1. the prompts (and the empty prompt, for classifier-free guidance) go through the text encoder once;
2. each distinct real image is resized to the model's side and VAE-encoded once, however many siblings it has;
3. per image, a CPU `torch.Generator` seeded with the image's seed draws the VAE posterior sample and then the
   noise, in that order (as diffusers' img2img pipeline does with a list of generators), so an image does not
   depend on the batch it lands in;
4. the latents are noised to the timestep that `strength` selects and denoised with guidance; with a mask, the
   region outside it is pasted back at every step (4-channel UNets, as diffusers' inpainting pipeline does for
   them) or the mask is fed to the UNet (9-channel inpainting UNets);
5. the VAE decodes, each image is resized back to its real image's size, and the uint8 result is copied to host
   memory without waiting: `GeneratedImages` waits only when a writer thread asks for the pixels, so PNG
   writing overlaps the next batch on the GPU.

The speed options change no arithmetic of the algorithm: bf16 weights are the caller's `dtype`; the UNet computes
the part before its first cross-attention once for both guidance halves (`semantic_aug.guidance_prefix`) and
fuses its QKV projections; channels_last, cuDNN autotuning and the fused GroupNorm+SiLU kernels of
`semantic_aug.fused_group_norm` are on for CUDA; `compile_model` adds `torch.compile` of the UNet and the VAE
decoder (batches are padded to a fixed size so one compiled graph serves every batch); `attention_backend` picks
the SDPA kernel. Host-to-device copies do not wait for the GPU, so the next batch is prepared while the previous
one still runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from semantic_aug.flash_attention4 import check_flash_attention4, flash_attention4_preferred, use_flash_attention4
from semantic_aug.fused_group_norm import fuse_group_norms
from semantic_aug.guidance_prefix import paired_halves, share_guidance_prefix
from semantic_aug.utils import UserError

logger = logging.getLogger(__name__)

REFERENCE_RESOLUTION = 512  # SD v1's side; `mask_grow_radius` is given in pixels at this side
# the reference grew COCO object masks with scipy's `maximum_filter(size=16)` at 512²: a 16-pixel window reaching
# 8 pixels up/left and 7 down/right of each pixel; `mask_grow_radius` keeps the reference's name for that size
DEFAULT_MASK_GROW_RADIUS = 16
VAE_DECODE_CHUNK = 8  # images per VAE decode call: a 512² decode holds ~0.5 GB of bf16 activations per image
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DEFAULT_COMPILE_MODE = "default"  # max-autotune spent >8 min autotuning SD v1.4 GEMMs on an H100
# Inductor settings from diffusers' SD speed guide: 1x1 convolutions as matmuls (so they fuse). Triton convolution
# templates are left out of autotuning (cuDNN wins on SD's 3x3 convolutions), and so is coordinate-descent
# tuning: both add many minutes of compile time for little gain.
INDUCTOR_OPTIONS = {"conv_1x1_as_mm": True, "epilogue_fusion": False, "max_autotune_conv_backends": "ATEN"}
ATTENTION_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math", "flash4")  # flash4: FlashAttention-4, optional


def _sdpa_backends() -> dict:
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class GeneratedImages:
    """The output of one batch: uint8 images (3, H, W), possibly still being copied from the GPU.

    Args:
        images: per image, a uint8 CPU tensor (3, H, W) or a PIL image.
        ready: per image, a CUDA event recorded after its copy to host memory was queued, or None.
    """

    def __init__(self, images: Sequence, ready: Sequence | None = None):
        self.images = list(images)
        self.ready = list(ready) if ready is not None else [None] * len(self.images)

    def __len__(self) -> int:
        return len(self.images)

    def pil(self, index: int):
        """Image `index` as an RGB PIL image (waits for its copy from the GPU)."""
        from PIL import Image

        image = self.images[index]
        if isinstance(image, Image.Image):
            return image
        if self.ready[index] is not None:
            self.ready[index].synchronize()
        return Image.fromarray(image.permute(1, 2, 0).numpy())

    @classmethod
    def gather(cls, parts: Sequence[tuple[Sequence[int], "GeneratedImages"]], size: int) -> "GeneratedImages":
        """Merge sub-batches: `parts` holds (positions in the merged batch, images) pairs covering 0..size-1."""
        images, ready = [None] * size, [None] * size
        for positions, part in parts:
            for position, image, event in zip(positions, part.images, part.ready):
                images[position], ready[position] = image, event
        return cls(images, ready)


class DiffusionSampler:
    """Batched img2img / inpainting over a loaded Stable Diffusion pipeline (see the module docstring).

    Args:
        pipe: a diffusers Stable Diffusion pipeline (its unet, vae, text_encoder, tokenizer and scheduler are used).
        model_id: names the weights in cache fingerprints (hub id or resolved folder).
        num_inference_steps: the scheduler's full step count; img2img runs the last `strength` fraction of it.
        resolution: the side images are generated at; None uses the model's native side (512 SD, 64 tiny).
        mask_grow_radius: side in pixels (at 512²) of the max-filter window that grows object masks before
            inpainting (the reference's `maximum_filter(size=mask_grow_radius)`).
        compile_model: `torch.compile` the UNet and the VAE decoder (worth it for long runs on a GPU).
        compile_mode: a `torch.compile` mode (`COMPILE_MODES`).
        attention_backend: `auto`, the SDPA kernel to prefer, or `flash4` (FlashAttention-4 for the UNet's
            head-dim-40 self-attention, `semantic_aug.flash_attention4`); see `ATTENTION_BACKENDS`. `auto` is
            `flash4` on a Hopper GPU where `flash-attn-4` is installed, else PyTorch's SDPA choice.
    """

    def __init__(self, pipe, model_id: str, num_inference_steps: int = 50, resolution: int | None = None,
                 mask_grow_radius: int = DEFAULT_MASK_GROW_RADIUS, compile_model: bool = False,
                 compile_mode: str = DEFAULT_COMPILE_MODE, attention_backend: str = "auto"):
        from semantic_aug.stable_diffusion import default_resolution

        if num_inference_steps < 1:
            raise UserError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        if compile_mode not in COMPILE_MODES:
            raise UserError(f"unknown compile mode {compile_mode!r}; choose one of {', '.join(COMPILE_MODES)}")
        if attention_backend not in ATTENTION_BACKENDS:
            raise UserError(f"unknown attention backend {attention_backend!r}; "
                            f"choose one of {', '.join(ATTENTION_BACKENDS)}")
        self.unet, self.vae, self.scheduler = pipe.unet, pipe.vae, pipe.scheduler
        self.text_encoder, self.tokenizer = pipe.text_encoder, pipe.tokenizer
        self.model_id = model_id
        self.device, self.dtype = self.unet.device, self.unet.dtype
        self.num_inference_steps = num_inference_steps
        self.latent_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.resolution = int(resolution or default_resolution(self.unet, self.vae))
        if self.resolution % self.latent_factor:
            raise UserError(f"resolution {self.resolution} must be a multiple of the VAE's factor {self.latent_factor}")
        self.mask_grow_radius = mask_grow_radius
        if attention_backend == "flash4":
            check_flash_attention4(self.device)
        elif attention_backend == "auto" and flash_attention4_preferred(self.device):
            attention_backend = "flash4"
        self.compile_model, self.compile_mode, self.attention_backend = compile_model, compile_mode, attention_backend
        self.scaling_factor = self.vae.config.scaling_factor
        self.inpainting_unet = self.unet.config.in_channels == 9  # 4 latents + 1 mask + 4 masked-image latents
        self.step_takes_generator = "generator" in inspect.signature(self.scheduler.step).parameters
        self.memory_format = torch.channels_last if self.device.type == "cuda" else torch.contiguous_format
        self._unconditional = None
        self._static_rows = {"unet": 0, "decode": 0}  # padded batch sizes of the compiled graphs
        self._prepare_for_speed()

    @classmethod
    def from_pretrained(cls, model_path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        unet_weights: str | os.PathLike | None = None, **kwargs) -> "DiffusionSampler":
        """Load Stable Diffusion (`tiny`, a hub id or a local folder) and wrap it.

        Args:
            model_path: as `semantic_aug.stable_diffusion.load_stable_diffusion` takes it.
            device: where the model runs.
            dtype: weight dtype (bf16/fp16 on GPU, fp32 on CPU).
            unet_weights: optional UNet state dict file to load over the model's (an erased-concept UNet).
            **kwargs: the constructor's options.
        """
        from semantic_aug.stable_diffusion import load_stable_diffusion, resolve_model_path

        pipe = load_stable_diffusion(model_path, pipeline="img2img", device=device, dtype=dtype)
        model_id = resolve_model_path(model_path)
        if unet_weights is not None:
            if not Path(unet_weights).is_file():
                raise UserError(f"UNet checkpoint not found: {unet_weights}")
            state = torch.load(unet_weights, map_location="cpu", weights_only=True)
            try:
                pipe.unet.load_state_dict(state)
            except RuntimeError as error:
                raise UserError(f"UNet checkpoint {unet_weights} does not fit the model {model_path}: "
                                f"{str(error).splitlines()[0]}") from None
            model_id = f"{model_id}+unet:{file_sha256(unet_weights)}"
        return cls(pipe, model_id=model_id, **kwargs)

    # -- set-up ------------------------------------------------------------------------------------------------

    def _prepare_for_speed(self) -> None:
        self.unet.fuse_qkv_projections()  # one matmul for Q, K and V instead of three
        if self.attention_backend == "flash4":
            use_flash_attention4(self.unet)
        if self.device.type == "cuda":
            fuse_group_norms(self.unet)  # GroupNorm(+SiLU) kernels that read channels_last as it lies
            fuse_group_norms(self.vae)
            self.unet.to(memory_format=self.memory_format)
            self.vae.to(memory_format=self.memory_format)
            torch.backends.cudnn.benchmark = True  # the batch shape is fixed, so autotuning convolutions pays off
        self._unet_call = self._unet_forward
        self._decode_call = self._vae_decode
        self._cudagraphs = False
        if self.compile_model:
            import torch._inductor as inductor  # binds `inductor` only: `import torch._inductor` would shadow `torch` here

            options = {**inductor.list_mode_options(self.compile_mode), **INDUCTOR_OPTIONS}
            self._cudagraphs = bool(options.get("triton.cudagraphs", False))
            self._unet_call = torch.compile(self._unet_forward, fullgraph=False, dynamic=False, options=options)
            self._decode_call = torch.compile(self._vae_decode, dynamic=False,
                                              options=inductor.list_mode_options("default"))
        self._shared_prefix = share_guidance_prefix(self.unet)  # after the fused norms: it wraps their forwards

    def _unet_forward(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.unet(sample.to(self.dtype), timestep, encoder_hidden_states=text, return_dict=False)[0]

    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents.to(self.dtype), return_dict=False)[0]

    def _run_static(self, kind: str, function, *tensors: torch.Tensor, paired: bool = False) -> torch.Tensor:
        """`function(*tensors)` on inputs of one memory layout; compiled, batches are padded (with copies of row 0)
        to the largest seen so far, so that one graph serves every batch. `paired` rows are two halves (guidance)
        padded each on its own, so that row i of one half still meets row i of the other."""
        rows = tensors[0].shape[0]
        target = rows
        if self.compile_model:
            self._static_rows[kind] = target = max(self._static_rows[kind], rows)
        tensors = tuple(self._static_input(t, target, paired) for t in tensors)
        if self._cudagraphs:
            # a CUDA-graph replay reuses its output buffers: mark the step and copy the rows out before the next one
            torch.compiler.cudagraph_mark_step_begin()
        out = function(*tensors)
        if paired and target > rows:
            out = torch.cat([out[: rows // 2], out[target // 2: target // 2 + rows // 2]])
        else:
            out = out[:rows].clone() if self._cudagraphs else out[:rows]
        return out

    def _static_input(self, tensor: torch.Tensor, rows: int, paired: bool = False) -> torch.Tensor:
        if tensor.dim() == 0:
            return tensor
        if paired and tensor.shape[0] < rows:
            tensor = torch.cat([self._static_input(half, rows // 2) for half in tensor.chunk(2)])
        elif tensor.shape[0] < rows:
            tensor = torch.cat([tensor, tensor[:1].expand(rows - tensor.shape[0], *tensor.shape[1:])])
        # one layout for every call (CPU convolutions may return channels_last): no recompilation on strides
        return tensor.contiguous(memory_format=self.memory_format if tensor.dim() == 4 else torch.contiguous_format)

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A CPU tensor on the device without waiting for the GPU's queue (pinned memory, asynchronous copy)."""
        if self.device.type != "cuda":
            return tensor.to(self.device)
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def _attention(self):
        """The SDPA kernel preference, as a context (the others stay as fall-backs for shapes it cannot run)."""
        if self.attention_backend in ("auto", "flash4"):  # flash4 layers bypass SDPA; the rest keep its choice
            return contextlib.nullcontext()
        from torch.nn.attention import sdpa_kernel

        backends = _sdpa_backends()
        preferred = backends.pop(self.attention_backend)
        order = [preferred] + list(backends.values())
        return sdpa_kernel(order, set_priority=True)

    def settings(self) -> dict:
        """What about the model changes the images (for cache fingerprints)."""
        configs = {"unet": dict(self.unet.config), "vae": dict(self.vae.config),
                   "scheduler": dict(self.scheduler.config), "text_encoder": self.text_encoder.config.to_dict()}
        digest = hashlib.sha256(json.dumps(configs, sort_keys=True, default=str).encode()).hexdigest()
        return {"model": self.model_id, "model_config_sha256": digest, "scheduler": type(self.scheduler).__name__,
                "num_inference_steps": self.num_inference_steps, "resolution": self.resolution,
                "mask_grow_radius": self.mask_grow_radius}

    # -- the steps of img2img ----------------------------------------------------------------------------------

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text-encoder states (len(prompts), 77, width) for `prompts`; each distinct prompt is encoded once."""
        unique = list(dict.fromkeys(prompts))
        ids = self.tokenizer(unique, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
                             return_tensors="pt").input_ids
        states = self.text_encoder(self._to_device(ids))[0]
        position = {prompt: i for i, prompt in enumerate(unique)}
        return states[self._to_device(torch.tensor([position[p] for p in prompts]))]

    def unconditional(self, rows: int) -> torch.Tensor:
        """The empty prompt's text states, repeated `rows` times (encoded once per sampler)."""
        if self._unconditional is None:
            self._unconditional = self.encode_prompts([""])
        return self._unconditional.expand(rows, -1, -1)

    def to_model_input(self, image) -> torch.Tensor:
        """A PIL image as a (1, 3, side, side) tensor in [-1, 1] on the device (bilinear, antialiased resize)."""
        pixels = self._to_device(torch.from_numpy(np.array(image.convert("RGB")))).permute(2, 0, 1)[None]
        pixels = F.interpolate(pixels.float() / 255.0, size=(self.resolution, self.resolution), mode="bilinear",
                               antialias=True, align_corners=False)
        return pixels * 2.0 - 1.0

    def prepare_masks(self, masks: Sequence[np.ndarray], invert: bool) -> torch.Tensor:
        """Object masks (H×W, nonzero = object) as (N, 1, side, side) floats: 1 = repaint, grown and maybe inverted."""
        window = round(self.mask_grow_radius * self.resolution / REFERENCE_RESOLUTION)
        prepared = []
        for mask in masks:
            mask = self._to_device(torch.from_numpy(np.asarray(mask) > 0)).float()[None, None]
            mask = F.interpolate(mask, size=(self.resolution, self.resolution), mode="nearest")
            if window > 1:  # scipy's window for an even size: window // 2 before the pixel, the rest after it
                before, after = window // 2, window - 1 - window // 2
                mask = F.max_pool2d(F.pad(mask, (before, after, before, after)), kernel_size=window, stride=1)
            prepared.append(1.0 - mask if invert else mask)
        return torch.cat(prepared)

    def timesteps_for(self, strength: float) -> torch.Tensor:
        """Set the scheduler up for img2img at `strength` and return the timesteps to run (diffusers' convention),
        on the CPU (the caller copies them to the device without waiting for the GPU)."""
        self.scheduler.set_timesteps(self.num_inference_steps)
        init_steps = min(int(self.num_inference_steps * strength), self.num_inference_steps)
        if init_steps < 1:
            raise UserError(f"strength {strength} with {self.num_inference_steps} inference steps runs no denoising "
                            f"step; raise the strength or the number of steps")
        start = self.num_inference_steps - init_steps
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(start * self.scheduler.order)
        return self.scheduler.timesteps[start * self.scheduler.order:]

    def encode_images(self, images: Sequence) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """VAE posterior (mean, std) of each distinct image (by identity) and, per input, its row among them."""
        rows, distinct = [], {}
        for image in images:
            rows.append(distinct.setdefault(id(image), len(distinct)))
        unique = list({id(image): image for image in images}.values())
        pixels = torch.cat([self.to_model_input(image) for image in unique]).to(self.dtype)
        pixels = pixels.contiguous(memory_format=self.memory_format)
        posterior = self.vae.encode(pixels).latent_dist
        return posterior.mean.float(), posterior.std.float(), rows

    def img2img(self, images: Sequence, prompts: Sequence[str], seeds: Sequence[int], strength: float,
                guidance_scale: float, masks: Sequence[np.ndarray] | None = None,
                invert_mask: bool = False) -> GeneratedImages:
        """Generate one image per input: img2img from `images[i]` with `prompts[i]`, seeded by `seeds[i]`.

        Args:
            images: RGB PIL images (the same object several times = siblings of one real image, encoded once).
            prompts: one prompt per image.
            seeds: one seed per image; the image depends only on it, its input, prompt and the settings.
            strength: fraction of the noise schedule to run, in (0, 1].
            guidance_scale: classifier-free guidance weight (>= 1).
            masks: per image an object mask (H×W, nonzero = object) to inpaint, or None for plain img2img.
            invert_mask: repaint the background instead of the object.

        Returns:
            The images, each at its input's size.
        """
        count = len(images)
        if not (len(prompts) == len(seeds) == count and (masks is None or len(masks) == count)):
            raise ValueError("images, prompts, seeds (and masks) must have one entry per image")
        # every UNet call below gets the rows [latents, latents]: the guidance prefix runs once for both halves
        with torch.no_grad(), self._attention(), paired_halves(self._shared_prefix):
            # 1. text states: unconditional rows first, then one per prompt (classifier-free guidance)
            text = torch.cat([self.unconditional(count), self.encode_prompts(prompts)])
            # 2. distinct images -> VAE posterior; 3. per-image generators: posterior sample, then noise
            mean, std, rows = self.encode_images(images)
            generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
            latent_shape = mean.shape[1:]
            posterior_draws, noise = [], []
            for generator in generators:
                posterior_draws.append(torch.randn(latent_shape, generator=generator))
                noise.append(torch.randn(latent_shape, generator=generator))
            rows = self._to_device(torch.tensor(rows))
            clean = (mean[rows] + std[rows] * self._to_device(torch.stack(posterior_draws))) * self.scaling_factor
            noise = self._to_device(torch.stack(noise))
            # 4. noise to the strength's first timestep, then denoise with guidance
            schedule = self.timesteps_for(strength)  # on the CPU
            timesteps = self._to_device(schedule)
            latents = self.scheduler.add_noise(clean, noise, timesteps[:1].repeat(count))
            latent_mask, unet_extra = None, None
            if masks is not None:
                pixel_mask = self.prepare_masks(masks, invert_mask)
                latent_mask = F.interpolate(pixel_mask, size=latents.shape[-2:], mode="nearest")
                if self.inpainting_unet:
                    masked = torch.cat([self.to_model_input(image) for image in images]) * (pixel_mask < 0.5)
                    masked = self.vae.encode(masked.to(self.dtype)).latent_dist.mean.float() * self.scaling_factor
                    unet_extra = torch.cat([latent_mask, masked], dim=1).repeat(2, 1, 1, 1)
            elif self.inpainting_unet:
                raise UserError("this model is an inpainting model (9-channel UNet); it needs --mask 1")
            step_kwargs = {"generator": generators} if self.step_takes_generator else {}
            step_values = schedule.tolist()  # python ints for the scheduler
            for i, t in enumerate(timesteps):
                model_input = self.scheduler.scale_model_input(torch.cat([latents, latents]), step_values[i])
                if unet_extra is not None:
                    model_input = torch.cat([model_input, unet_extra], dim=1)
                prediction = self._run_static("unet", self._unet_call, model_input, t, text, paired=True).float()
                unconditional, conditional = prediction.chunk(2)
                guided = unconditional + guidance_scale * (conditional - unconditional)
                latents = self.scheduler.step(guided, step_values[i], latents, return_dict=False, **step_kwargs)[0]
                if latent_mask is not None and not self.inpainting_unet:
                    known = clean if i == len(step_values) - 1 else \
                        self.scheduler.add_noise(clean, noise, timesteps[i + 1: i + 2].repeat(count))
                    latents = (1.0 - latent_mask) * known + latent_mask * latents
            # 5. decode, back to each real image's size, uint8, copied to host memory without waiting
            return self.decode(latents, [image.size for image in images])

    def decode(self, latents: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> GeneratedImages:
        """VAE-decode latents and resize image i to `sizes[i]` (PIL's (width, height)); see `GeneratedImages`."""
        outputs, ready = [], []
        for start in range(0, latents.shape[0], VAE_DECODE_CHUNK):
            chunk = latents[start: start + VAE_DECODE_CHUNK] / self.scaling_factor
            decoded = self._run_static("decode", self._decode_call, chunk).float()
            decoded = (decoded / 2.0 + 0.5).clamp(0.0, 1.0)
            for image, (width, height) in zip(decoded, sizes[start: start + VAE_DECODE_CHUNK]):
                if (height, width) != tuple(image.shape[-2:]):
                    image = F.interpolate(image[None], size=(height, width), mode="bilinear", antialias=True,
                                          align_corners=False)[0]
                pixels = (image * 255.0).round().to(torch.uint8)
                if self.device.type == "cuda":
                    host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
                    host.copy_(pixels, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record()
                    outputs.append(host)
                    ready.append(event)
                else:
                    outputs.append(pixels.cpu())
                    ready.append(None)
        return GeneratedImages(outputs, ready)

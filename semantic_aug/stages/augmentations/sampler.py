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
5. the VAE decodes, and each image is resized back to its real image's size as uint8.

With one image this is diffusers' `StableDiffusionImg2ImgPipeline`. For an SDXL model, step 1 also gives the UNet's
added conditioning (`sdxl_conditioning.SDXLConditioning`: both encoders' states, the pooled embedding, the size/crop
ids), and one image is diffusers' `StableDiffusionXLImg2ImgPipeline`. How fast the models run is not the sampler's
business: it calls them through the runner of an `Acceleration` (`semantic_aug.acceleration`: compilation, fused
kernels, the attention backend, asynchronous copies), whose `Acceleration.none()` runs them as diffusers does and
whose options change no step of the algorithm. The weights' dtype is the caller's.
"""

from __future__ import annotations

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

from semantic_aug.acceleration import Acceleration
from semantic_aug.core.embeddings import expand_vector_tokens
from semantic_aug.core.utils import UserError
from semantic_aug.stages.augmentations.sdxl_conditioning import SDXLConditioning

logger = logging.getLogger(__name__)

REFERENCE_RESOLUTION = 512  # SD v1's side; `mask_grow_radius` is given in pixels at this side
# the reference grew COCO object masks with scipy's `maximum_filter(size=16)` at 512²: a 16-pixel window reaching
# 8 pixels up/left and 7 down/right of each pixel; `mask_grow_radius` keeps the reference's name for that size
DEFAULT_MASK_GROW_RADIUS = 16
VAE_DECODE_CHUNK = 8  # images per VAE decode call: a 512² decode holds ~0.5 GB of bf16 activations per image


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class GeneratedImages:
    """The output of one batch: one image per input, converted to PIL when asked for.

    Args:
        images: per image, a uint8 CPU tensor (3, H, W), a PIL image, or a pending copy whose `wait()` gives the
            tensor (the runner's `to_host`: a writer thread then waits for its image alone).
    """

    def __init__(self, images: Sequence):
        self.images = list(images)

    def __len__(self) -> int:
        return len(self.images)

    def pil(self, index: int):
        """Image `index` as an RGB PIL image (waits for a pending copy)."""
        from PIL import Image

        image = self.images[index]
        if isinstance(image, Image.Image):
            return image
        if not torch.is_tensor(image):
            image = image.wait()
        return Image.fromarray(image.permute(1, 2, 0).numpy())

    @classmethod
    def gather(cls, parts: Sequence[tuple[Sequence[int], "GeneratedImages"]], size: int) -> "GeneratedImages":
        """Merge sub-batches: `parts` holds (positions in the merged batch, images) pairs covering 0..size-1."""
        images = [None] * size
        for positions, part in parts:
            for position, image in zip(positions, part.images):
                images[position] = image
        return cls(images)


class DiffusionSampler:
    """Batched img2img / inpainting over a loaded Stable Diffusion pipeline (see the module docstring).

    Args:
        pipe: a diffusers Stable Diffusion pipeline (its unet, vae, text_encoder, tokenizer and scheduler are used).
        model_id: names the weights in cache fingerprints (hub id or resolved folder).
        num_inference_steps: the scheduler's full step count; img2img runs the last `strength` fraction of it.
        resolution: the side images are generated at; None uses the model's native side (512 SD, 64 tiny).
        mask_grow_radius: side in pixels (at 512²) of the max-filter window that grows object masks before
            inpainting (the reference's `maximum_filter(size=mask_grow_radius)`).
        acceleration: how the models run (`semantic_aug.acceleration.Acceleration`); None takes its defaults.
    """

    def __init__(self, pipe, model_id: str, num_inference_steps: int = 50, resolution: int | None = None,
                 mask_grow_radius: int = DEFAULT_MASK_GROW_RADIUS, acceleration: Acceleration | None = None):
        from semantic_aug.core.stable_diffusion import checked_resolution, vae_scale_factor

        if num_inference_steps < 1:
            raise UserError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        self.unet, self.vae, self.scheduler = pipe.unet, pipe.vae, pipe.scheduler
        self.text_encoder, self.tokenizer = pipe.text_encoder, pipe.tokenizer
        # SDXL's second encoder and tokenizer (None for SD 1.x/2.x)
        self.text_encoder_2, self.tokenizer_2 = getattr(pipe, "text_encoder_2", None), getattr(pipe, "tokenizer_2", None)
        self.model_id = model_id
        self.device, self.dtype = self.unet.device, self.unet.dtype
        self.num_inference_steps = num_inference_steps
        self.latent_factor = vae_scale_factor(self.vae)
        self.resolution = checked_resolution(resolution, self.unet, self.vae)
        self.mask_grow_radius = mask_grow_radius
        self.scaling_factor = self.vae.config.scaling_factor
        self.inpainting_unet = self.unet.config.in_channels == 9  # 4 latents + 1 mask + 4 masked-image latents
        self.step_takes_generator = "generator" in inspect.signature(self.scheduler.step).parameters
        self._unconditional = None
        self.added_conditioning = None if self.text_encoder_2 is None else \
            SDXLConditioning(pipe, self.resolution, self.dtype)
        self.acceleration = Acceleration() if acceleration is None else acceleration
        self.runner = self.acceleration.prepare(self)  # last: it may rewrite the models' modules (not their weights)

    @classmethod
    def from_pretrained(cls, model_path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        unet_weights: str | os.PathLike | None = None, **kwargs) -> "DiffusionSampler":
        """Load Stable Diffusion (`tiny`, a hub id or a local folder) and wrap it.

        Args:
            model_path: as `semantic_aug.core.stable_diffusion.load_stable_diffusion` takes it.
            device: where the model runs.
            dtype: weight dtype (bf16/fp16 on GPU, fp32 on CPU).
            unet_weights: optional UNet state dict file to load over the model's (an erased-concept UNet).
            **kwargs: the constructor's options.
        """
        from semantic_aug.core.stable_diffusion import load_stable_diffusion, resolve_model_path

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

    # -- the models, as diffusers calls them (the runner may compile these) -------------------------------------

    def unet_forward(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                     *added: torch.Tensor) -> torch.Tensor:
        """The UNet's noise prediction for `sample` (cast to the weights' dtype) at `timestep` under text states, and
        for SDXL under its added conditioning `added` = (pooled text embedding, size/crop ids)."""
        added_cond_kwargs = dict(zip(("text_embeds", "time_ids"), added)) if added else None
        return self.unet(sample.to(self.dtype), timestep, encoder_hidden_states=text,
                         added_cond_kwargs=added_cond_kwargs, return_dict=False)[0]

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from unscaled latents."""
        return self.vae.decode(latents.to(self.dtype), return_dict=False)[0]

    def settings(self) -> dict:
        """What about the model changes the images (for cache fingerprints)."""
        configs = {"unet": dict(self.unet.config), "vae": dict(self.vae.config),
                   "scheduler": dict(self.scheduler.config), "text_encoder": self.text_encoder.config.to_dict()}
        if self.text_encoder_2 is not None:
            configs["text_encoder_2"] = self.text_encoder_2.config.to_dict()
        digest = hashlib.sha256(json.dumps(configs, sort_keys=True, default=str).encode()).hexdigest()
        return {"model": self.model_id, "model_config_sha256": digest, "scheduler": type(self.scheduler).__name__,
                "num_inference_steps": self.num_inference_steps, "resolution": self.resolution,
                "mask_grow_radius": self.mask_grow_radius}

    # -- the steps of img2img ----------------------------------------------------------------------------------

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text-encoder states (len(prompts), 77, width) for `prompts`; each distinct prompt is encoded once.
        A multi-vector token is written out as all its vectors first, as diffusers' pipelines do."""
        unique = list(dict.fromkeys(prompts))
        ids = self.tokenizer([expand_vector_tokens(prompt, self.tokenizer) for prompt in unique], padding="max_length",
                             max_length=self.tokenizer.model_max_length, truncation=True,
                             return_tensors="pt").input_ids
        states = self.text_encoder(self.runner.to_device(ids))[0]
        position = {prompt: i for i, prompt in enumerate(unique)}
        return states[self.runner.to_device(torch.tensor([position[p] for p in prompts]))]

    def conditioning(self, prompts: Sequence[str]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """The UNet's text inputs for classifier-free guidance, unconditional rows first, then one per prompt: the
        text states and the added conditioning (SDXL: pooled embedding and size/crop ids; none for SD 1.x/2.x)."""
        if self.added_conditioning is not None:
            return self.added_conditioning(prompts, self.runner.to_device)
        return torch.cat([self.unconditional(len(prompts)), self.encode_prompts(prompts)]), ()

    def unconditional(self, rows: int) -> torch.Tensor:
        """The empty prompt's text states, repeated `rows` times (encoded once per sampler)."""
        if self._unconditional is None:
            self._unconditional = self.encode_prompts([""])
        return self._unconditional.expand(rows, -1, -1)

    def to_model_input(self, image) -> torch.Tensor:
        """A PIL image as a (1, 3, side, side) tensor in [-1, 1] on the device (bilinear, antialiased resize)."""
        pixels = self.runner.to_device(torch.from_numpy(np.array(image.convert("RGB")))).permute(2, 0, 1)[None]
        pixels = F.interpolate(pixels.float() / 255.0, size=(self.resolution, self.resolution), mode="bilinear",
                               antialias=True, align_corners=False)
        return pixels * 2.0 - 1.0

    def prepare_masks(self, masks: Sequence[np.ndarray], invert: bool) -> torch.Tensor:
        """Object masks (H×W, nonzero = object) as (N, 1, side, side) floats: 1 = repaint, grown and maybe inverted."""
        window = round(self.mask_grow_radius * self.resolution / REFERENCE_RESOLUTION)
        prepared = []
        for mask in masks:
            mask = self.runner.to_device(torch.from_numpy(np.asarray(mask) > 0)).float()[None, None]
            mask = F.interpolate(mask, size=(self.resolution, self.resolution), mode="nearest")
            if window > 1:  # scipy's window for an even size: window // 2 before the pixel, the rest after it
                before, after = window // 2, window - 1 - window // 2
                mask = F.max_pool2d(F.pad(mask, (before, after, before, after)), kernel_size=window, stride=1)
            prepared.append(1.0 - mask if invert else mask)
        return torch.cat(prepared)

    def timesteps_for(self, strength: float) -> torch.Tensor:
        """Set the scheduler up for img2img at `strength` and return the timesteps to run (diffusers' convention),
        on the CPU (the caller moves them to the device)."""
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
        pixels = self.runner.layout(torch.cat([self.to_model_input(image) for image in unique]).to(self.dtype))
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
        with torch.no_grad(), self.runner.session():
            # 1. text states (and SDXL's added conditioning): unconditional rows first, then one per prompt
            text, added = self.conditioning(prompts)
            # 2. distinct images -> VAE posterior; 3. per-image generators: posterior sample, then noise
            mean, std, rows = self.encode_images(images)
            generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
            latent_shape = mean.shape[1:]
            posterior_draws, noise = [], []
            for generator in generators:
                posterior_draws.append(torch.randn(latent_shape, generator=generator))
                noise.append(torch.randn(latent_shape, generator=generator))
            rows = self.runner.to_device(torch.tensor(rows))
            clean = (mean[rows] + std[rows] * self.runner.to_device(torch.stack(posterior_draws))) * self.scaling_factor
            noise = self.runner.to_device(torch.stack(noise))
            # 4. noise to the strength's first timestep, then denoise with guidance
            schedule = self.timesteps_for(strength)  # on the CPU
            timesteps = self.runner.to_device(schedule)
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
                prediction = self.runner.unet(model_input, t, text, *added).float()
                unconditional, conditional = prediction.chunk(2)
                guided = unconditional + guidance_scale * (conditional - unconditional)
                latents = self.scheduler.step(guided, step_values[i], latents, return_dict=False, **step_kwargs)[0]
                if latent_mask is not None and not self.inpainting_unet:
                    known = clean if i == len(step_values) - 1 else \
                        self.scheduler.add_noise(clean, noise, timesteps[i + 1: i + 2].repeat(count))
                    latents = (1.0 - latent_mask) * known + latent_mask * latents
            # 5. decode, back to each real image's size, uint8
            return self.decode(latents, [image.size for image in images])

    def decode(self, latents: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> GeneratedImages:
        """VAE-decode latents and resize image i to `sizes[i]` (PIL's (width, height)); see `GeneratedImages`."""
        outputs = []
        for start in range(0, latents.shape[0], VAE_DECODE_CHUNK):
            chunk = latents[start: start + VAE_DECODE_CHUNK] / self.scaling_factor
            decoded = self.runner.decode(chunk).float()
            decoded = (decoded / 2.0 + 0.5).clamp(0.0, 1.0)
            for image, (width, height) in zip(decoded, sizes[start: start + VAE_DECODE_CHUNK]):
                if (height, width) != tuple(image.shape[-2:]):
                    image = F.interpolate(image[None], size=(height, width), mode="bilinear", antialias=True,
                                          align_corners=False)[0]
                pixels = (image * 255.0).round().to(torch.uint8)
                outputs.append(self.runner.to_host(pixels))
        return GeneratedImages(outputs)

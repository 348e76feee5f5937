"""Textual Inversion: learn one token embedding per class, the engine behind `fine_tune.py`.

The algorithm is the reference's: a new token `<class_>` starts from the embedding of an initializer
word; the images of the class, resized (bicubic) and randomly mirrored, are noised at a uniform DDPM timestep;
a random caption template ("a photo of a <class_>") conditions the frozen UNet, and the MSE between the UNet's
prediction and its target trains only the new embedding row. The target follows the scheduler's
`prediction_type`: the noise for epsilon models (SD 1.x, SD 2.x base), the velocity for v-prediction models
(SD 2.x at 768 px), as diffusers' training examples do. With `num_vectors` N > 1 (the DA-Fusion paper's
multi-vector tokens) a class has N rows `<class_>`, `<class_>_1`, ..., all written in its captions and all
started from the initializer word, as in diffusers' textual inversion example.

What is different is how the work is laid out, so that 23 classes × 1000 steps fit in minutes:

* The VAE runs once per training image and once per mirrored image; the posterior's mean and standard deviation
  are cached, and each step draws latent = mean + std·ε, which has exactly the distribution of the reference's
  per-step `latent_dist.sample()` (caching only the mean would remove that sampling noise).
* The trained vectors are a separate fp32 parameter [classes, dim]; the text encoder's embedding matrix stays
  frozen, so every other row is untouched by construction. AdamW runs per row (`PerRowAdamW`), each with its
  own step count and learning-rate schedule.
* Joint mode puts all classes in one batch. A class's caption holds only its own token, and the loss is summed
  over classes (each class's own mean), so each row's gradient is exactly the gradient of a run of that class
  alone; with per-row optimizer state, joint training is a batched form of separate runs.
* Each class draws its images, flips, captions, timesteps and noise from its own seeded generator, so a class
  gets the same random stream alone, jointly, or on any process of a multi-GPU run, and its checkpoint (vector,
  optimizer rows, step, generator state) resumes it exactly.
* SDXL (two text encoders): the class token gets a vector in each encoder, both trained from the same loss
  (`SecondEncoderTokens`), and the UNet gets SDXL's added conditioning (`sdxl_text_conditioning`). The second
  encoder's vectors are saved as `learned_embeds_2.safetensors`, as diffusers' SDXL Textual Inversion example does.
* The joint batch is cut into micro-batches whose gradients add up; in `auto` mode a micro-batch that runs out
  of accelerator memory is halved and retried, which changes nothing in the result.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from semantic_aug.core.embeddings import (LEARNED_EMBEDS_2_SAFE_NAME, LEARNED_EMBEDS_NAME, add_tokens_to_text_encoder,
                                          save_learned_embeds, save_tokens, stable_seed, token_name,
                                          vector_token_names)
from semantic_aug.core.model_family import sdxl_time_ids
from semantic_aug.core.stable_diffusion import vae_scale_factor
from semantic_aug.core.utils import StageTimer, UserError, atomic_torch_save

logger = logging.getLogger(__name__)

# Caption templates of Textual Inversion (Gal et al., 2022): 27 for objects, 19 for styles.
OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}",
    "a cropped painting in the style of {}", "a good painting in the style of {}",
    "a close-up painting in the style of {}", "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}", "a large painting in the style of {}",
)
TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}

CHECKPOINT_FORMAT = 2  # bump when the checkpoint dict changes
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)\.pt$")
VAE_ENCODE_BATCH = 8  # images per VAE call when filling the latent cache (bounded memory at 512 px)
MAX_NONFINITE_UPDATES = 5  # consecutive NaN/inf losses of a class before the run stops
LOSS_SUMMARY_FRACTION = 0.1  # the per-class log compares the mean loss of the first and last 10% of steps
# config fields that do not change the learned vectors, so a checkpoint stays valid when they change
LAYOUT_FIELDS = frozenset({"checkpointing_steps", "checkpoints_total_limit", "save_steps", "micro_batch_size",
                           "cache_latents", "resume"})


@dataclass
class TextualInversionConfig:
    """Hyperparameters of one Textual Inversion run (flag names of `fine_tune.py` in brackets).

    Attributes:
        resolution: training image side in pixels (`--resolution`).
        center_crop: crop the largest centred square before resizing (`--center_crop`).
        flip_p: probability of a horizontal flip per sample (`--flip_p`).
        train_batch_size: samples per class per micro-step (`--train_batch_size`).
        gradient_accumulation_steps: micro-steps per update (`--gradient_accumulation_steps`).
        max_train_steps: updates per class (`--max_train_steps`).
        learning_rate: the learning rate actually used (after `--scale_lr`).
        lr_scheduler: diffusers schedule name (`--lr_scheduler`); `lr_warmup_steps` its warm-up in updates.
        adam_beta1, adam_beta2, adam_weight_decay, adam_epsilon: AdamW settings (`--adam_*`).
        learnable_property: `object` or `style` caption templates (`--learnable_property`).
        initializer_token: the word whose embedding starts every class token (`--initializer-token`).
        num_vectors: vectors per class token (`--num_vectors`); 1 is the reference.
        checkpointing_steps: save resumable state every this many updates; None never (`--checkpointing_steps`).
        checkpoints_total_limit: keep at most this many checkpoints per class; None keeps all.
        save_steps: also save `learned_embeds-steps-N.bin` every this many updates; None never (`--save_steps`).
        micro_batch_size: samples per forward/backward; 0 = auto (`auto_micro_batch_start`, halved on
            out-of-memory).
        cache_latents: encode each image once (True) or with the VAE at every step as the reference (False).
        resume: resume classes from their newest checkpoint.
    """

    resolution: int
    repeats: int = 100
    center_crop: bool = False
    flip_p: float = 0.5
    train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_train_steps: int = 1000
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    learnable_property: str = "object"
    initializer_token: str = "the"
    num_vectors: int = 1
    checkpointing_steps: int | None = 500
    checkpoints_total_limit: int | None = None
    save_steps: int | None = 500
    micro_batch_size: int = 0
    cache_latents: bool = True
    resume: bool = True

    def settings(self) -> dict:
        """The fields that determine the learned vectors (stored in checkpoints and compared on resume)."""
        return {key: value for key, value in asdict(self).items() if key not in LAYOUT_FIELDS}


@dataclass
class ClassSpec:
    """One class to learn: its name, its training images, and the folder its files go to."""

    name: str
    images: list  # PIL RGB images
    output_dir: Path
    image_ids: list = field(default_factory=list)  # file paths or ids, part of the checkpoint settings

    @property
    def token(self) -> str:
        return token_name(self.name)

    @property
    def finished(self) -> bool:
        return (Path(self.output_dir) / LEARNED_EMBEDS_NAME).is_file()


# ----------------------------------------------------------------------------------------------------------
# building blocks


def preprocess_image(image, resolution: int, center_crop: bool = False) -> torch.Tensor:
    """A PIL image as the reference fed it to the VAE: optional centre square crop, bicubic resize, [-1, 1] CHW."""
    from PIL import Image

    image = image.convert("RGB")
    if center_crop:
        width, height = image.size
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    image = image.resize((resolution, resolution), resample=Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return pixels.float() / 127.5 - 1.0


def learning_rate_schedule(name: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The multiplier of diffusers' schedule `name` at update k (0-based), as a plain function of k."""
    from diffusers.optimization import get_scheduler

    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    try:
        return get_scheduler(name, optimizer=probe, num_warmup_steps=warmup_steps,
                             num_training_steps=total_steps).lr_lambdas[0]
    except ValueError as error:
        raise UserError(f"--lr_scheduler {name}: {error}") from None


class PerRowAdamW(torch.optim.Optimizer):
    """AdamW over a [rows, dim] parameter in which every row is its own run: own step count and schedule.

    The arithmetic is `torch.optim.AdamW`'s (decoupled weight decay, bias-corrected moments, eps outside the
    square root). Rows not in `active` are left exactly as they are, moments included.

    Args:
        param: the [rows, dim] parameter.
        lr: base learning rate; row r at its update k uses lr × schedule(k).
        schedule: multiplier per update index (see `learning_rate_schedule`).
        betas, eps, weight_decay: as in AdamW.
    """

    def __init__(self, param: nn.Parameter, lr: float, schedule: Callable[[int], float] = lambda step: 1.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2):
        super().__init__([param], dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.schedule = schedule
        self.state[param] = {"step": torch.zeros(param.shape[0], dtype=torch.long),
                             "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                             "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format)}

    @property
    def param(self) -> nn.Parameter:
        return self.param_groups[0]["params"][0]

    @property
    def steps(self) -> torch.Tensor:
        """Updates done per row (a CPU long tensor)."""
        return self.state[self.param]["step"]

    @torch.no_grad()
    def step(self, closure=None, active: torch.Tensor | None = None):
        """One update of the rows in `active` (a bool mask over rows; None = all rows)."""
        group, param = self.param_groups[0], self.param
        state = self.state[param]
        rows = torch.arange(param.shape[0]) if active is None else torch.nonzero(active.cpu()).flatten()
        if param.grad is None or len(rows) == 0:
            return None
        beta1, beta2 = group["betas"]
        steps = state["step"][rows] + 1
        rates = torch.tensor([group["lr"] * self.schedule(int(k) - 1) for k in steps], dtype=torch.float64)
        step_sizes = rates / (1 - beta1 ** steps.double())
        bias_correction2_sqrt = (1 - beta2 ** steps.double()).sqrt()

        def column(values: torch.Tensor) -> torch.Tensor:  # one value per row, broadcast over dim
            return values.to(device=param.device, dtype=param.dtype).unsqueeze(1)

        index = rows.to(param.device)
        grad, value = param.grad[index].to(param.dtype), param[index]
        exp_avg = state["exp_avg"][index].lerp_(grad, 1 - beta1)
        exp_avg_sq = state["exp_avg_sq"][index].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        value.mul_(1 - column(rates * group["weight_decay"]))
        denom = (exp_avg_sq.sqrt() / column(bias_correction2_sqrt)).add_(group["eps"])
        value.sub_(column(step_sizes) * exp_avg / denom)
        param[index] = value
        state["exp_avg"][index] = exp_avg
        state["exp_avg_sq"][index] = exp_avg_sq
        state["step"][rows] = steps
        return None

    def row_state(self, row: int | slice) -> dict:
        """Optimizer state of one row, or of a slice of rows that update together (CPU tensors), for a per-class
        checkpoint."""
        state = self.state[self.param]
        return {"step": int(state["step"][row].flatten()[0]), "exp_avg": state["exp_avg"][row].detach().cpu().clone(),
                "exp_avg_sq": state["exp_avg_sq"][row].detach().cpu().clone()}

    def load_row_state(self, row: int | slice, saved: dict) -> None:
        state = self.state[self.param]
        state["step"][row] = int(saved["step"])
        state["exp_avg"][row] = saved["exp_avg"].to(state["exp_avg"].device, state["exp_avg"].dtype)
        state["exp_avg_sq"][row] = saved["exp_avg_sq"].to(state["exp_avg_sq"].device, state["exp_avg_sq"].dtype)


class PlaceholderEmbedding(nn.Module):
    """The text encoder's token embedding with the placeholder rows taken from a trainable fp32 parameter.

    The wrapped embedding stays frozen; `learned[r]` is used wherever the input id is the r-th placeholder.
    """

    def __init__(self, base: nn.Embedding, token_ids: Sequence[int], vectors: torch.Tensor):
        super().__init__()
        self.base = base
        row_of_token = torch.full((base.num_embeddings,), -1, dtype=torch.long)
        row_of_token[torch.as_tensor(list(token_ids))] = torch.arange(len(token_ids))
        self.register_buffer("row_of_token", row_of_token.to(base.weight.device), persistent=False)
        self.learned = nn.Parameter(vectors.detach().to(base.weight.device, torch.float32).clone())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = self.base(input_ids)
        rows = self.row_of_token[input_ids]
        learned = self.learned[rows.clamp(min=0)].to(embeds.dtype)
        return torch.where((rows >= 0).unsqueeze(-1), learned, embeds)


@contextlib.contextmanager
def placeholder_embedding(text_encoder, token_ids: Sequence[int], vectors: torch.Tensor):
    """Swap in a `PlaceholderEmbedding` for the duration; on exit the learned rows are written into the real matrix."""
    base = text_encoder.get_input_embeddings()
    module = PlaceholderEmbedding(base, token_ids, vectors)
    text_encoder.set_input_embeddings(module)
    try:
        yield module
    finally:
        text_encoder.set_input_embeddings(base)
        with torch.no_grad():
            base.weight[torch.as_tensor(list(token_ids), device=base.weight.device)] = \
                module.learned.detach().to(base.weight.dtype)


@dataclass
class Draw:
    """The random choices of one class for one micro-step (B samples), all from the class's own generator."""

    image_index: torch.Tensor  # [B] long: which training image
    flip: torch.Tensor  # [B] bool: mirror it
    template_index: torch.Tensor  # [B] long: which caption template
    timesteps: torch.Tensor  # [B] long in [0, num_train_timesteps)
    noise: torch.Tensor  # [B, C, h, w] the diffusion noise ε (the regression target for epsilon models)
    latent_noise: torch.Tensor  # [B, C, h, w] the ε of the VAE posterior sample

    def __len__(self) -> int:
        return len(self.image_index)


class EpochOrder:
    """The reference's image order: epochs of `num_images × repeats` samples, shuffled, each image `repeats` times
    per epoch (a DataLoader with `shuffle=True` over the repeated dataset); batches run on across epochs.

    Args:
        num_images: the class's training images.
        repeats: passes over the images per epoch (`--repeats`).
    """

    def __init__(self, num_images: int, repeats: int):
        self.num_images, self.repeats = num_images, repeats
        self.order = torch.zeros(0, dtype=torch.long)
        self.position = 0

    def take(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """The next `count` image indices; a new epoch's permutation is drawn from `generator` when one runs out."""
        taken = []
        while count > 0:
            if self.position >= len(self.order):
                self.order = torch.randperm(self.num_images * self.repeats, generator=generator) % self.num_images
                self.position = 0
            part = self.order[self.position: self.position + count]
            taken.append(part)
            self.position += len(part)
            count -= len(part)
        return torch.cat(taken) if taken else torch.zeros(0, dtype=torch.long)

    def state_dict(self) -> dict:
        return {"order": self.order.clone(), "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.order, self.position = state["order"].clone(), int(state["position"])


def draw_batch(generator: torch.Generator, image_index: torch.Tensor, num_templates: int, num_train_timesteps: int,
               latent_shape: Sequence[int], flip_p: float) -> Draw:
    """Draw one class's micro-batch for the images `image_index` (from its `EpochOrder`). The order of draws is
    fixed: it is what makes checkpoints resume exactly."""
    batch_size = len(image_index)
    flip = torch.rand(batch_size, generator=generator) < flip_p
    template_index = torch.randint(num_templates, (batch_size,), generator=generator)
    timesteps = torch.randint(num_train_timesteps, (batch_size,), generator=generator)
    noise = torch.randn((batch_size, *latent_shape), generator=generator)
    latent_noise = torch.randn((batch_size, *latent_shape), generator=generator)
    return Draw(image_index, flip, template_index, timesteps, noise, latent_noise)


class LatentSource:
    """Scaled VAE posterior (mean, std) of each training image and of its mirror image.

    With `cache=True` the VAE runs once here; otherwise `sample` encodes the chosen images at every call, as the
    reference did. Either way a latent is mean + std·ε with the caller's ε.
    """

    def __init__(self, vae, pixels: torch.Tensor, weight_dtype: torch.dtype, device: torch.device, cache: bool):
        self.vae, self.pixels, self.weight_dtype, self.device = vae, pixels, weight_dtype, device
        self.scale = float(vae.config.scaling_factor)
        self.mean = self.std = None
        if cache:
            both = torch.stack([pixels, pixels.flip(-1)], dim=1).flatten(0, 1)  # [N*2, 3, H, W], mirror second
            chunks = [self.encode(both[i: i + VAE_ENCODE_BATCH]) for i in range(0, len(both), VAE_ENCODE_BATCH)]
            mean, std = zip(*chunks)
            self.mean = torch.cat(mean).unflatten(0, (len(pixels), 2))
            self.std = torch.cat(std).unflatten(0, (len(pixels), 2))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(images.to(self.device, self.weight_dtype)).latent_dist
        return posterior.mean.float() * self.scale, posterior.std.float() * self.scale

    def sample(self, draw: Draw) -> torch.Tensor:
        """The scaled latents of a draw's images (mirrored where `draw.flip`), float32 on the device."""
        if self.mean is not None:
            index, flip = draw.image_index.to(self.device), draw.flip.long().to(self.device)
            mean, std = self.mean[index, flip], self.std[index, flip]
        else:
            images = self.pixels[draw.image_index]
            images = torch.where(draw.flip[:, None, None, None], images.flip(-1), images)
            mean, std = self.encode(images)
        return mean + std * draw.latent_noise.to(self.device)


def enable_gradient_checkpointing(text_encoder, unet) -> None:
    """Recompute activations in the backward pass of the UNet and the text encoder (less memory, more compute)."""
    unet.enable_gradient_checkpointing()
    enable = getattr(text_encoder, "activation_checkpointing_enable", None)  # transformers >= 5 renamed it
    (enable or text_encoder.gradient_checkpointing_enable)()
    text_encoder.train()  # transformers checkpoints only in training mode; CLIP has no dropout


def prepare_models(text_encoder, vae, unet, accelerator, gradient_checkpointing: bool = False,
                   channels_last: bool = False) -> torch.dtype:
    """Freeze the models, move them to the accelerator's device and cast the frozen VAE/UNet to the mixed precision.

    The text encoder stays fp32 (autocast runs its matmuls in low precision), as the diffusers example keeps it.

    Returns:
        The weight dtype of the VAE and UNet.
    """
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for model in (text_encoder, vae, unet):
        model.requires_grad_(False)
        model.eval()
    for model in (vae, unet):
        model.to(accelerator.device)
        if weight_dtype != torch.float32:  # (diffusers warns on every dtype cast, so cast only when needed)
            model.to(dtype=weight_dtype)
    text_encoder.to(accelerator.device, dtype=torch.float32)
    unet.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if gradient_checkpointing:
        enable_gradient_checkpointing(text_encoder, unet)
    if accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN time and pick its fastest convolutions
    return weight_dtype


PREDICTION_TYPES = ("epsilon", "v_prediction")  # the UNet targets Textual Inversion can train against


def check_prediction_type(noise_scheduler) -> str:
    """The scheduler's `prediction_type`, or a `UserError` if Textual Inversion has no loss target for it."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type not in PREDICTION_TYPES:
        raise UserError(f"the model's scheduler has prediction_type {prediction_type!r}; textual inversion trains "
                        f"only {' or '.join(PREDICTION_TYPES)} models")
    return prediction_type


def loss_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict from the noisy latents: the noise for an epsilon model, the velocity
    (`get_velocity`) for a v-prediction model, as diffusers' training examples do."""
    if check_prediction_type(noise_scheduler) == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    return noise


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def find_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """The `checkpoint-N.pt` files of a class folder as (N, path), oldest first."""
    if not Path(folder).is_dir():
        return []
    found = [(int(match.group(1)), path) for path in Path(folder).iterdir()
             if (match := CHECKPOINT_PATTERN.match(path.name))]
    return sorted(found)


# ----------------------------------------------------------------------------------------------------------
# training


@dataclass(frozen=True)
class TrainingSpeed:
    """How the frozen models run; none of it changes what is learned beyond float rounding.

    Args:
        gradient_checkpointing: recompute activations in the backward pass (less memory, ~30% slower).
        compile: run the UNet through `torch.compile`.
        channels_last: store the UNet's conv weights channels-last (faster convolutions on tensor cores).
    """

    gradient_checkpointing: bool = False
    compile: bool = False
    channels_last: bool = False


# Latents wider than SD v1's 64² (SD 2.x at 768², SDXL at 1024²) hold several GB of activations per sample without
# gradient checkpointing, so the automatic micro-batch search starts at one class's batch there instead of the whole
# joint step: every joint batch is a multiple of it, its halves divide it too (a compiled UNet sees one batch shape),
# and it skips the out-of-memory attempts (each a compilation with `--compile`) that 1024² batches of 46 or 92 cost.
AUTO_MICRO_BATCH_FULL_STEP_LATENT_SIDE = 64


def auto_micro_batch_start(config: TextualInversionConfig, latent_side: int) -> int:
    """The micro-batch the automatic search tries first: 0 (the whole step) for latents up to 64², else one class's
    `train_batch_size`."""
    return 0 if latent_side <= AUTO_MICRO_BATCH_FULL_STEP_LATENT_SIDE else config.train_batch_size


class TextualInversionTrainer:
    """Learns class tokens for groups of classes with shared, frozen Stable Diffusion parts.

    Args:
        tokenizer, text_encoder, vae, unet, noise_scheduler: from `semantic_aug.core.stable_diffusion.load_sd_components`.
        config: the hyperparameters.
        accelerator: an `accelerate.Accelerator` (device, mixed precision, main process, trackers).
        speed: memory and speed options (`TrainingSpeed`; default: none).
        run_settings: extra values that identify a run in checkpoints (model, dataset, seed, ...).
        second_encoder: SDXL's (tokenizer_2, text_encoder_2); the tokens then get a trained vector in both.
    """

    def __init__(self, tokenizer, text_encoder, vae, unet, noise_scheduler, config: TextualInversionConfig,
                 accelerator, speed: TrainingSpeed = TrainingSpeed(), run_settings: dict | None = None,
                 second_encoder: tuple | None = None):
        self.tokenizer, self.text_encoder, self.vae, self.unet = tokenizer, text_encoder, vae, unet
        self.tokenizer_2, self.text_encoder_2 = second_encoder or (None, None)
        if self.text_encoder_2 is not None:  # frozen and fp32, as the first encoder
            self.text_encoder_2.requires_grad_(False)
            self.text_encoder_2.eval()
            self.text_encoder_2.to(accelerator.device, dtype=torch.float32)
            if speed.gradient_checkpointing:
                enable = getattr(self.text_encoder_2, "activation_checkpointing_enable", None)
                (enable or self.text_encoder_2.gradient_checkpointing_enable)()
                self.text_encoder_2.train()
        self.noise_scheduler = noise_scheduler
        self.accelerator = accelerator
        self.device = accelerator.device
        check_prediction_type(noise_scheduler)
        self.weight_dtype = prepare_models(text_encoder, vae, unet, accelerator, speed.gradient_checkpointing,
                                           speed.channels_last)
        self.unet_forward = torch.compile(unet) if speed.compile else unet
        self.run_settings = dict(run_settings or {})
        self.micro_batch_size = 0  # auto mode settles on a size at the first step (see `TrainingGroup.backward`)
        self.configure(config)

    def configure(self, config: TextualInversionConfig) -> TextualInversionConfig:
        """Use `config` for the next groups (the models stay prepared); returns it."""
        self.config = config
        self.templates = TEMPLATES[config.learnable_property]
        self.schedule = learning_rate_schedule(config.lr_scheduler, config.lr_warmup_steps, config.max_train_steps)
        side = config.resolution // vae_scale_factor(self.vae)
        self.latent_shape = (self.unet.config.in_channels, side, side)
        if config.micro_batch_size:
            self.micro_batch_size = config.micro_batch_size
        elif not self.micro_batch_size:  # auto, not yet settled by an earlier group
            self.micro_batch_size = auto_micro_batch_start(config, side)
        self.initializer_vector = self._initializer_vector(config.initializer_token)
        if config.num_vectors < 1:
            raise UserError(f"--num_vectors must be at least 1, got {config.num_vectors}")
        if self.text_encoder_2 is not None:
            self.initializer_vector_2 = self._initializer_vector(config.initializer_token, self.tokenizer_2,
                                                                 self.text_encoder_2)
        return config

    def _initializer_vector(self, word: str, tokenizer=None, text_encoder=None) -> torch.Tensor:
        tokenizer, text_encoder = tokenizer or self.tokenizer, text_encoder or self.text_encoder
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise UserError(f"--initializer-token {word!r} is {len(ids)} tokens; it must be a single token "
                            f"(e.g. 'the')")
        return text_encoder.get_input_embeddings().weight[ids[0]].detach().float().cpu().clone()

    def start(self, classes: Sequence[ClassSpec], seed: int) -> "TrainingGroup":
        """Set up a group of classes trained together (resumed from checkpoints when `config.resume`)."""
        return TrainingGroup(self, list(classes), seed)

    def learn(self, classes: Sequence[ClassSpec], seed: int,
              on_step: Callable | None = None) -> dict[str, torch.Tensor]:
        """Train `classes` together until each has `max_train_steps` updates; write each class's files when it ends.

        Args:
            classes: the classes (all trained in one batch; pass one class for the reference's sequential runs).
            seed: with the class name, seeds each class's random stream.
            on_step: called with the group after every update (progress hooks, tests).

        Returns:
            token -> learned vector [dim] (CPU, fp32).
        """
        with self.start(classes, seed) as group:
            group.train(on_step)
            return group.learned_embeddings()


class TrainingGroup:
    """The state of classes trained in one batch: tokens, data, per-class generators, optimizer rows."""

    def __init__(self, trainer: TextualInversionTrainer, classes: list[ClassSpec], seed: int):
        if not classes:
            raise ValueError("a training group needs at least one class")
        self.trainer, self.classes, self.seed = trainer, classes, seed
        config = trainer.config
        self.tokens = [spec.token for spec in classes]
        self.num_vectors = config.num_vectors
        start = trainer.initializer_vector if self.num_vectors == 1 else \
            trainer.initializer_vector.expand(self.num_vectors, -1)
        # the learned parameter has one row per vector: class r owns rows r*N ... r*N+N-1 (`self.rows(r)`)
        self.token_ids = add_tokens_to_text_encoder(trainer.tokenizer, trainer.text_encoder,
                                                    {token: start for token in self.tokens})
        self.second = SecondEncoderTokens(self) if trainer.text_encoder_2 is not None else None
        self.caption_ids = [self._caption_ids(" ".join(vector_token_names(token, self.num_vectors)))
                            for token in self.tokens]
        self.latents = [LatentSource(trainer.vae, self._pixels(spec), trainer.weight_dtype, trainer.device,
                                     config.cache_latents) for spec in classes]
        self.generators = [torch.Generator().manual_seed(stable_seed(seed, spec.name)) for spec in classes]
        self.epoch_orders = [EpochOrder(len(latents.pixels), config.repeats) for latents in self.latents]
        self.losses: list[list[float]] = [[] for _ in classes]
        self.nonfinite_updates = [0] * len(classes)  # consecutive updates skipped for a NaN/inf loss, per class
        self.settings = [dict(trainer.run_settings, **config.settings(), seed=seed, token=spec.token,
                              images=[str(i) for i in spec.image_ids]) for spec in classes]
        self._context = placeholder_embedding(trainer.text_encoder, self.token_ids,
                                              trainer.initializer_vector.expand(len(self.token_ids), -1))
        self.embedding = self._context.__enter__()
        try:
            self.optimizer = PerRowAdamW(self.embedding.learned, lr=config.learning_rate, schedule=trainer.schedule,
                                         betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
                                         weight_decay=config.adam_weight_decay)
            self.scaler = torch.amp.GradScaler(trainer.device.type) if trainer.accelerator.mixed_precision == "fp16" \
                else None
            for row in range(len(classes)):
                if config.resume:
                    self._resume(row)
                else:
                    self._discard_checkpoints(row)
        except BaseException:
            self._context.__exit__(None, None, None)
            if self.second is not None:
                self.second.close(None, None, None)
            raise

    # -- context management: the placeholder embedding is removed (learned rows written back) on exit ----------

    def __enter__(self) -> "TrainingGroup":
        return self

    def __exit__(self, *exc_info) -> None:
        self._context.__exit__(*exc_info)
        if self.second is not None:
            self.second.close(*exc_info)

    # -- data --------------------------------------------------------------------------------------------------

    def _pixels(self, spec: ClassSpec) -> torch.Tensor:
        if not spec.images:
            raise UserError(f"class {spec.name!r} has no training images")
        config = self.trainer.config
        return torch.stack([preprocess_image(image, config.resolution, config.center_crop) for image in spec.images])

    def rows(self, row: int) -> int | slice:
        """The learned-parameter rows of class `row`: one index for single-vector tokens, a slice of N otherwise."""
        return row if self.num_vectors == 1 else slice(row * self.num_vectors, (row + 1) * self.num_vectors)

    def _caption_ids(self, placeholder: str) -> torch.Tensor:
        """Every caption template filled with `placeholder` (a class's vector tokens joined by spaces), tokenized:
        [templates, 77], or for SDXL both tokenizers' [templates, 2, 77]."""
        captions = [template.format(placeholder) for template in self.trainer.templates]
        tokenizers = [self.trainer.tokenizer] + ([self.trainer.tokenizer_2] if self.second is not None else [])
        ids = [tokenizer(captions, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                         return_tensors="pt").input_ids for tokenizer in tokenizers]
        return ids[0] if len(ids) == 1 else torch.stack(ids, dim=1)

    def draw(self, row: int) -> Draw:
        """The next micro-batch of class `row`, from its generator."""
        trainer = self.trainer
        image_index = self.epoch_orders[row].take(trainer.config.train_batch_size, self.generators[row])
        return draw_batch(self.generators[row], image_index, len(trainer.templates),
                          trainer.noise_scheduler.config.num_train_timesteps, trainer.latent_shape, trainer.config.flip_p)

    # -- the loss ----------------------------------------------------------------------------------------------

    def _inputs(self, draws: Sequence[tuple[int, Draw]]):
        """Concatenate the draws of several classes into one batch: (noisy latents, timesteps, input ids, target)."""
        scheduler, device = self.trainer.noise_scheduler, self.trainer.device
        latents = torch.cat([self.latents[row].sample(draw) for row, draw in draws])
        noise = torch.cat([draw.noise for _, draw in draws]).to(device)
        timesteps = torch.cat([draw.timesteps for _, draw in draws]).to(device)
        input_ids = torch.cat([self.caption_ids[row][draw.template_index] for row, draw in draws]).to(device)
        noisy_latents = scheduler.add_noise(latents, noise, timesteps)
        return noisy_latents, timesteps, input_ids, loss_target(scheduler, latents, noise, timesteps)

    def _per_sample_loss(self, noisy_latents, timesteps, input_ids, target) -> torch.Tensor:
        trainer = self.trainer
        with trainer.accelerator.autocast():
            if self.second is None:
                hidden_states, added_cond_kwargs = trainer.text_encoder(input_ids)[0], None
            else:
                hidden_states, added_cond_kwargs = sdxl_text_conditioning(
                    (trainer.text_encoder, trainer.text_encoder_2), input_ids, trainer.config.resolution)
            prediction = trainer.unet_forward(noisy_latents, timesteps, hidden_states,
                                              added_cond_kwargs=added_cond_kwargs, return_dict=False)[0]
        return F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))

    @torch.no_grad()
    def loss(self, draws: Sequence[tuple[int, Draw]]) -> torch.Tensor:
        """Per-sample denoising loss of `draws` (no gradient), e.g. to watch a fixed batch."""
        return self._per_sample_loss(*self._inputs(draws))

    def backward(self, draws: Sequence[tuple[int, Draw]], loss_divisor: float) -> torch.Tensor:
        """Accumulate the gradient of Σ_samples loss / `loss_divisor` into the learned rows; micro-batched.

        With `loss_divisor` = batch size × accumulation steps, each row's gradient is that of its own class's
        mean loss, whatever other classes share the batch.

        Returns:
            The per-sample losses (detached), in the order of `draws`.
        """
        trainer = self.trainer
        noisy_latents, timesteps, input_ids, target = self._inputs(draws)
        losses, start, total = [], 0, len(timesteps)
        while start < total:
            size = min(trainer.micro_batch_size or total, total)
            part = slice(start, start + size)
            try:
                per_sample = self._per_sample_loss(noisy_latents[part], timesteps[part], input_ids[part], target[part])
                loss = per_sample.sum() / loss_divisor
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            except RuntimeError as error:  # CUDA's OutOfMemoryError is a RuntimeError
                if not _is_out_of_memory(error):
                    raise
                self._shrink_micro_batch(size)
                continue
            if trainer.config.micro_batch_size == 0 and trainer.micro_batch_size == 0:
                trainer.micro_batch_size = size  # auto: the whole batch fitted; keep it
            losses.append(per_sample.detach())
            start += size
        return torch.cat(losses)

    def _shrink_micro_batch(self, size: int) -> None:
        trainer = self.trainer
        if trainer.config.micro_batch_size != 0 or size == 1:
            raise UserError(f"out of accelerator memory with a micro-batch of {size} samples; pass a smaller "
                            f"--micro-batch-size (0 picks one), --gradient_checkpointing or a lower --resolution")
        trainer.micro_batch_size = size // 2
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        logger.info("out of memory at a micro-batch of %d samples; retrying with %d", size, size // 2)

    # -- the loop ----------------------------------------------------------------------------------------------

    @property
    def steps(self) -> list[int]:
        """Updates done per class."""
        return self.optimizer.steps[::self.num_vectors].tolist()

    def active_rows(self) -> list[int]:
        return [row for row, step in enumerate(self.steps) if step < self.trainer.config.max_train_steps]

    def train_step(self) -> dict[int, float]:
        """One update of every unfinished class; returns row -> its mean loss over the update's samples."""
        config = self.trainer.config
        active = self.active_rows()
        divisor = config.train_batch_size * config.gradient_accumulation_steps
        loss_sums = torch.zeros(len(self.classes), device=self.trainer.device)
        for _ in range(config.gradient_accumulation_steps):
            draws = [(row, self.draw(row)) for row in active]
            per_sample = self.backward(draws, divisor)
            rows = torch.cat([torch.full((len(draw),), row, dtype=torch.long) for row, draw in draws])
            loss_sums.index_add_(0, rows.to(per_sample.device), per_sample.float())
        mask = torch.zeros(len(self.classes), dtype=torch.bool)
        mask[active] = True
        self._skip_nonfinite(loss_sums, active, mask)
        optimizers = [self.optimizer] + ([self.second.optimizer] if self.second is not None else [])
        rows = mask.repeat_interleave(self.num_vectors)  # every vector of an active class
        for optimizer in optimizers:
            if self.scaler is not None:
                self.scaler.step(optimizer, active=rows)
            else:
                optimizer.step(active=rows)
            optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.update()
        means = (loss_sums / divisor).tolist()
        return {row: means[row] for row in active}

    def _skip_nonfinite(self, loss_sums: torch.Tensor, active: list[int], mask: torch.Tensor) -> None:
        """Leave out of this update every class whose loss is NaN/inf (its token keeps its value); stop the run
        once a class has had `MAX_NONFINITE_UPDATES` such updates in a row. Other classes are unaffected: each
        token's gradient comes from its own samples only."""
        finite = torch.isfinite(loss_sums).tolist()
        for row in active:
            if finite[row]:
                self.nonfinite_updates[row] = 0
                continue
            mask[row] = False
            self.nonfinite_updates[row] += 1
            name = self.classes[row].name
            logger.warning("class %s: non-finite loss at update %d; update skipped", name, self.steps[row] + 1)
            if self.nonfinite_updates[row] >= MAX_NONFINITE_UPDATES:
                raise UserError(f"class {name!r}: the loss was NaN/inf for {MAX_NONFINITE_UPDATES} updates in a row "
                                f"(fp16 overflow or a broken model); use --mixed_precision bf16 or no, or a lower "
                                f"--learning_rate")

    def train(self, on_step: Callable | None = None) -> None:
        """Run updates until every class has `max_train_steps`; checkpoint, save and log along the way."""
        trainer, config = self.trainer, self.trainer.config
        first_step = min(self.steps)
        timer = StageTimer("textual inversion", "updates")
        with tqdm(total=config.max_train_steps - first_step, desc=f"textual inversion, {len(self.classes)} class(es)",
                  disable=not trainer.accelerator.is_local_main_process) as progress:  # closed on errors too
            while self.active_rows():
                previous = self.steps
                step_losses = self.train_step()
                for row, loss in step_losses.items():
                    if self.steps[row] == previous[row]:
                        continue  # fp16 overflow: the scaler skipped this update
                    self.losses[row].append(loss)
                    self._after_update(row)
                progress.set_postfix(loss=f"{sum(step_losses.values()) / len(step_losses):.4f}")
                trainer.accelerator.log({f"loss/{self.classes[row].name}": loss
                                         for row, loss in step_losses.items()}, step=max(self.steps))
                done = min(self.steps) - first_step - progress.n
                progress.update(done)
                timer.step(done)
                if on_step is not None:
                    on_step(self)
        if timer.units and trainer.accelerator.is_local_main_process:
            logger.info(timer.summary())

    def _after_update(self, row: int) -> None:
        config, step = self.trainer.config, self.steps[row]
        spec = self.classes[row]
        if config.save_steps and step % config.save_steps == 0 and step < config.max_train_steps:
            save_learned_embeds(spec.output_dir, spec.token, self.vector(row), name=f"learned_embeds-steps-{step}.bin")
        if config.checkpointing_steps and step % config.checkpointing_steps == 0 and step < config.max_train_steps:
            self.save_checkpoint(row)
        if step >= config.max_train_steps:
            self._finish(row)

    def _finish(self, row: int) -> None:
        spec, losses = self.classes[row], self.losses[row]
        if self.second is not None:  # before the first encoder's `.bin`, which marks the class finished
            save_tokens({spec.token: self.second.vector(row)}, Path(spec.output_dir) / LEARNED_EMBEDS_2_SAFE_NAME)
        save_learned_embeds(spec.output_dir, spec.token, self.vector(row))
        if losses:
            count = max(1, math.ceil(len(losses) * LOSS_SUMMARY_FRACTION))
            logger.info("class %s: loss %.4f (first %d updates) -> %.4f (last %d) in %d updates; saved %s",
                        spec.name, np.mean(losses[:count]), count, np.mean(losses[-count:]), count, len(losses),
                        Path(spec.output_dir) / LEARNED_EMBEDS_NAME)

    def vector(self, row: int) -> torch.Tensor:
        """Class `row`'s learned token: [dim], or [N, dim] for N vectors."""
        return self.embedding.learned[self.rows(row)].detach().float().cpu().clone()

    def learned_embeddings(self) -> dict[str, torch.Tensor]:
        return {token: self.vector(row) for row, token in enumerate(self.tokens)}

    # -- checkpoints -------------------------------------------------------------------------------------------

    def save_checkpoint(self, row: int) -> Path:
        """Write class `row`'s resumable state to `checkpoint-{step}.pt` and prune old ones beyond the limit."""
        spec, config = self.classes[row], self.trainer.config
        step = self.steps[row]
        state = {"format": CHECKPOINT_FORMAT, "token": spec.token, "embedding": self.vector(row),
                 "optimizer": self.optimizer.row_state(self.rows(row)), "generator": self.generators[row].get_state(),
                 "epoch_order": self.epoch_orders[row].state_dict(), "losses": list(self.losses[row]), "settings": self.settings[row],
                 "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None}
        if self.second is not None:
            state.update(embedding_2=self.second.vector(row),
                         optimizer_2=self.second.optimizer.row_state(self.rows(row)))
        path = Path(spec.output_dir) / f"checkpoint-{step}.pt"
        atomic_torch_save(state, path)
        if config.checkpoints_total_limit:
            for _, old in find_checkpoints(spec.output_dir)[:-config.checkpoints_total_limit]:
                old.unlink(missing_ok=True)
        return path

    def _discard_checkpoints(self, row: int) -> None:
        """`--resume_from_checkpoint none`: remove the class's old checkpoints, so no later resume can pick one."""
        for _, path in find_checkpoints(self.classes[row].output_dir):
            logger.info("class %s: discarding %s", self.classes[row].name, path)
            path.unlink(missing_ok=True)

    def _resume(self, row: int) -> None:
        """Load class `row`'s newest checkpoint if there is one."""
        spec = self.classes[row]
        checkpoints = find_checkpoints(spec.output_dir)
        if not checkpoints:
            return
        step, path = checkpoints[-1]
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unreadable file is reported the same way
            raise UserError(f"cannot read checkpoint {path} ({type(error).__name__}); "
                            f"delete it to restart the class") from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or state.get("token") != spec.token:
            raise UserError(f"checkpoint {path} is not a textual inversion checkpoint of {spec.token}; delete it")
        changed = sorted(key for key in set(state["settings"]) | set(self.settings[row])
                         if state["settings"].get(key) != self.settings[row].get(key))
        if changed:
            raise UserError(f"checkpoint {path} was written with other settings ({', '.join(changed)}); delete it or "
                            f"pass --resume_from_checkpoint none")
        with torch.no_grad():
            self.embedding.learned[self.rows(row)] = state["embedding"].to(self.embedding.learned.device)
        self.optimizer.load_row_state(self.rows(row), state["optimizer"])
        if self.second is not None:
            if "embedding_2" not in state:
                raise UserError(f"checkpoint {path} holds no second-encoder vector; delete it to restart the class")
            with torch.no_grad():
                self.second.embedding.learned[self.rows(row)] = state["embedding_2"].to(self.second.embedding.learned.device)
            self.second.optimizer.load_row_state(self.rows(row), state["optimizer_2"])
        self.generators[row].set_state(state["generator"])
        self.epoch_orders[row].load_state_dict(state["epoch_order"])
        self.losses[row] = list(state["losses"])
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        logger.info("class %s: resuming at update %d from %s", spec.name, step, path)


# ----------------------------------------------------------------------------------------------------------
# SDXL: a second text encoder


def sdxl_text_conditioning(text_encoders: Sequence, input_ids: torch.Tensor, resolution: int):
    """SDXL's UNet inputs for caption ids [B, 2, 77] (one row per tokenizer), as diffusers' SDXL Textual Inversion
    example computes them: both encoders' penultimate hidden states concatenated, the second encoder's pooled
    projection, and the size/crop ids of a `resolution`² training image (resized whole: crop (0, 0)).

    Returns:
        (encoder_hidden_states [B, 77, width_1 + width_2], added_cond_kwargs).
    """
    states = []
    for index, text_encoder in enumerate(text_encoders):
        output = text_encoder(input_ids[:, index], output_hidden_states=True)
        states.append(output.hidden_states[-2])
    pooled = output[0]
    time_ids = torch.tensor([sdxl_time_ids(resolution)], device=pooled.device).expand(len(pooled), -1)
    return torch.cat(states, dim=-1), {"text_embeds": pooled, "time_ids": time_ids}


class SecondEncoderTokens:
    """SDXL: the group's class tokens in the second text encoder, each a trained fp32 row with its own AdamW state,
    updated together with the first encoder's rows from the same loss.

    Args:
        group: the `TrainingGroup` (its tokens, the trainer's `tokenizer_2`, `text_encoder_2` and hyperparameters).
    """

    def __init__(self, group: "TrainingGroup"):
        trainer, config = group.trainer, group.trainer.config
        initial = trainer.initializer_vector_2
        start = initial if group.num_vectors == 1 else initial.expand(group.num_vectors, -1)
        self.group = group
        self.token_ids = add_tokens_to_text_encoder(trainer.tokenizer_2, trainer.text_encoder_2,
                                                    {token: start for token in group.tokens})
        self._context = placeholder_embedding(trainer.text_encoder_2, self.token_ids,
                                              initial.expand(len(self.token_ids), -1))
        self.embedding = self._context.__enter__()
        self.optimizer = PerRowAdamW(self.embedding.learned, lr=config.learning_rate, schedule=trainer.schedule,
                                     betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
                                     weight_decay=config.adam_weight_decay)

    def vector(self, row: int) -> torch.Tensor:
        """Class `row`'s second-encoder token: [dim], or [N, dim] for N vectors."""
        return self.embedding.learned[self.group.rows(row)].detach().float().cpu().clone()

    def close(self, *exc_info) -> None:
        """Write the learned rows into the second encoder's embedding matrix and remove the placeholder module."""
        self._context.__exit__(*exc_info)

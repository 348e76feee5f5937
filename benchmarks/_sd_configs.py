"""Stable Diffusion v1.4 with random weights, built from its published architecture configs.

Benchmarks need the real model's sizes and kernels, not its weights (which cannot be downloaded offline). The
folder this writes loads through the same `from_pretrained` path as `CompVis/stable-diffusion-v1-4`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

SD_V1_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8)
SD_V1_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
    scaling_factor=0.18215)
CLIP_VIT_L14_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                         projection_dim=768)
SD_V1_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                       skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
RANDOM_WEIGHTS_SEED = 0


def build_random_sd_v1(output_dir: str | os.PathLike, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float16) -> Path:
    """Save a random-weight SD v1.4 pipeline (UNet, VAE, CLIP ViT-L/14 text encoder, PNDM) as a diffusers folder.

    Args:
        output_dir: the folder to create (kept if it already holds a model).
        device: where the weights are initialised (a GPU is much faster than the CPU).
        dtype: the saved weight dtype.

    Returns:
        `output_dir`.
    """
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from semantic_aug.stable_diffusion import load_tokenizer

    output_dir = Path(output_dir)
    if (output_dir / "model_index.json").is_file():
        return output_dir
    tokenizer = load_tokenizer()
    torch.manual_seed(RANDOM_WEIGHTS_SEED)
    with torch.device(device):
        unet = UNet2DConditionModel(**SD_V1_UNET)
        vae = AutoencoderKL(**SD_V1_VAE)
        special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_VIT_L14_TEXT, **special))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler(**SD_V1_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False).to(dtype=dtype)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".sd-v1-random-", dir=output_dir.parent))
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
        os.replace(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir

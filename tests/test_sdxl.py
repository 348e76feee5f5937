"""Stable Diffusion XL through the same code as SD 1.x: the family read from the model folder, the sampler against
diffusers' own SDXL img2img pipeline, Textual Inversion with a vector per text encoder that stock diffusers loads,
and the whole pipeline of scripts on the tiny SDXL."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from semantic_aug.acceleration import Acceleration, ReferenceRunner
from semantic_aug.core.embeddings import add_tokens_to_text_encoder
from semantic_aug.core.model_family import describe_family, detect_family
from semantic_aug.core.stable_diffusion import resolve_model_path
from semantic_aug.core.utils import UserError
from semantic_aug.stages.augmentations import DiffusionSampler

STEPS = 4  # scheduler steps; strength 0.5 runs 2 of them


@pytest.fixture(scope="module")
def tiny_sdxl_path() -> str:
    return resolve_model_path("tiny-sdxl")


def random_image(seed: int, size=(64, 64)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def test_family_is_read_from_the_model_folder(tiny_model_path, tiny_sdxl_path, tmp_path):
    """sd1 (`tiny`), sdxl (`tiny-sdxl`), and sd2: the tiny SD with SD 2.x's OpenCLIP activation (`gelu`) and linear
    transformer projections; a folder without a model index is a one-line error."""
    sd2 = tmp_path / "tiny-sd2"
    shutil.copytree(tiny_model_path, sd2)
    config_path = sd2 / "text_encoder" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "hidden_act": "gelu"}))
    assert [detect_family(path) for path in (tiny_model_path, sd2, tiny_sdxl_path)] == ["sd1", "sd2", "sdxl"]
    sdxl = describe_family(tiny_sdxl_path)
    assert sdxl.text_encoders == ("text_encoder", "text_encoder_2") and sdxl.tokenizers == ("tokenizer", "tokenizer_2")
    assert sdxl.resolution == 64 and describe_family(tiny_model_path).text_encoders == ("text_encoder",)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is not a Stable Diffusion model folder"):
        detect_family(tmp_path / "empty")


def test_tiny_sdxl_is_a_diffusers_sdxl_folder(tiny_sdxl_path):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_sdxl_path)
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == "<|endoftext|>"
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert len(pipe.tokenizer) == len(pipe.tokenizer_2) == 49408  # the real CLIP vocabulary


def add_token_to_both_encoders(sampler, token="<bench>"):
    generator = torch.Generator().manual_seed(3)
    for tokenizer, text_encoder in ((sampler.tokenizer, sampler.text_encoder),
                                    (sampler.tokenizer_2, sampler.text_encoder_2)):
        width = text_encoder.get_input_embeddings().weight.shape[1]
        add_tokens_to_text_encoder(tokenizer, text_encoder, {token: torch.randn(width, generator=generator)})


@pytest.mark.parametrize("acceleration", [Acceleration.none(), Acceleration()], ids=["reference", "default"])
def test_sampler_matches_diffusers_sdxl_img2img(tiny_sdxl_path, acceleration):
    """One image through our sampler equals diffusers' SDXL img2img pipeline from the same image, prompt (with a
    learned token in both encoders) and seed, without acceleration and with the default options (the shared guidance
    prefix is off for SDXL)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    sampler = DiffusionSampler.from_pretrained("tiny-sdxl", num_inference_steps=STEPS, acceleration=acceleration)
    assert sampler.added_conditioning is not None
    if acceleration.is_reference:
        assert isinstance(sampler.runner, ReferenceRunner)
    else:
        assert sampler.runner.shared_prefix == []
    add_token_to_both_encoders(sampler)
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=sampler.vae, text_encoder=sampler.text_encoder, text_encoder_2=sampler.text_encoder_2,
        tokenizer=sampler.tokenizer, tokenizer_2=sampler.tokenizer_2, unet=sampler.unet, scheduler=sampler.scheduler,
        requires_aesthetics_score=False, force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    image = random_image(0)
    for strength, guidance_scale in ((0.5, 7.5), (1.0, 3.0)):
        ours = sampler.img2img([image], ["a photo of a <bench>"], [7], strength, guidance_scale).pil(0)
        theirs = pipe(prompt="a photo of a <bench>", image=image, strength=strength, guidance_scale=guidance_scale,
                      num_inference_steps=STEPS, generator=[torch.Generator().manual_seed(7)]).images[0]
        assert np.abs(pixels(ours) - pixels(theirs)).max() <= 1
    other = sampler.img2img([image], ["a photo of a car"], [7], 0.5, 7.5).pil(0)
    assert not np.array_equal(pixels(other), pixels(ours))  # the prompt reaches the UNet

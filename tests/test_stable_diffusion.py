"""The one Stable Diffusion loader: the embedded tiny model, the real SD1.x tokenizer, and errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from semantic_aug.core.stable_diffusion import (CLIP_MAX_LENGTH, build_tiny_stable_diffusion, load_sd_components,
                                           load_stable_diffusion, load_tokenizer, resolve_model_path)
from semantic_aug.core.utils import UserError


def test_real_tokenizer_adds_bench_as_one_token():
    tokenizer = load_tokenizer()
    assert len(tokenizer) == 49408 and tokenizer.model_max_length == CLIP_MAX_LENGTH
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]  # CLIP BPE ids
    assert tokenizer.add_tokens(["<bench>"]) == 1
    ids = tokenizer("a photo of a <bench>").input_ids
    assert ids[-2] == len(tokenizer) - 1 and len(ids) == 7  # exactly one new token, not split into pieces
    padded = tokenizer("a photo", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert len(padded) == CLIP_MAX_LENGTH


def test_tiny_model_is_a_normal_diffusers_folder(tiny_model_path):
    folder = Path(tiny_model_path)
    index = json.loads((folder / "model_index.json").read_text())
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(index)
    assert (folder / "tokenizer" / "vocab.json").is_file()
    assert resolve_model_path(str(folder)) == str(folder)  # a local folder goes through the same path


def test_tiny_model_build_is_deterministic(tmp_path, tiny_model_path):
    rebuilt = build_tiny_stable_diffusion(tmp_path / "again")
    _, encoder_a, _, unet_a, _ = load_sd_components(tiny_model_path)
    _, encoder_b, _, unet_b, _ = load_sd_components(str(rebuilt))
    for a, b in ((encoder_a, encoder_b), (unet_a, unet_b)):
        for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(pa, pb), name


def test_img2img_returns_requested_size(tiny_model_path):
    pipe = load_stable_diffusion("tiny", "img2img")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    generator = torch.Generator().manual_seed(0)
    out = pipe(prompt="a photo of a bench", image=image, strength=0.5, guidance_scale=7.5, num_inference_steps=4,
               generator=generator).images
    assert len(out) == 1 and out[0].size == (64, 64)
    again = pipe(prompt="a photo of a bench", image=image, strength=0.5, guidance_scale=7.5, num_inference_steps=4,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert np.array_equal(np.asarray(out[0]), np.asarray(again))  # seeded generation repeats


def test_missing_model_path_is_a_one_line_error():
    with pytest.raises(UserError, match="model path does not exist: ./no/such/model"):
        resolve_model_path("./no/such/model")


def test_hub_ids_pass_through_unchanged():
    assert resolve_model_path("CompVis/stable-diffusion-v1-4") == "CompVis/stable-diffusion-v1-4"


def test_unreachable_hub_id_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="cannot load model 'nobody/no-such-model'"):
        load_stable_diffusion("nobody/no-such-model")

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

from conftest import write_class_folders

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


# -- Textual Inversion with two text encoders ---------------------------------------------------------------


def sdxl_trainer(tiny_sdxl_path, **overrides):
    from accelerate import Accelerator

    from semantic_aug.core.stable_diffusion import load_sd_components, load_sdxl_second_encoder
    from semantic_aug.stages.textual_inversion_training import TextualInversionConfig, TextualInversionTrainer

    settings = dict(resolution=32, train_batch_size=1, max_train_steps=4, learning_rate=5e-2,
                    checkpointing_steps=None, save_steps=None)
    settings.update(overrides)
    return TextualInversionTrainer(*load_sd_components(tiny_sdxl_path), TextualInversionConfig(**settings),
                                   Accelerator(cpu=True), second_encoder=load_sdxl_second_encoder(tiny_sdxl_path))


def toy_specs(root):
    from semantic_aug.stages.textual_inversion_training import ClassSpec

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(2)]
    return [ClassSpec("car", images, root / "car", image_ids=["car-0", "car-1"])]


@pytest.mark.parametrize("num_vectors", [1, 2])
def test_sdxl_tokens_train_in_both_encoders_and_load_in_stock_diffusers(tiny_sdxl_path, tmp_path, num_vectors):
    """Both encoders' vectors move away from the initializer and only their own rows change; the files are the
    diffusers SDXL example's, and stock `load_textual_inversion` maps the token (`<car>`, and `<car>_1` for a
    second vector) to the saved vectors in each encoder."""
    from safetensors.torch import load_file

    from semantic_aug.core.embeddings import vector_token_names
    from semantic_aug.core.stable_diffusion import load_stable_diffusion

    trainer = sdxl_trainer(tiny_sdxl_path, num_vectors=num_vectors)
    weights = [encoder.get_input_embeddings().weight.detach().clone()
               for encoder in (trainer.text_encoder, trainer.text_encoder_2)]
    initial = (trainer.initializer_vector.clone(), trainer.initializer_vector_2.clone())
    trainer.learn(toy_specs(tmp_path), seed=0)
    folder = tmp_path / "car"
    assert sorted(p.name for p in folder.iterdir()) == ["learned_embeds.bin", "learned_embeds.safetensors",
                                                        "learned_embeds_2.safetensors"]
    saved = [load_file(str(folder / name))["<car>"] for name in ("learned_embeds.safetensors",
                                                                 "learned_embeds_2.safetensors")]
    for vector, start in zip(saved, initial):
        expected = start.shape if num_vectors == 1 else (num_vectors, *start.shape)
        assert vector.shape == expected and torch.isfinite(vector).all()
        assert ((vector - start).abs().reshape(num_vectors, -1).amax(dim=1) > 1e-3).all()  # every vector trained
    for encoder, before in zip((trainer.text_encoder, trainer.text_encoder_2), weights):
        after = encoder.get_input_embeddings().weight.detach()
        torch.testing.assert_close(after[: len(before)], before)  # every other row untouched

    pipe = load_stable_diffusion(tiny_sdxl_path, pipeline="img2img")
    pipe.load_textual_inversion(str(folder / "learned_embeds.safetensors"), token="<car>",
                                text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(str(folder / "learned_embeds_2.safetensors"), token="<car>",
                                text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    for tokenizer, encoder, vector in ((pipe.tokenizer, pipe.text_encoder, saved[0]),
                                       (pipe.tokenizer_2, pipe.text_encoder_2, saved[1])):
        names = vector_token_names("<car>", num_vectors)
        token_ids = tokenizer.convert_tokens_to_ids(names)
        prompt = pipe.maybe_convert_prompt("a photo of a <car>", tokenizer)  # stock expansion of the token
        assert tokenizer(prompt, add_special_tokens=False).input_ids[-num_vectors:] == token_ids
        torch.testing.assert_close(encoder.get_input_embeddings().weight[token_ids], vector.reshape(num_vectors, -1))


class Killed(Exception):
    pass


def test_sdxl_textual_inversion_resumes_to_the_uninterrupted_vectors(tiny_sdxl_path, tmp_path):
    """A run killed after its checkpoint resumes both encoders' vectors and AdamW rows: it ends where an
    uninterrupted run ends."""
    from safetensors.torch import load_file

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    sdxl_trainer(tiny_sdxl_path, checkpointing_steps=2).learn(toy_specs(whole), seed=0)

    def kill_after_update_3(group):
        if min(group.steps) == 3:
            raise Killed

    with pytest.raises(Killed):
        sdxl_trainer(tiny_sdxl_path, checkpointing_steps=2).learn(
            toy_specs(parts), seed=0, on_step=kill_after_update_3)
    resumed_from = []
    sdxl_trainer(tiny_sdxl_path, checkpointing_steps=2).learn(
        toy_specs(parts), seed=0, on_step=lambda group: resumed_from.append(min(group.steps)))
    assert resumed_from[0] == 3  # continued after the checkpoint at 2, not from the start
    for name in ("learned_embeds.safetensors", "learned_embeds_2.safetensors"):
        torch.testing.assert_close(load_file(str(parts / "car" / name))["<car>"],
                                   load_file(str(whole / "car" / name))["<car>"], rtol=0, atol=0)


# -- the scripts on the tiny SDXL ---------------------------------------------------------------------------


@pytest.mark.parametrize("num_vectors", [1, 2])
def test_the_whole_pipeline_runs_on_tiny_sdxl(script_runner, tmp_path, num_vectors):
    """fine_tune.py (1 and 2 vectors a token) → aggregate_embeddings.py with noise → train_classifier.py with
    generation and the filter, on a two-class folder dataset and the tiny SDXL, through the flags the scripts have
    for SD 1.x."""
    from semantic_aug.core.embeddings import load_tokens

    write_class_folders(tmp_path / "data", ("cat", "dog"))
    data = ["--dataset", "folder", "--data-dir", tmp_path / "data", "--seeds", "0", "--examples-per-class", "1"]
    script_runner("fine_tune.py", *data, "--pretrained_model_name_or_path", "tiny-sdxl", "--max_train_steps", "2",
                  "--train_batch_size", "1", "--resolution", "32", "--joint", "--num_vectors", num_vectors, cwd=tmp_path,
                  check=True)
    assert len(list(tmp_path.glob("fine-tuned/*/*/learned_embeds_2.safetensors"))) == 2
    script_runner("aggregate_embeddings.py", *data, "--augment-embeddings", "True", cwd=tmp_path, check=True)
    [noise_file] = tmp_path.glob("tokens/*/noise/*-0-1.pt")
    [noise_file_2] = tmp_path.glob("tokens/*/noise/*-0-1_2.pt")
    first, second = load_tokens(noise_file), load_tokens(noise_file_2)
    assert list(first) == list(second) and len(first) == 2 * 4  # each class and its 3 noisy copies, in both files
    assert {tuple(vector.shape[:-1]) for vector in [*first.values(), *second.values()]} == \
        {() if num_vectors == 1 else (num_vectors,)}
    assert (second["<cat_0.025>"] - second["<cat>"]).std() == pytest.approx(0.025, rel=0.5)  # noise in encoder 2
    assert not torch.equal(second["<cat_0.025>"] - second["<cat>"], first["<cat_0.025>"] - first["<cat>"])
    script_runner("train_classifier.py", *data, "--method", "diagen", "--model-path", "tiny-sdxl", "--aug",
                  "textual-inversion", "--use-embedding-noise", "1", "--num-synthetic", "1", "--num-inference-steps",
                  "2", "--strength", "0.5", "--guidance-scale", "7.5", "--synthetic-probability", "1",
                  "--synthetic_filter", "train", "--filter-backbone", "efficientnet_lite0", "--filter-mode", "loss",
                  "--models-root", tmp_path / "models", "--classifier-backbone", "efficientnet_lite0", "--image-size",
                  "32", "--iterations-per-epoch", "2", "--num-epochs", "2", "--batch-size", "8", "--num-workers", "1",
                  cwd=tmp_path, check=True)
    [manifest] = tmp_path.glob("RESULTS/*/diagen/synthetics_seed_0/manifest.csv")
    synthetic = sorted(manifest.parent.glob("*.png"))
    assert len(synthetic) == 2 and all(Image.open(path).size == (32, 24) for path in synthetic)
    assert "tiny-sdxl" in (manifest.parent / "settings.json").read_text()
    assert list(tmp_path.glob("models/filter_*_0_1.pth")) and list(tmp_path.glob("RESULTS/*/diagen/models/*.pth"))

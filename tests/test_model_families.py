"""Model families: multi-vector tokens (`--num_vectors`) and Stable Diffusion 2.x (`tiny-sd2`), checked against stock
diffusers: its `load_textual_inversion`, its `maybe_convert_prompt` and its img2img pipeline."""

import numpy as np
import pytest
import torch
from PIL import Image

from semantic_aug.core.embeddings import (add_tokens_to_text_encoder, embedding_noise, expand_vector_tokens,
                                          load_tokens, noisy_token_name, save_learned_embeds, save_tokens,
                                          stable_seed, token_name)
from semantic_aug.core.stable_diffusion import load_sd_components, load_stable_diffusion, resolve_model_path
from semantic_aug.core.utils import UserError
from semantic_aug.stages.augmentations import DiffusionSampler, TextualInversion
from semantic_aug.stages.textual_inversion_training import TextualInversionConfig, TextualInversionTrainer

from conftest import write_class_folders

STEPS = 4  # scheduler steps; strength 0.5 runs 2 of them
STDS = (0.005, 0.01, 0.025)


def random_image(seed: int, size=(64, 64)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def width_of(model: str) -> int:
    return load_sd_components(model)[1].config.hidden_size


def test_tiny_sd2_has_the_sd2_traits():
    tokenizer, text_encoder, _, unet, noise_scheduler = load_sd_components("tiny-sd2")
    assert tokenizer.pad_token == "!" and tokenizer.pad_token_id == 0
    assert text_encoder.config.hidden_act == "gelu"
    assert unet.config.use_linear_projection is True
    assert list(unet.config.attention_head_dim) == [2, 4]  # 16-wide heads in both levels
    assert noise_scheduler.config.prediction_type == "v_prediction"
    assert load_stable_diffusion("tiny-sd2").scheduler.__class__.__name__ == "DDIMScheduler"


def test_expand_vector_tokens_is_diffusers_maybe_convert_prompt():
    pipe = load_stable_diffusion("tiny")
    width = pipe.text_encoder.config.hidden_size
    add_tokens_to_text_encoder(pipe.tokenizer, pipe.text_encoder,
                               {"<car>": torch.zeros(3, width), "<carrot>": torch.zeros(width),
                                "<car_0.01>": torch.zeros(2, width)})
    prompts = ["a photo of a <car>", "a <carrot> and a <car> in the snow", "<car_0.01> on a road", "a <carrot>",
               "a photo of a car"]
    for prompt in prompts:
        assert expand_vector_tokens(prompt, pipe.tokenizer) == pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
    assert expand_vector_tokens(prompts[0], pipe.tokenizer) == "a photo of a <car> <car>_1 <car>_2"
    assert expand_vector_tokens("a <car>_2", pipe.tokenizer) == "a <car>_2"  # <car> inside <car>_2 is no match


def test_added_tokens_equal_diffusers_load_textual_inversion(tmp_path):
    width = width_of("tiny")
    vectors = torch.randn(3, width, generator=torch.Generator().manual_seed(0))
    save_learned_embeds(tmp_path, "<car>", vectors)
    ours, stock = load_stable_diffusion("tiny"), load_stable_diffusion("tiny")
    add_tokens_to_text_encoder(ours.tokenizer, ours.text_encoder, load_tokens(tmp_path / "learned_embeds.bin"))
    stock.load_textual_inversion(str(tmp_path))
    names = ["<car>", "<car>_1", "<car>_2"]
    assert all(name in stock.tokenizer.added_tokens_encoder for name in names)
    for pipe in (ours, stock):
        ids = pipe.tokenizer.convert_tokens_to_ids(names)
        torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight[ids], vectors)
    with pytest.raises(UserError, match="more vectors"):  # a stale <car>_1, _2 would join every <car> prompt
        add_tokens_to_text_encoder(ours.tokenizer, ours.text_encoder, {"<car>": torch.zeros(width)})


def test_embedding_noise_puts_its_own_noise_on_every_vector():
    vectors = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    noisy = embedding_noise({"<car>": vectors}, STDS, seed=5)
    assert torch.equal(noisy["<car>"], vectors)
    for std in STDS:
        name = noisy_token_name("car", std)
        draw = torch.randn((4, 8), generator=torch.Generator().manual_seed(stable_seed(5, name)))
        torch.testing.assert_close(noisy[name], vectors + std * draw, rtol=0, atol=0)  # e + σ·N(0, I), per vector
        assert (noisy[name] - vectors).std(dim=1).min() > 0  # every vector moved


@pytest.mark.parametrize("model, num_vectors", [("tiny", 2), ("tiny-sd2", 1), ("tiny-sd2", 3)])
def test_img2img_with_a_saved_token_equals_stock_diffusers(tmp_path, model, num_vectors):
    """Our sampler with the token file == diffusers' StableDiffusionImg2ImgPipeline after `load_textual_inversion` of
    the per-class file, same prompt and seed."""
    width = width_of(model)
    shape = (width,) if num_vectors == 1 else (num_vectors, width)
    vectors = 3 * torch.randn(shape, generator=torch.Generator().manual_seed(1))
    save_learned_embeds(tmp_path / "car", "<car>", vectors)
    save_tokens({"<car>": vectors}, tmp_path / "tokens.pt")  # the merged file aggregate_embeddings.py writes
    sampler = DiffusionSampler.from_pretrained(model, num_inference_steps=STEPS)
    augmentation = TextualInversion(sampler, ["car"], tmp_path / "tokens.pt", strength=0.5, guidance_scale=7.5)
    choice = augmentation.choose("car", 0, seed=7)
    assert choice.prompt == "a photo of a <car>"
    image = random_image(0)
    ours = augmentation.generate([image], [{"name": "car"}], [choice], [7]).pil(0)

    stock = load_stable_diffusion(model, "img2img")
    stock.load_textual_inversion(str(tmp_path / "car"))
    theirs = stock(prompt=choice.prompt, image=image, strength=0.5, guidance_scale=7.5, num_inference_steps=STEPS,
                   generator=[torch.Generator().manual_seed(7)]).images[0]
    assert np.abs(np.asarray(ours, np.int16) - np.asarray(theirs, np.int16)).max() <= 1
    if num_vectors > 1:  # the extra vectors take part: the first one alone gives other text states
        first_only = sampler.encode_prompts(["a photo of a <car>"])
        save_tokens({"<bus>": vectors[0]}, tmp_path / "first.pt")
        add_tokens_to_text_encoder(sampler.tokenizer, sampler.text_encoder, load_tokens(tmp_path / "first.pt"))
        assert not torch.allclose(first_only, sampler.encode_prompts(["a photo of a <bus>"]))


def test_an_unknown_prediction_type_is_refused_before_training():
    from accelerate import Accelerator

    parts = list(load_sd_components("tiny"))
    parts[4].register_to_config(prediction_type="sample")
    with pytest.raises(UserError, match="prediction_type 'sample'"):
        TextualInversionTrainer(*parts, TextualInversionConfig(resolution=32), Accelerator(cpu=True))


def test_tiny_sd2_resolves_to_its_own_cached_folder():
    assert resolve_model_path("tiny-sd2") != resolve_model_path("tiny")
    assert token_name("cell phone") == "<cell_phone>"


def test_the_whole_pipeline_runs_on_tiny_sd2_with_one_and_two_vectors(script_runner, tmp_path):
    """fine_tune.py (1 and 2 vectors) -> aggregate_embeddings.py with noise -> train_classifier.py generating with
    the noisy tokens, training the filter and the classifier, on the SD 2.x model."""
    from semantic_aug.datasets.custom_coco import CUSTOM_COCO_CLASSES

    data_dir = write_class_folders(tmp_path / "custom_coco", CUSTOM_COCO_CLASSES)
    from semantic_aug.datasets import dataset_key

    key = dataset_key("custom_coco", data_dir)  # not the default data: every file name carries its fingerprint
    single_thread = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    width = width_of("tiny-sd2")
    for num_vectors in (1, 2):
        out = tmp_path / f"run-{num_vectors}"
        script_runner("fine_tune.py", "--dataset", "custom_coco", "--data-dir", data_dir,
                      "--pretrained_model_name_or_path", "tiny-sd2", "--seeds", "0", "--examples-per-class", "1",
                      "--max_train_steps", "2", "--train_batch_size", "1", "--resolution", "32",
                      "--num_vectors", num_vectors, "--output_dir", out, cwd=tmp_path, env=single_thread, check=True)
        saved = load_tokens(out / "fine-tuned" / f"{key}-0-1" / "car" / "learned_embeds.bin")
        assert saved["<car>"].shape == ((width,) if num_vectors == 1 else (num_vectors, width))
        aggregate = script_runner("aggregate_embeddings.py", "--dataset", "custom_coco", "--data-dir", data_dir,
                                  "--seeds", "0", "--examples-per-class", "1", "--input-path", out / "fine-tuned", "--output-dir",
                                  out / "tokens", "--augment-embeddings", "True", cwd=tmp_path, check=True)
        assert "token embedding RMS" in aggregate.stderr
        noisy_file = out / "tokens" / f"{key}-tokens" / "noise" / f"{key}-0-1.pt"
        noisy = load_tokens(noisy_file, CUSTOM_COCO_CLASSES, embedding_dim=width)
        assert noisy["<car_0.01>"].shape == saved["<car>"].shape
    script_runner(
        "train_classifier.py", "--data-dir", data_dir, "--method", "diagen", "--model-path", "tiny-sd2",
        "--embed-path", noisy_file, "--use-embedding-noise", "1", "--num-synthetic", "2", "--num-inference-steps", "4",
        "--strength", "0.5", "--guidance-scale", "7.5", "--synthetic_filter", "train", "--filter-backbone",
        "efficientnet_lite0", "--filter-mode", "loss", "--models-root", tmp_path / "models",
        "--classifier-backbone", "efficientnet_lite0", "--image-size", "32", "--iterations-per-epoch", "2",
        "--num-epochs", "1", "--batch-size", "8", "--seeds", "0", "--examples-per-class", "1", "--num-workers", "1",
        cwd=tmp_path, env=single_thread, check=True)
    base = tmp_path / "RESULTS" / f"{key}_1epc" / "diagen"
    import pandas as pd

    manifest = pd.read_csv(base / "synthetics_seed_0" / "manifest.csv")
    assert len(manifest) == 2 * len(CUSTOM_COCO_CLASSES) and manifest["filter_weight"].between(0, 1).all()
    assert (base / "models" / f"classifier_{key}_0_1_[0.5]_[7.5]_filter_noise.pth").is_file()

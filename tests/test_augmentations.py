"""Generative augmentations on the tiny SD: token/prompt cycling, exact token names, the batched sampler against
diffusers' own img2img pipeline, batch independence, inpainting, composition and the registry."""

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from semantic_aug.acceleration import Acceleration, ReferenceRunner
from semantic_aug.stages.augmentations import (ComposeParallel, ComposeSequential, DiffusionSampler, RealGuidance,
                                        TextualInversion, cycle_indices, get_augmentation_class, list_augmentations,
                                        noisy_tokens)
from semantic_aug.core.embeddings import embedding_noise, save_tokens, token_name
from semantic_aug.core.utils import UserError

CLASSES = ("car", "carrot", "cell_phone")
STDS = (0.005, 0.01, 0.025)
STEPS = 4  # scheduler steps; strength 0.5 runs 2 of them




@pytest.fixture(scope="module")
def sampler(tiny_model_path):
    return DiffusionSampler.from_pretrained("tiny", num_inference_steps=STEPS)


@pytest.fixture(scope="module")
def reference_sampler(tiny_model_path):
    return DiffusionSampler.from_pretrained("tiny", num_inference_steps=STEPS, acceleration=Acceleration.none())


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory):
    width = 32  # the tiny text encoder's hidden size
    generator = torch.Generator().manual_seed(0)
    tokens = {token_name(name): torch.randn(width, generator=generator) for name in CLASSES}
    path = tmp_path_factory.mktemp("tokens") / "toy-0-2.pt"
    save_tokens(embedding_noise(tokens, STDS, seed=0), path)
    return path


def random_image(seed: int, size=(64, 64)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def test_cycle_indices_visits_every_token_prompt_pair_once_per_period():
    # 4 noise levels and 2 prompts: one shared counter (the reference) only ever pairs even tokens with prompt 0
    shared = {(k % 4, k % 2) for k in range(8)}
    assert len(shared) == 4
    pairs = [cycle_indices(k, 4, 2) for k in range(8)]
    assert sorted(pairs) == sorted(itertools.product(range(4), range(2)))
    assert [token for token, _ in pairs] == [0, 1, 2, 3] * 2  # the noise counter is unchanged
    # one feature alone behaves as the reference: counter mod size
    assert [cycle_indices(k, 1, 3) for k in range(6)] == [(0, k % 3) for k in range(6)]
    assert [cycle_indices(k, 4, 1) for k in range(6)] == [(k % 4, 0) for k in range(6)]
    pairs = [cycle_indices(k, 4, 10) for k in range(40)]
    assert len(set(pairs)) == 40


def test_noisy_tokens_match_names_exactly():
    tokens = ["<car>", "<carrot>", "<dog>", "<hot_dog>", "<car_1>"]
    tokens += [f"<{stem}_{std}>" for stem in ("car", "carrot", "dog", "hot_dog") for std in STDS]
    classes = ["car", "carrot", "dog", "hot dog", "car_1"]
    assert noisy_tokens(tokens, "car", classes) == ["<car_0.005>", "<car_0.01>", "<car_0.025>"]
    assert noisy_tokens(tokens, "dog", classes) == ["<dog_0.005>", "<dog_0.01>", "<dog_0.025>"]
    assert noisy_tokens(tokens, "hot dog", classes) == ["<hot_dog_0.005>", "<hot_dog_0.01>", "<hot_dog_0.025>"]
    assert noisy_tokens(tokens, "car", classes, std_deviations=[0.025, 0.005]) == ["<car_0.005>", "<car_0.025>"]


def test_textual_inversion_cycles_every_noisy_token_and_prompt(sampler, tokens_file):
    prompts = {name: ["a photo of a {name}", "a {name} in the snow"] for name in CLASSES}
    noisy = TextualInversion(sampler, CLASSES, tokens_file, use_embedding_noise=True, strength=0.5, guidance_scale=7.5,
                             class_prompts=prompts)
    choices = [noisy.choose("car", k, seed=k) for k in range(8)]
    expected_tokens = ["<car>", "<car_0.005>", "<car_0.01>", "<car_0.025>"]
    assert [c.token for c in choices] == expected_tokens * 2
    assert {c.prompt for c in choices} == {p.format(name=t) for p in prompts["car"] for t in expected_tokens}
    assert all("carrot" not in c.token for c in choices)
    plain = TextualInversion(sampler, CLASSES, tokens_file, strength=0.5, guidance_scale=7.5, prompt="a {name}")
    assert {plain.choose("carrot", k, seed=k).prompt for k in range(4)} == {"a <carrot>"}
    # every token of the file became one token of the tokenizer
    assert all(len(sampler.tokenizer(t, add_special_tokens=False).input_ids) == 1 for t in expected_tokens)


def test_textual_inversion_needs_noisy_tokens_when_asked(sampler, tmp_path):
    path = tmp_path / "plain.pt"
    save_tokens({token_name(name): torch.zeros(32) for name in CLASSES}, path)
    with pytest.raises(UserError, match="no noisy copies of <car>"):
        TextualInversion(sampler, CLASSES, path, use_embedding_noise=True, strength=0.5, guidance_scale=7.5)


def test_real_guidance_names_the_class_in_words(sampler):
    augmentation = RealGuidance(sampler, CLASSES, strength=0.5, guidance_scale=7.5)
    assert augmentation.choose("cell_phone", 0, seed=0).prompt == "a photo of a cell phone"
    with pytest.raises(UserError, match="--strength must lie in"):
        RealGuidance(sampler, CLASSES, strength=1.5, guidance_scale=7.5)
    with pytest.raises(UserError, match="--prompt"):
        RealGuidance(sampler, CLASSES, prompt="a {label}", strength=0.5, guidance_scale=7.5)


def test_sampler_matches_diffusers_img2img(sampler):
    """One image through our batched sampler equals diffusers' img2img pipeline with the same generator."""
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(vae=sampler.vae, text_encoder=sampler.text_encoder,
                                          tokenizer=sampler.tokenizer, unet=sampler.unet, scheduler=sampler.scheduler,
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    image = random_image(0)
    ours = sampler.img2img([image], ["a photo of a bench"], [7], strength=0.5, guidance_scale=7.5).pil(0)
    theirs = pipe(prompt="a photo of a bench", image=image, strength=0.5, guidance_scale=7.5, num_inference_steps=STEPS,
                  generator=[torch.Generator().manual_seed(7)]).images[0]
    assert np.abs(pixels(ours) - pixels(theirs)).max() <= 1


def test_sampler_without_acceleration_is_diffusers_img2img(reference_sampler):
    """With `Acceleration.none()` the models run as diffusers runs them (no module of theirs rewritten), and the
    sampler gives diffusers' img2img images. What remains is float rounding: diffusers hands the VAE a
    channels_last-strided pixel tensor, which the CPU convolution sums in another order (1e-6 in the latents)."""
    from diffusers import StableDiffusionImg2ImgPipeline
    from diffusers.models.attention_processor import Attention

    sampler = reference_sampler
    assert isinstance(sampler.runner, ReferenceRunner)
    assert not any(hasattr(m, "to_qkv") or hasattr(m, "paired") for m in sampler.unet.modules())
    assert all(type(m.processor).__name__ == "AttnProcessor2_0" for m in sampler.unet.modules()
               if isinstance(m, Attention))
    pipe = StableDiffusionImg2ImgPipeline(vae=sampler.vae, text_encoder=sampler.text_encoder,
                                          tokenizer=sampler.tokenizer, unet=sampler.unet, scheduler=sampler.scheduler,
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    image = random_image(0)
    for strength, guidance_scale in ((0.5, 7.5), (1.0, 3.0)):
        ours = sampler.img2img([image], ["a photo of a bench"], [7], strength, guidance_scale).pil(0)
        theirs = pipe(prompt="a photo of a bench", image=image, strength=strength, guidance_scale=guidance_scale,
                      num_inference_steps=STEPS, generator=[torch.Generator().manual_seed(7)]).images[0]
        assert np.abs(pixels(ours) - pixels(theirs)).max() <= 1


def test_default_acceleration_gives_the_reference_images_on_the_cpu(sampler, reference_sampler):
    """The default options (fused QKV and the shared guidance prefix on the CPU) change the images only within float
    rounding: img2img, inpainting and inverted inpainting, on a batch with siblings."""
    real = [random_image(1, (50, 40)), random_image(2, (70, 64))]
    images = [real[0], real[0], real[1]]
    masks = [np.zeros((40, 50), np.uint8), np.zeros((40, 50), np.uint8), np.zeros((64, 70), np.uint8)]
    for mask in masks:
        mask[5:30, 10:40] = 1
    prompts = ["a photo of a car", "a car in the snow", "a photo of a dog"]
    for options in ({}, {"masks": masks}, {"masks": masks, "invert_mask": True}):
        fast = sampler.img2img(images, prompts, [1, 2, 3], strength=0.75, guidance_scale=7.5, **options)
        plain = reference_sampler.img2img(images, prompts, [1, 2, 3], strength=0.75, guidance_scale=7.5, **options)
        for i in range(len(images)):
            difference = np.abs(pixels(fast.pil(i)) - pixels(plain.pil(i)))
            assert difference.max() <= 1 and (difference > 0).mean() < 1e-3


def test_acceleration_options_are_checked_and_touch_no_process_setting(tiny_model_path):
    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        Acceleration().configure_process("cpu")
        assert torch.backends.cudnn.benchmark is False  # cuDNN autotuning is for a CUDA device
        Acceleration(cudnn_benchmark=False).configure_process("cuda")
        assert torch.backends.cudnn.benchmark is False
        Acceleration().configure_process("cuda")
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = before
    assert Acceleration.none().is_reference and not Acceleration().is_reference
    with pytest.raises(UserError, match="unknown attention backend 'fast'; choose one of auto"):
        Acceleration(attention="fast")
    with pytest.raises(UserError, match="unknown compile mode"):
        Acceleration(compile_mode="fastest")
    with pytest.raises(UserError, match="flash4 runs on fused projections"):
        Acceleration(attention="flash4", fused_qkv=False)


def test_sampler_output_does_not_depend_on_the_batch(sampler):
    real = [random_image(1, (50, 40)), random_image(2, (70, 64))]
    images = [real[0], real[0], real[1], real[0]]  # siblings share one real image object
    prompts = ["a photo of a car", "a car in the snow", "a photo of a car", "a car at night"]
    batched = sampler.img2img(images, prompts, [11, 12, 13, 14], strength=0.75, guidance_scale=7.5)
    for i in range(4):
        alone = sampler.img2img([images[i]], [prompts[i]], [11 + i], strength=0.75, guidance_scale=7.5).pil(0)
        assert batched.pil(i).size == images[i].size  # back at the real image's size
        assert np.abs(pixels(batched.pil(i)) - pixels(alone)).max() <= 2
    assert not np.array_equal(pixels(batched.pil(0)), pixels(batched.pil(1)))  # siblings differ


def test_inpainting_repaints_only_the_mask(sampler):
    image = random_image(3)
    nothing = np.zeros((64, 64), dtype=np.uint8)

    def run(prompt, invert):
        return pixels(sampler.img2img([image], [prompt], [5], strength=1.0, guidance_scale=7.5, masks=[nothing],
                                      invert_mask=invert).pil(0))

    # an empty mask keeps the encoded image whatever the prompt; inverted, everything is repainted
    assert np.array_equal(run("a photo of a car", False), run("a photo of a dog", False))
    assert not np.array_equal(run("a photo of a car", True), run("a photo of a dog", True))


def reference_maximum_filter(mask: np.ndarray, size: int) -> np.ndarray:
    """scipy.ndimage.maximum_filter(mask, size) written out: window [i - size // 2, i + size - 1 - size // 2]."""
    before, after = size // 2, size - 1 - size // 2
    padded = np.pad(mask, ((before, after), (before, after)))  # for a max filter 'reflect' adds nothing new
    windows = np.lib.stride_tricks.sliding_window_view(padded, (size, size))
    return windows.max(axis=(2, 3))


def test_object_masks_grow_like_the_reference_maximum_filter(sampler):
    assert sampler.mask_grow_radius == 16  # the reference's maximum_filter(size=16) at 512²
    window = round(sampler.mask_grow_radius * sampler.resolution / 512)
    rng = np.random.default_rng(0)
    mask = (rng.random((sampler.resolution, sampler.resolution)) > 0.97).astype(np.uint8)
    mask[0, 5] = mask[-1, -1] = 1  # objects touching the border
    grown = sampler.prepare_masks([mask], invert=False)[0, 0].cpu().numpy()
    expected = reference_maximum_filter(mask, window)
    assert window > 1 and expected.sum() > mask.sum()
    assert np.array_equal(grown, expected)
    single = np.zeros_like(mask)
    single[32, 32] = 1
    assert sampler.prepare_masks([single], invert=False)[0, 0].sum().item() == window ** 2
    assert sampler.prepare_masks([single], invert=True)[0, 0].sum().item() == mask.size - window ** 2


def test_compose_draws_members_with_their_probabilities(sampler):
    guidance = RealGuidance(sampler, CLASSES, strength=0.5, guidance_scale=7.5)
    other = RealGuidance(sampler, CLASSES, prompt="a {name} on a table", strength=0.5, guidance_scale=7.5)
    parallel = ComposeParallel([guidance, other], probs=[1.0, 0.0])
    assert {parallel.choose("car", k, seed=k).prompt for k in range(10)} == {"a photo of a car"}
    uniform = ComposeParallel([guidance, other])
    assert len({uniform.choose("car", k, seed=k).prompt for k in range(20)}) == 2
    sequential = ComposeSequential([guidance, other], probs=[1.0, 0.0])
    assert sequential.choose("car", 0, seed=0).augmentation == "real-guidance"
    none = ComposeSequential([guidance, other], probs=[0.0, 0.0])
    choice = none.choose("car", 0, seed=0)
    image = random_image(4)
    assert choice.augmentation == "none" and none.generate([image], [{"name": "car"}], [choice], [0]).pil(0) is image
    with pytest.raises(UserError, match="--probs has 1 values for 2"):
        ComposeParallel([guidance, other], probs=[1.0])


def test_forward_keeps_the_reference_interface(sampler):
    augmentation = RealGuidance(sampler, CLASSES, strength=0.5, guidance_scale=7.5)
    image = random_image(5, (48, 40))
    synthetic, label = augmentation(image, 2, {"name": "cell_phone"})
    assert label == 2 and synthetic.size == image.size and synthetic.mode == "RGB"


def test_registry_lists_the_aug_names():
    assert list_augmentations() == ["real-guidance", "textual-inversion"]
    assert get_augmentation_class("textual-inversion") is TextualInversion
    with pytest.raises(UserError, match="unknown augmentation 'multi-token-inversion'; known: real-guidance"):
        get_augmentation_class("multi-token-inversion")

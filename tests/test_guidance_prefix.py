"""The UNet's guidance prefix (everything before the first cross-attention) runs once for both guidance halves and
gives the same output; the sampler pads guidance halves separately so that they stay paired."""

import torch

from semantic_aug.acceleration import Acceleration, StaticBatches
from semantic_aug.acceleration.guidance_prefix import paired_halves, share_guidance_prefix
from semantic_aug.stages.augmentations.sampler import DiffusionSampler
from semantic_aug.core.stable_diffusion import load_sd_components


def tiny_unet_inputs(unet, seed: int = 0):
    torch.manual_seed(seed)
    latents = torch.randn(3, 4, 32, 32)
    text = torch.randn(6, 77, unet.config.cross_attention_dim)  # empty-prompt rows, then prompt rows
    return latents, text


def test_shared_prefix_gives_the_same_output_and_runs_half_the_rows(tiny_model_path):
    _, _, _, unet, _ = load_sd_components(tiny_model_path)
    latents, text = tiny_unet_inputs(unet)
    sample = torch.cat([latents, latents])
    keys = set(unet.state_dict())
    with torch.no_grad():
        expected = unet(sample, 500, encoder_hidden_states=text).sample
        shared = share_guidance_prefix(unet)
        assert share_guidance_prefix(unet) == shared  # a second sampler over the same UNet wraps nothing again
        rows_seen = []
        hook = shared[0].conv1.register_forward_hook(lambda module, args, out: rows_seen.append(args[0].shape[0]))
        with paired_halves(shared):
            got = unet(sample, 500, encoder_hidden_states=text).sample
        unpaired = unet(sample, 500, encoder_hidden_states=text).sample
        hook.remove()
    # the tiny UNet opens with a block without attention (shared whole), then a block with transformers
    first_attention = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    assert shared[0] is unet.down_blocks[0].resnets[0] and shared[-1] is first_attention
    assert rows_seen == [3, 6]  # paired: the first half only; outside the context: every row
    assert set(unet.state_dict()) == keys
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unpaired, expected, rtol=0, atol=0)


def test_paired_mode_really_skips_the_second_half(tiny_model_path):
    """With halves that differ (never the case in img2img) the paired output is wrong: the second half's prefix was
    not computed, which is what saves the time."""
    _, _, _, unet, _ = load_sd_components(tiny_model_path)
    latents, text = tiny_unet_inputs(unet)
    sample = torch.cat([latents, latents + 1.0])
    with torch.no_grad():
        expected = unet(sample, 500, encoder_hidden_states=text).sample
        shared = share_guidance_prefix(unet)
        with paired_halves(shared):
            got = unet(sample, 500, encoder_hidden_states=text).sample
    torch.testing.assert_close(got[:3], expected[:3], rtol=1e-5, atol=1e-5)
    assert (got[3:] - expected[3:]).abs().max() > 1e-2


def test_unknown_layouts_are_left_alone():
    assert share_guidance_prefix(torch.nn.Linear(2, 2)) == []


def test_static_batches_pad_each_guidance_half():
    """Compiled graphs see a fixed batch: 2 x 3 guidance rows padded to 2 x 4 must stay paired row by row."""
    batches = StaticBatches(torch.contiguous_format, pad=True, cudagraphs=False)  # as the compiled path pads
    batches.rows = 8
    seen = []

    def record(sample, text):
        seen.append((sample.clone(), text.clone()))
        return sample * 2

    latents = torch.arange(3.0).reshape(3, 1, 1, 1).expand(3, 4, 2, 2)
    text = torch.arange(6.0).reshape(6, 1)
    out = batches(record, torch.cat([latents, latents]), text, paired=True)
    sample_in, text_in = seen[0]
    assert sample_in.shape[0] == 8
    torch.testing.assert_close(sample_in[:4], sample_in[4:])  # the halves still hold the same latents
    assert text_in[:, 0].tolist() == [0, 1, 2, 0, 3, 4, 5, 3]  # each half padded with its own first row
    torch.testing.assert_close(out, torch.cat([latents, latents]) * 2)  # the real rows, in order


def test_img2img_runs_the_prefix_on_one_half():
    """The sampler's UNet calls are paired: the shared ResNet sees each image once per step, not twice."""
    from PIL import Image

    sampler = DiffusionSampler.from_pretrained("tiny", num_inference_steps=4)
    rows_seen = []
    hook = sampler.runner.shared_prefix[0].conv1.register_forward_hook(
        lambda module, args, out: rows_seen.append(args[0].shape[0]))
    images = [Image.new("RGB", (40, 30), (200, 30, 90)), Image.new("RGB", (40, 30), (20, 130, 90))]
    sampler.img2img(images, ["a cat", "a dog"], [1, 2], strength=0.5, guidance_scale=7.5)
    hook.remove()
    assert rows_seen == [2] * len(sampler.timesteps_for(0.5))  # every UNet call, on 2 of its 4 rows


def test_the_prefix_is_switched_by_name(tiny_model_path):
    """`shared_guidance_prefix=False` runs every row through the prefix and leaves the UNet's modules as they were."""
    from PIL import Image

    sampler = DiffusionSampler.from_pretrained("tiny", num_inference_steps=4,
                                               acceleration=Acceleration(shared_guidance_prefix=False))
    first = sampler.unet.down_blocks[0].resnets[0]
    assert sampler.runner.shared_prefix == [] and not hasattr(first, "paired")
    rows_seen = []
    hook = first.conv1.register_forward_hook(lambda module, args, out: rows_seen.append(args[0].shape[0]))
    sampler.img2img([Image.new("RGB", (40, 30), (200, 30, 90))], ["a cat"], [1], strength=0.5, guidance_scale=7.5)
    hook.remove()
    assert rows_seen == [2] * len(sampler.timesteps_for(0.5))  # both guidance halves, every step

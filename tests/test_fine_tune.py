"""Textual Inversion (`fine_tune.py`, `semantic_aug.stages.textual_inversion_training`) on the tiny SD, on the CPU.

Images are 32 px (latents 16×16) and batches one or two samples per class, so each training step takes tens of
milliseconds.
"""

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import accelerate_launch
from semantic_aug.core.embeddings import LEARNED_EMBEDS_NAME, LEARNED_EMBEDS_SAFE_NAME, load_tokens
from semantic_aug.stages.textual_inversion_training import (OBJECT_TEMPLATES, ClassSpec, PerRowAdamW, TextualInversionConfig,
                                                     TextualInversionTrainer, find_checkpoints)
from semantic_aug.core.utils import UserError

RESOLUTION = 32  # smallest size the tiny UNet's two levels take (latents 16×16)
CLASSES = ("car", "carrot")  # names that share a prefix: tokens must still be kept apart




@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


@pytest.fixture
def parts(tiny_model_path):
    """Fresh tiny SD parts (tokenizer, text_encoder, vae, unet, noise_scheduler) for each test."""
    from semantic_aug.core.stable_diffusion import load_sd_components

    return load_sd_components(tiny_model_path)


def toy_images(seed: int, count: int = 2) -> list:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(count)]


def class_specs(root: Path) -> list[ClassSpec]:
    return [ClassSpec(name, toy_images(i), root / name, image_ids=[f"{name}-{k}" for k in range(2)])
            for i, name in enumerate(CLASSES)]


def make_trainer(parts, accelerator, **overrides) -> TextualInversionTrainer:
    settings = dict(resolution=RESOLUTION, train_batch_size=1, max_train_steps=4, learning_rate=5e-3,
                    checkpointing_steps=None, save_steps=None)
    settings.update(overrides)
    return TextualInversionTrainer(*parts, TextualInversionConfig(**settings), accelerator)


# -- the optimizer -----------------------------------------------------------------------------------------


def test_per_row_adamw_matches_torch_adamw_and_leaves_inactive_rows_alone():
    torch.manual_seed(0)
    start = torch.randn(3, 5)
    ours, reference = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start[:2].clone())
    per_row = PerRowAdamW(ours, lr=0.1, weight_decay=0.01)
    adamw = torch.optim.AdamW([reference], lr=0.1, weight_decay=0.01)
    active = torch.tensor([True, True, False])
    for _ in range(5):
        grad = torch.randn(3, 5)
        ours.grad, reference.grad = grad.clone(), grad[:2].clone()
        per_row.step(active=active)
        adamw.step()
    torch.testing.assert_close(ours.data[:2], reference.data, rtol=1e-6, atol=1e-7)
    assert torch.equal(ours.data[2], start[2])
    assert per_row.steps.tolist() == [5, 5, 0]


def test_per_row_adamw_follows_each_rows_own_schedule():
    param = torch.nn.Parameter(torch.zeros(2, 1))
    optimizer = PerRowAdamW(param, lr=1.0, weight_decay=0.0, schedule=lambda step: 0.0 if step == 0 else 1.0)
    optimizer.load_row_state(1, {"step": 3, "exp_avg": torch.zeros(1), "exp_avg_sq": torch.zeros(1)})
    param.grad = torch.ones(2, 1)
    optimizer.step()
    assert param.data[0].item() == 0.0  # row 0 is at its update 0: warm-up multiplier 0
    assert param.data[1].item() < 0.0  # row 1 is at its update 3: full rate


# -- training behaviour --------------------------------------------------------------------------------------


def test_training_lowers_the_loss_on_a_fixed_batch_and_changes_only_placeholder_rows(parts, accelerator, tmp_path):
    tokenizer, text_encoder = parts[0], parts[1]
    original = text_encoder.get_input_embeddings().weight.detach().clone()
    trainer = make_trainer(parts, accelerator, max_train_steps=12, train_batch_size=2, learning_rate=5e-2)
    with trainer.start(class_specs(tmp_path), seed=0) as group:
        fixed = [(row, group.draw(row)) for row in range(len(CLASSES)) for _ in range(4)]
        for row in range(len(CLASSES)):  # the training stream starts where it would without the fixed batch
            group.generators[row].manual_seed(1000 + row)
        before = group.loss(fixed).mean().item()
        group.train()
        after = group.loss(fixed).mean().item()
    assert after < before

    weight = text_encoder.get_input_embeddings().weight.detach()
    ids = tokenizer.convert_tokens_to_ids(["<car>", "<carrot>"])
    assert len(set(ids)) == 2 and min(ids) >= original.shape[0]
    assert torch.equal(weight[: original.shape[0]], original)  # every pre-existing row bit-identical
    init = original[tokenizer("the", add_special_tokens=False).input_ids[0]]
    for token_id, name in zip(ids, CLASSES):
        saved = load_tokens(tmp_path / name / LEARNED_EMBEDS_NAME)[f"<{name}>"]
        assert not torch.allclose(saved, init)
        assert torch.equal(weight[token_id], saved)


def reference_textual_inversion_updates(tiny_model_path, images, draws, learning_rate: float,
                                        num_vectors: int = 1) -> torch.Tensor:
    """The reference loop (diffusers' textual_inversion example), written out: AdamW over the whole input-embedding
    matrix, every other row restored after each step. `draws` supply the random choices (image, flip, template,
    timestep, noise, posterior ε) of each update. With `num_vectors` N the placeholders are `<car>`, `<car>_1`, ...,
    all started from "the" and all written in the captions; the loss target is the noise, or for a v-prediction
    model the velocity √ᾱ·ε − √(1−ᾱ)·x₀. Returns the placeholder rows after the updates ([dim], or [N, dim])."""
    from semantic_aug.core.stable_diffusion import load_sd_components

    tokenizer, text_encoder, vae, unet, noise_scheduler = load_sd_components(tiny_model_path)
    placeholders = ["<car>"] + [f"<car>_{i}" for i in range(1, num_vectors)]
    tokenizer.add_tokens(placeholders)
    text_encoder.resize_token_embeddings(len(tokenizer))
    placeholder_ids = tokenizer.convert_tokens_to_ids(placeholders)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[placeholder_ids] = weight[tokenizer("the", add_special_tokens=False).input_ids[0]].clone()
    for model in (vae, unet, text_encoder):
        model.requires_grad_(False)
    weight.requires_grad_(True)
    optimizer = torch.optim.AdamW([weight], lr=learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    original = weight.detach().clone()
    keep = ~torch.isin(torch.arange(len(tokenizer)), torch.tensor(placeholder_ids))
    text_encoder.train()
    for draw in draws:
        pixels, captions = [], []
        for index, flip, template in zip(draw.image_index, draw.flip, draw.template_index):
            image = images[index].resize((RESOLUTION, RESOLUTION), resample=Image.Resampling.BICUBIC)
            if flip:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            pixels.append(torch.from_numpy(np.array(image).astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1))
            captions.append(OBJECT_TEMPLATES[template].format(" ".join(placeholders)))
        # latent_dist.sample() × scaling factor with the draw's ε, scaled term by term as the trainer's latent cache
        # does (scaling the sum instead moves the vector by 5e-7 after two updates at this rate, by rounding alone)
        posterior = vae.encode(torch.stack(pixels)).latent_dist
        scale = vae.config.scaling_factor
        latents = posterior.mean * scale + posterior.std * scale * draw.latent_noise
        noisy_latents = noise_scheduler.add_noise(latents, draw.noise, draw.timesteps)
        input_ids = tokenizer(captions, padding="max_length", truncation=True,
                              max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        encoder_hidden_states = text_encoder(input_ids)[0]
        prediction = unet(noisy_latents, draw.timesteps, encoder_hidden_states).sample
        target = draw.noise
        if noise_scheduler.config.prediction_type == "v_prediction":
            alpha_bar = noise_scheduler.alphas_cumprod[draw.timesteps].view(-1, 1, 1, 1)
            target = alpha_bar.sqrt() * draw.noise - (1 - alpha_bar).sqrt() * latents
        loss = F.mse_loss(prediction.float(), target.float(), reduction="mean")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            weight[keep] = original[keep]
    rows = weight[placeholder_ids].detach().clone()
    return rows[0] if num_vectors == 1 else rows


@pytest.mark.parametrize("model, num_vectors", [("tiny", 1), ("tiny", 3), ("tiny-sd2", 2)])
def test_two_updates_equal_the_reference_loop_with_the_same_draws(accelerator, tmp_path, model, num_vectors):
    """The reference's single vector, diffusers' multi-vector tokens, and SD 2.x's v-prediction loss."""
    from semantic_aug.core.stable_diffusion import load_sd_components, resolve_model_path

    model_path = resolve_model_path(model)
    learning_rate, updates = 1e-1, 2  # a high rate, so that a wrong weight decay moves the vector visibly
    trainer = make_trainer(load_sd_components(model_path), accelerator, train_batch_size=2,
                           learning_rate=learning_rate, max_train_steps=updates, num_vectors=num_vectors)
    spec = class_specs(tmp_path)[0]
    with trainer.start([spec], seed=0) as group:
        generator_state, order_state = group.generators[0].get_state(), group.epoch_orders[0].state_dict()
        draws = [group.draw(0) for _ in range(updates)]
        group.generators[0].set_state(generator_state)  # train from the same point: the steps redraw the same
        group.epoch_orders[0].load_state_dict(order_state)
        for _ in range(updates):
            group.train_step()
        learned = group.vector(0)
    assert any(draw.flip.any() for draw in draws)  # the mirrored images are exercised
    assert (learned - trainer.initializer_vector).abs().max() > learning_rate  # AdamW moves each coordinate ~lr
    assert learned.shape == ((trainer.initializer_vector.shape[0],) if num_vectors == 1 else
                             (num_vectors, trainer.initializer_vector.shape[0]))
    reference = reference_textual_inversion_updates(model_path, spec.images, draws, learning_rate, num_vectors)
    torch.testing.assert_close(learned, reference, rtol=0, atol=1e-6)  # bit-identical on this CPU


def test_a_class_gets_the_same_gradient_alone_and_in_a_mixed_batch(parts, accelerator, tmp_path):
    trainer = make_trainer(parts, accelerator, train_batch_size=2)
    with trainer.start(class_specs(tmp_path), seed=0) as group:
        draw_a, draw_b = group.draw(0), group.draw(1)
        group.backward([(0, draw_a), (1, draw_b)], loss_divisor=2)
        mixed = group.embedding.learned.grad.clone()
        group.optimizer.zero_grad(set_to_none=True)
        group.backward([(0, draw_a)], loss_divisor=2)
        alone = group.embedding.learned.grad.clone()
    assert mixed[0].abs().sum() > 0 and mixed[1].abs().sum() > 0
    torch.testing.assert_close(mixed[0], alone[0], rtol=1e-4, atol=1e-8)
    assert torch.equal(alone[1], torch.zeros_like(alone[1]))  # class B's row gets nothing from A's samples


def test_micro_batches_and_joint_mode_give_the_result_of_separate_runs(parts, accelerator, tmp_path):
    joint = make_trainer(parts, accelerator, micro_batch_size=1).learn(class_specs(tmp_path / "joint"), seed=3)
    separate = {}
    trainer = make_trainer(parts, accelerator)
    for spec in class_specs(tmp_path / "separate"):
        separate.update(trainer.learn([spec], seed=3))
    for token in joint:
        torch.testing.assert_close(joint[token], separate[token], rtol=1e-4, atol=1e-6)


def test_uncached_latents_give_the_same_training(parts, accelerator, tmp_path):
    cached = make_trainer(parts, accelerator).learn(class_specs(tmp_path / "cached"), seed=1)
    encoded = make_trainer(parts, accelerator, cache_latents=False).learn(class_specs(tmp_path / "encoded"), seed=1)
    for token in cached:
        torch.testing.assert_close(cached[token], encoded[token], rtol=1e-4, atol=1e-6)


class Killed(Exception):
    pass


def test_a_killed_run_resumes_to_the_embeddings_of_an_uninterrupted_run(parts, accelerator, tmp_path):
    options = dict(max_train_steps=6, checkpointing_steps=2, save_steps=3)
    uninterrupted = make_trainer(parts, accelerator, **options).learn(class_specs(tmp_path / "a"), seed=0)

    def kill_after_update_5(group):
        if min(group.steps) == 5:
            raise Killed  # dies one update after the checkpoint at 4: that update is lost and redone

    with pytest.raises(Killed):
        make_trainer(parts, accelerator, **options).learn(class_specs(tmp_path / "b"), seed=0,
                                                          on_step=kill_after_update_5)
    assert [step for step, _ in find_checkpoints(tmp_path / "b" / "car")] == [2, 4]
    assert not (tmp_path / "b" / "car" / LEARNED_EMBEDS_NAME).exists()
    assert (tmp_path / "b" / "car" / "learned_embeds-steps-3.bin").is_file()

    resumed_from = []
    resumed = make_trainer(parts, accelerator, **options).learn(
        class_specs(tmp_path / "b"), seed=0, on_step=lambda group: resumed_from.append(min(group.steps)))
    assert resumed_from[0] == 5  # continued after update 4, not from the start
    for token in uninterrupted:
        assert torch.equal(resumed[token], uninterrupted[token])


def test_images_come_in_shuffled_epochs_of_images_times_repeats(parts, accelerator, tmp_path):
    """The reference's DataLoader(shuffle=True) over images × repeats: each epoch shows every image `repeats` times."""
    repeats = 5
    trainer = make_trainer(parts, accelerator, repeats=repeats, train_batch_size=2)
    with trainer.start(class_specs(tmp_path), seed=0) as group:
        drawn = torch.cat([group.draw(0).image_index for _ in range(2 * 2 * repeats // 2)])  # two epochs
    epochs = drawn.view(2, 2 * repeats)
    for epoch in epochs:
        assert torch.bincount(epoch, minlength=2).tolist() == [repeats, repeats]
    assert not torch.equal(epochs[0], epochs[1])  # each epoch is shuffled afresh


def test_a_checkpoint_from_other_settings_is_refused(parts, accelerator, tmp_path):
    make_trainer(parts, accelerator, max_train_steps=2, checkpointing_steps=1).learn(class_specs(tmp_path), seed=0)
    for name in CLASSES:
        (tmp_path / name / LEARNED_EMBEDS_NAME).unlink()
    with pytest.raises(UserError, match="learning_rate"):
        make_trainer(parts, accelerator, max_train_steps=2, learning_rate=1.0).start(class_specs(tmp_path), seed=0)
    assert parts[1].get_input_embeddings().__class__.__name__ == "Embedding"  # the swap was undone


def test_the_safetensors_file_loads_with_diffusers_load_textual_inversion(parts, accelerator, tmp_path,
                                                                          tiny_model_path):
    from semantic_aug.core.stable_diffusion import load_stable_diffusion

    learned = make_trainer(parts, accelerator, max_train_steps=1).learn(class_specs(tmp_path), seed=0)
    assert (tmp_path / "car" / LEARNED_EMBEDS_SAFE_NAME).is_file()
    pipe = load_stable_diffusion(tiny_model_path)
    pipe.load_textual_inversion(str(tmp_path / "car"))
    token_id = pipe.tokenizer.convert_tokens_to_ids("<car>")
    assert pipe.tokenizer("a photo of a <car>", add_special_tokens=False).input_ids[-1] == token_id
    torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight[token_id], learned["<car>"])


def test_an_initializer_of_several_tokens_is_refused(parts, accelerator):
    with pytest.raises(UserError, match="single token"):
        make_trainer(parts, accelerator, initializer_token="a photo")


def test_unet_ckpt_is_loaded_and_a_bad_one_is_named(script_module, tmp_path, tiny_model_path):
    fine_tune = script_module("fine_tune")
    with pytest.raises(UserError, match="not found"):
        fine_tune.read_state_dict(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(UserError, match="junk.pt"):
        fine_tune.read_state_dict(str(tmp_path / "junk.pt"))

    from semantic_aug.core.stable_diffusion import load_sd_components

    zeros = {key: torch.zeros_like(value) for key, value in load_sd_components(tiny_model_path)[3].state_dict().items()}
    torch.save(zeros, tmp_path / "zeros.pt")
    args = fine_tune.parse_args(["--pretrained_model_name_or_path", tiny_model_path,
                                 "--unet-ckpt", str(tmp_path / "zeros.pt")])
    assert all(not p.any() for p in fine_tune.load_models(args)[3].parameters())
    zeros.pop(next(iter(zeros)))
    torch.save(zeros, tmp_path / "partial.pt")
    args.unet_ckpt = str(tmp_path / "partial.pt")
    with pytest.raises(UserError, match="does not fit"):
        fine_tune.load_models(args)


# -- the script -------------------------------------------------------------------------------------------


def fine_tune_args(output_dir: Path, *extra: str) -> list[str]:
    return ["--dataset", "custom_coco", "--pretrained_model_name_or_path", "tiny", "--examples-per-class", "2",
            "--seeds", "0", "--classes", "bench", "car", "--max_train_steps", "2", "--train_batch_size", "1",
            "--resolution", str(RESOLUTION), "--output_dir", str(output_dir), *extra]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, script_runner):
    """fine_tune.py for two Custom COCO classes, one process: (output folder, completed process)."""
    output_dir = tmp_path_factory.mktemp("one_process")
    result = script_runner("fine_tune.py", *fine_tune_args(output_dir), check=True)
    return output_dir, result


def test_fine_tune_script_writes_the_reference_layout_and_skips_finished_classes(one_process_run, script_runner):
    output_dir, result = one_process_run
    run_dir = output_dir / "fine-tuned" / "custom_coco-0-2"
    assert sorted(p.name for p in run_dir.iterdir()) == ["bench", "car"]
    for name in ("bench", "car"):
        tokens = torch.load(run_dir / name / LEARNED_EMBEDS_NAME, weights_only=True)
        assert list(tokens) == [f"<{name}>"] and tokens[f"<{name}>"].shape == (32,)
    assert "class car: loss" in result.stderr

    stamp = (run_dir / "car" / LEARNED_EMBEDS_NAME).stat().st_mtime_ns
    rerun = script_runner("fine_tune.py", *fine_tune_args(output_dir), check=True)
    assert "2 finished, 0 to learn" in rerun.stderr
    assert (run_dir / "car" / LEARNED_EMBEDS_NAME).stat().st_mtime_ns == stamp


@pytest.mark.parametrize("flag, value", [("--filter_mask_area", "5"), ("--use_manual_list", "True"), ("--seed", "3"),
                                         ("--erase-concepts", None)])
def test_reference_no_op_flags_are_refused_with_a_reason(flag, value, capsys, script_module):
    fine_tune = script_module("fine_tune")
    with pytest.raises(SystemExit) as exit_info:
        fine_tune.parse_args(["--pretrained_model_name_or_path", "tiny", flag] + ([value] if value else []))
    assert exit_info.value.code == 2
    assert f"{flag} is not supported" in capsys.readouterr().err


@pytest.mark.slow  # three process start-ups: about 20 s on 2 busy cores
def test_two_processes_learn_what_one_process_learns(one_process_run, tmp_path, repo_root):
    one = one_process_run[0]
    two = tmp_path / "two"
    env = dict(os.environ, PYTHONPATH=str(repo_root))
    launch = [*accelerate_launch(2), str(repo_root / "fine_tune.py"), *fine_tune_args(two)]
    result = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("(1 on this process)") == 2  # each process learned one of the two classes
    for name in ("bench", "car"):
        a = torch.load(one / "fine-tuned" / "custom_coco-0-2" / name / LEARNED_EMBEDS_NAME, weights_only=True)
        b = torch.load(two / "fine-tuned" / "custom_coco-0-2" / name / LEARNED_EMBEDS_NAME, weights_only=True)
        torch.testing.assert_close(a[f"<{name}>"], b[f"<{name}>"], rtol=1e-4, atol=1e-6)


def test_auto_micro_batch_starts_at_one_class_batch_for_latents_above_64(parts, accelerator, tmp_path):
    """Above SD v1's 64² latents (SD 2.x at 768², SDXL at 1024²) the automatic search starts at one class's batch,
    so a joint step runs in equal class-sized passes; an explicit size wins, and a size the search settled on
    survives the next configuration."""
    assert make_trainer(parts, accelerator, train_batch_size=2).micro_batch_size == 0  # 16² latents: whole step
    resolution = 136  # the tiny VAE halves a side: 68² latents
    assert make_trainer(parts, accelerator, resolution=resolution, micro_batch_size=3).micro_batch_size == 3
    trainer = make_trainer(parts, accelerator, resolution=resolution, train_batch_size=2, max_train_steps=1)
    assert trainer.micro_batch_size == 2
    batch_sizes = []
    hook = trainer.unet.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
    try:
        trainer.learn(class_specs(tmp_path), seed=0)
    finally:
        hook.remove()
    assert batch_sizes == [2, 2]  # two classes × 2 samples in two passes of one class's batch
    trainer.micro_batch_size = 1  # as if the search had halved it
    trainer.configure(TextualInversionConfig(resolution=resolution, train_batch_size=2))
    assert trainer.micro_batch_size == 1

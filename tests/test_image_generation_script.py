"""test_image_generation.py with the tiny SD: images from learned tokens, prompts in turn, seeded, resumable."""

import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from semantic_aug.core.embeddings import save_tokens
from semantic_aug.core.utils import UserError
from conftest import import_script

TINY_WIDTH = 32  # the tiny SD's text encoder width
PROMPTS = ["a photo of a <bench>", "a <bench_0.005> in the snow"]






@pytest.fixture(scope="module")
def generation_script(repo_root):
    """The script as a module, to call its parse_args/main in this process (saves the imports' seconds)."""
    return import_script("test_image_generation")


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory):
    generator = torch.Generator().manual_seed(0)
    path = tmp_path_factory.mktemp("tokens") / "custom_coco-0-2.pt"
    save_tokens({"<bench>": torch.randn(TINY_WIDTH, generator=generator),
                 "<bench_0.005>": torch.randn(TINY_WIDTH, generator=generator)}, path)
    return path


def run_main(module, monkeypatch, *args) -> None:
    monkeypatch.setattr(sys, "argv", [module.__file__, *map(str, args)])
    module.main(module.parse_args())


def common(tokens_file, out, *extra):
    return ["--model-path", "tiny", "--embed-path", tokens_file, "--out", out, "--num-inference-steps", 2,
            "--device", "cpu", *extra]


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_cli_writes_seeded_images_with_prompts_in_turn(tokens_file, tmp_path, script_runner, tiny_model_path):
    out = tmp_path / "out"
    script_runner("test_image_generation.py", *common(tokens_file, out, "--num-generate", 3, "--batch-size", 3,
                                                      "--prompt", *PROMPTS), check=True)
    for idx in range(3):
        with Image.open(out / f"{idx}.png") as image:
            assert image.size == (64, 64)  # the tiny model's native resolution
    manifest = pd.read_csv(out / "manifest.csv")
    assert list(manifest["prompt"]) == [PROMPTS[0], PROMPTS[1], PROMPTS[0]]
    assert manifest["seed"].nunique() == 3
    assert not np.array_equal(pixels(out / "0.png"), pixels(out / "2.png"))  # same prompt, own seed


def test_batch_size_resume_and_default_prompt(tokens_file, tmp_path, generation_script, monkeypatch, tiny_model_path):
    first, second = tmp_path / "batch2", tmp_path / "batch1"
    fast = ["--guidance-scale", 1]  # no classifier-free guidance: half the UNet work on a CPU
    run_main(generation_script, monkeypatch, *common(tokens_file, first, "--num-generate", 2, "--batch-size", 2, *fast))
    run_main(generation_script, monkeypatch, *common(tokens_file, second, "--num-generate", 2, "--batch-size", 1, *fast))
    for idx in range(2):  # the same images whatever the batch size (float tolerance: 1 level of 255)
        assert np.abs(pixels(first / f"{idx}.png") - pixels(second / f"{idx}.png")).max() <= 1

    # the default prompt is one prompt, not its characters (the reference's bug)
    assert set(pd.read_csv(first / "manifest.csv")["prompt"]) == {"a photo of a <bench>"}

    # a rerun keeps existing images and only makes the missing ones
    before = (first / "0.png").stat().st_mtime_ns
    (first / "1.png").unlink()
    run_main(generation_script, monkeypatch, *common(tokens_file, first, "--num-generate", 3, "--batch-size", 2, *fast))
    assert (first / "0.png").stat().st_mtime_ns == before
    assert np.abs(pixels(first / "1.png") - pixels(second / "1.png")).max() <= 1  # regenerated identically
    assert (first / "2.png").is_file() and len(pd.read_csv(first / "manifest.csv")) == 3


def test_unknown_token_and_missing_file_are_user_errors(tokens_file, tmp_path, generation_script, monkeypatch,
                                                        tiny_model_path):
    with pytest.raises(UserError, match=r"token\(s\) <chair> of --prompt are not in"):
        run_main(generation_script, monkeypatch, *common(tokens_file, tmp_path, "--prompt", "a photo of a <chair>"))
    with pytest.raises(UserError, match="token file not found"):
        run_main(generation_script, monkeypatch, *common(tmp_path / "missing.pt", tmp_path))

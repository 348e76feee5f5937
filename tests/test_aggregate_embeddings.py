"""Token files and DIAGen's `embedding_noise` (`semantic_aug.core.embeddings`, `aggregate_embeddings.py`)."""

import math
from pathlib import Path

import pytest
import torch

from semantic_aug.datasets.custom_coco import CUSTOM_COCO_CLASSES
from semantic_aug.core.embeddings import (LEARNED_EMBEDS_NAME, add_tokens_to_text_encoder, embedding_noise, load_tokens,
                                     noisy_token_name, save_learned_embeds, save_tokens, token_name)
from semantic_aug.core.layout import RunLayout
from semantic_aug.core.utils import UserError

STD_DEVIATIONS = (0.005, 0.01, 0.025)  # the paper's σ
SD_WIDTH = 768  # SD v1.x text embedding width


def random_tokens(names, width=SD_WIDTH, seed=0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {token_name(name): torch.randn(width, generator=generator) * 0.3 for name in names}


# -- names and paths --------------------------------------------------------------------------------------


def test_token_names_follow_the_reference():
    assert token_name("cell phone") == "<cell_phone>"
    assert token_name("bench") == "<bench>"
    assert noisy_token_name("cell phone", 0.005) == "<cell_phone_0.005>"
    assert noisy_token_name("bench", 0.01) == "<bench_0.01>"


# -- embedding_noise (contribution a) ---------------------------------------------------------------------


def test_embedding_noise_adds_one_copy_per_sigma_at_the_absolute_scale():
    tokens = random_tokens(["car", "carrot"])
    noisy = embedding_noise(tokens, STD_DEVIATIONS, seed=0)
    assert list(noisy) == ["<car>", "<car_0.005>", "<car_0.01>", "<car_0.025>",
                           "<carrot>", "<carrot_0.005>", "<carrot_0.01>", "<carrot_0.025>"]
    for token, vector in tokens.items():
        assert torch.equal(noisy[token], vector)
        for std in STD_DEVIATIONS:
            copy = noisy[noisy_token_name(token[1:-1], std)]
            assert copy.shape == vector.shape
            distance = (copy - vector).norm().item()
            assert distance == pytest.approx(std * math.sqrt(SD_WIDTH), rel=0.15)


def test_embedding_noise_is_seeded_and_independent_of_the_other_tokens():
    tokens = random_tokens(["car", "carrot"])
    first, again = embedding_noise(tokens, STD_DEVIATIONS, seed=7), embedding_noise(tokens, STD_DEVIATIONS, seed=7)
    other_seed = embedding_noise(tokens, STD_DEVIATIONS, seed=8)
    alone = embedding_noise({"<car>": tokens["<car>"]}, STD_DEVIATIONS, seed=7)
    for key in first:
        assert torch.equal(first[key], again[key])
    assert not torch.equal(first["<car_0.01>"], other_seed["<car_0.01>"])
    assert torch.equal(first["<car_0.01>"], alone["<car_0.01>"])
    noise = {std: first[f"<car_{std}>"] - tokens["<car>"] for std in STD_DEVIATIONS}
    assert not torch.allclose(noise[0.01] / 0.01, noise[0.025] / 0.025)  # each σ has its own draw
    assert not torch.allclose(first["<car_0.01>"] - tokens["<car>"], first["<carrot_0.01>"] - tokens["<carrot>"])


# -- token files ----------------------------------------------------------------------------------------


def test_load_tokens_reads_what_save_tokens_wrote_in_both_formats(tmp_path):
    tokens = random_tokens(["car", "cell phone"], width=32)
    for name in ("tokens.pt", "tokens.safetensors"):
        save_tokens(tokens, tmp_path / name)
        loaded = load_tokens(tmp_path / name, class_names=["car", "cell phone"], embedding_dim=32)
        assert list(loaded) == list(tokens)
        assert all(torch.equal(loaded[key], tokens[key]) for key in tokens)


def test_load_tokens_names_each_problem(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_tokens(tmp_path / "missing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="garbage.pt.*not a torch file"):
        load_tokens(tmp_path / "garbage.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(UserError, match="expected a dict"):
        load_tokens(tmp_path / "list.pt")
    save_tokens(random_tokens(["carrot"], width=32), tmp_path / "carrot.pt")
    with pytest.raises(UserError, match=r"no token <car> for class 'car'"):  # exact names: <carrot> is not <car>
        load_tokens(tmp_path / "carrot.pt", class_names=["car"])
    with pytest.raises(UserError, match="32 wide.*expects 768"):
        load_tokens(tmp_path / "carrot.pt", embedding_dim=768)


def test_add_tokens_to_text_encoder_gives_one_id_per_token_and_writes_the_vectors(tiny_model_path):
    from semantic_aug.core.stable_diffusion import load_sd_components

    tokenizer, text_encoder = load_sd_components(tiny_model_path)[:2]
    vocabulary = len(tokenizer)
    tokens = random_tokens(["car", "carrot"], width=32)
    ids = add_tokens_to_text_encoder(tokenizer, text_encoder, tokens)
    assert ids == [vocabulary, vocabulary + 1]
    assert tokenizer("a photo of a <carrot>", add_special_tokens=False).input_ids[-1] == ids[1]
    weight = text_encoder.get_input_embeddings().weight
    assert torch.equal(weight[ids[0]], tokens["<car>"]) and torch.equal(weight[ids[1]], tokens["<carrot>"])

    again = add_tokens_to_text_encoder(tokenizer, text_encoder, {"<car>": torch.zeros(32)})  # reused, overwritten
    assert again == ids[:1] and len(tokenizer) == vocabulary + 2
    assert torch.equal(text_encoder.get_input_embeddings().weight[ids[0]], torch.zeros(32))
    with pytest.raises(UserError, match="already a word"):
        add_tokens_to_text_encoder(tokenizer, text_encoder, {"car": torch.zeros(32)})
    with pytest.raises(UserError, match="expects \\[32\\]"):
        add_tokens_to_text_encoder(tokenizer, text_encoder, {"<bus>": torch.zeros(768)})


# -- aggregate_embeddings.py ------------------------------------------------------------------------------


@pytest.fixture
def fine_tuned(tmp_path) -> Path:
    """A fine-tuned/ folder as fine_tune.py leaves it for Custom COCO, seed 0, 2 examples per class."""
    root = tmp_path / "fine-tuned"
    for name, vector in zip(CUSTOM_COCO_CLASSES, random_tokens(CUSTOM_COCO_CLASSES, width=32).values()):
        save_learned_embeds(root / "custom_coco-0-2" / name, token_name(name), vector)
    return root


def aggregate_args(fine_tuned: Path, *extra: str) -> list[str]:
    return ["--dataset", "custom_coco", "--seeds", "0", "--examples-per-class", "2", "--input-path", str(fine_tuned),
            "--output-dir", str(fine_tuned.parent / "tokens"), *extra]


def test_aggregate_writes_the_tokens_and_the_seeded_noise_file(fine_tuned, script_runner, script_module):
    script_runner("aggregate_embeddings.py", *aggregate_args(fine_tuned, "--augment-embeddings", "True"), check=True)
    out = fine_tuned.parent / "tokens"
    tokens = load_tokens(RunLayout("custom_coco", 0, 2, tokens_root=out).tokens(), class_names=CUSTOM_COCO_CLASSES,
                         embedding_dim=32)
    assert list(tokens) == [token_name(name) for name in CUSTOM_COCO_CLASSES]
    noise_file = RunLayout("custom_coco", 0, 2, tokens_root=out).tokens(noise=True)
    noisy = load_tokens(noise_file, class_names=CUSTOM_COCO_CLASSES, embedding_dim=32)
    assert len(noisy) == 4 * len(CUSTOM_COCO_CLASSES)
    assert {"<cell_phone>", "<cell_phone_0.005>", "<cell_phone_0.01>", "<cell_phone_0.025>"} <= set(noisy)
    assert torch.equal(noisy["<car>"], tokens["<car>"])

    before = noise_file.read_bytes()
    aggregate = script_module("aggregate_embeddings")
    aggregate.main(aggregate.parse_args(aggregate_args(fine_tuned, "--augment-embeddings", "1")))
    assert load_tokens(noise_file)["<car_0.01>"].equal(noisy["<car_0.01>"])  # seeded: a rerun writes the same noise
    assert noise_file.read_bytes() == before


def test_the_reference_embed_path_command_writes_its_one_file(fine_tuned, script_module, monkeypatch):
    """The reference's noise command: --embed-path names the file, which holds the tokens and their noisy copies."""
    monkeypatch.chdir(fine_tuned.parent)
    aggregate = script_module("aggregate_embeddings")
    aggregate.main(aggregate.parse_args([
        "--seeds", "0", "--examples-per-class", "2", "--dataset", "custom_coco", "--augment-embeddings", "True",
        "--input-path", "./fine-tuned", "--embed-path",
        "tokens/{dataset}-tokens/noise/{dataset}-{seed}-{examples_per_class}.pt"]))
    noise_file = RunLayout("custom_coco", 0, 2, tokens_root=fine_tuned.parent / "tokens").tokens(noise=True)
    noisy = load_tokens(noise_file, class_names=CUSTOM_COCO_CLASSES, embedding_dim=32)
    assert len(noisy) == 4 * len(CUSTOM_COCO_CLASSES) and "<car_0.025>" in noisy
    # the one file only
    assert not RunLayout("custom_coco", 0, 2, tokens_root=fine_tuned.parent / "tokens").tokens().exists()
    aggregate.main(aggregate.parse_args(aggregate_args(fine_tuned, "--embed-path", str(fine_tuned.parent / "p.pt"))))
    assert len(load_tokens(fine_tuned.parent / "p.pt")) == len(CUSTOM_COCO_CLASSES)  # without noise: the tokens


def test_augment_embeddings_false_means_false(fine_tuned, script_module):
    aggregate = script_module("aggregate_embeddings")
    args = aggregate.parse_args(aggregate_args(fine_tuned, "--augment-embeddings", "False"))
    assert args.augment_embeddings is False
    aggregate.main(args)
    assert RunLayout("custom_coco", 0, 2, tokens_root=fine_tuned.parent / "tokens").tokens().is_file()
    assert not (fine_tuned.parent / "tokens" / "custom_coco-tokens" / "noise").exists()
    with pytest.raises(SystemExit):
        aggregate.parse_args(aggregate_args(fine_tuned, "--augment-embeddings", "maybe"))


def test_aggregate_names_a_missing_class_or_a_malformed_file(fine_tuned, script_module, script_runner):
    aggregate = script_module("aggregate_embeddings")
    run_dir = fine_tuned / "custom_coco-0-2"
    (run_dir / "bench" / LEARNED_EMBEDS_NAME).write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match=r"bench/learned_embeds.bin: not a torch file"):
        aggregate.main(aggregate.parse_args(aggregate_args(fine_tuned)))
    save_tokens({"<carrot>": torch.zeros(32)}, run_dir / "bench" / LEARNED_EMBEDS_NAME)
    with pytest.raises(UserError, match=r"holds token\(s\) <carrot>, expected exactly <bench>"):
        aggregate.main(aggregate.parse_args(aggregate_args(fine_tuned)))
    for path in (run_dir / "bench").iterdir():
        path.unlink()
    (run_dir / "bench").rmdir()
    result = script_runner("aggregate_embeddings.py", *aggregate_args(fine_tuned))
    assert result.returncode == 2
    assert result.stderr.startswith("error: missing class directory") and "bench" in result.stderr
    assert "Traceback" not in result.stderr

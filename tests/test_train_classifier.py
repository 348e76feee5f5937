"""train_classifier.py end to end on CPU: the baseline and a Textual-Inversion + filter run on a small Custom-COCO
layout (efficientnet_lite0 at 32 px, tiny SD), the reference's output files, resume, and one-line errors."""

import importlib.util
import re
import sys

import pandas as pd
import pytest
import torch
from PIL import Image

from semantic_aug.datasets.custom_coco import CUSTOM_COCO_CLASSES
from semantic_aug.core.embeddings import save_tokens, token_name
from semantic_aug.stages.training import RESULTS_COLUMNS, TEST_COLUMNS, load_classifier
from semantic_aug.core.utils import UserError

from conftest import write_class_folders

SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # tiny models; shared CPUs thrash with more threads
QUICK = ["--classifier-backbone", "efficientnet_lite0", "--image-size", "32", "--iterations-per-epoch", "2",
         "--num-epochs", "2", "--batch-size", "8", "--seeds", "0", "--examples-per-class", "1", "--num-workers", "2"]


@pytest.fixture(scope="module")
def script(repo_root):
    """train_classifier.py imported as a module, to call parse_args / main in-process."""
    spec = importlib.util.spec_from_file_location("train_classifier_script", repo_root / "train_classifier.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Custom COCO's layout with 9 train-val images (8 in the training pool, 1 for validation) and 1 test image
    per class, 32x24 random pictures; Custom COCO's default data for this module ($CUSTOM_COCO_DIR), so the files
    keep the plain `custom_coco` names."""
    root = write_class_folders(tmp_path_factory.mktemp("custom_coco"), CUSTOM_COCO_CLASSES)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CUSTOM_COCO_DIR", str(root))
        yield root


def run_paths(cwd, method, name="classifier_custom_coco_0_1.pth"):
    base = cwd / "RESULTS" / "custom_coco_1epc" / method
    return (base / "logs" / "results_custom_coco_0_1.csv", base / "test" / "test_results_custom_coco_0_1.csv",
            base / "models" / name)


def test_baseline_writes_spec_outputs_and_resumes(script_runner, data_dir, tmp_path):
    arguments = ["--data-dir", data_dir, "--num-synthetic", "0", "--eval_on_test_set", "test", *QUICK]
    first = script_runner("train_classifier.py", *arguments, cwd=tmp_path, env=SINGLE_THREAD, check=True)
    results, test, model = run_paths(tmp_path, "baseline")

    history = pd.read_csv(results)
    assert list(history.columns) == RESULTS_COLUMNS
    assert set(history["split"]) == {"Training", "Validation"} and set(history["epoch"]) == {0, 1}
    assert {"Loss", "Accuracy", "Loss Bench", "Accuracy Wine_Glass"} <= set(history["metric"])
    table = pd.read_csv(test)
    assert list(table.columns) == TEST_COLUMNS and table["metric"][:2].tolist() == ["Mean Loss", "Mean Accuracy"]
    assert len(table) == 2 + 2 * len(CUSTOM_COCO_CLASSES) and table["value"].notna().all()
    classifier = load_classifier(model)
    assert classifier.class_names == list(CUSTOM_COCO_CLASSES) and classifier.metadata["image_size"] == 32
    assert "best epoch" in first.stderr

    stamps = [p.stat().st_mtime_ns for p in (results, test, model)]
    again = script_runner("train_classifier.py", *arguments, cwd=tmp_path, env=SINGLE_THREAD, check=True)
    assert "skipped" in again.stderr and [p.stat().st_mtime_ns for p in (results, test, model)] == stamps

    test.unlink()  # a lost test CSV is remade from the saved model, without training again
    third = script_runner("train_classifier.py", *arguments, cwd=tmp_path, env=SINGLE_THREAD, check=True)
    assert "evaluating the saved model" in third.stderr and results.stat().st_mtime_ns == stamps[0]
    pd.testing.assert_frame_equal(pd.read_csv(test), table)


def test_a_rerun_on_a_complete_synthetic_set_loads_no_diffusion_model(script, data_dir, tmp_path, monkeypatch):
    """Once the set is complete on disk, a run finds it from the model's configs alone, to the same results."""
    from semantic_aug.stages.augmentations.sampler import DiffusionSampler

    monkeypatch.chdir(tmp_path)
    generator = torch.Generator().manual_seed(0)
    save_tokens({token_name(name): torch.randn(32, generator=generator) for name in CUSTOM_COCO_CLASSES},
                tmp_path / "tokens.pt")
    arguments = [*QUICK, "--device", "cpu", "--data-dir", str(data_dir), "--method", "da_fusion", "--model-path",
                 "tiny", "--embed-path", "tokens.pt", "--num-synthetic", "2", "--num-inference-steps", "2",
                 "--strength", "0.5", "--guidance-scale", "7.5", "--synthetic-probability", "1"]
    script.main(script.parse_args(arguments))
    results, _, model = run_paths(tmp_path, "da_fusion", "classifier_custom_coco_0_1_[0.5]_[7.5].pth")
    synthetic_dir = tmp_path / "RESULTS" / "custom_coco_1epc" / "da_fusion" / "synthetics_seed_0"
    first = {path: path.read_bytes() for path in (results, synthetic_dir / "manifest.csv")}
    first_state = load_classifier(model).state_dict()
    results.unlink()
    model.unlink()

    def no_model(*args, **kwargs):
        raise AssertionError("the diffusion pipeline was loaded for a complete synthetic set")

    monkeypatch.setattr(DiffusionSampler, "from_pretrained", no_model)
    script.main(script.parse_args(arguments))
    assert {path: path.read_bytes() for path in first} == first  # the same history, the same manifest
    again = load_classifier(model).state_dict()
    assert all(torch.equal(again[name], tensor) for name, tensor in first_state.items())


def test_textual_inversion_with_filter(script_runner, data_dir, tmp_path):
    generator = torch.Generator().manual_seed(0)
    tokens = tmp_path / "tokens.pt"
    save_tokens({token_name(name): torch.randn(32, generator=generator) for name in CUSTOM_COCO_CLASSES}, tokens)
    result = script_runner(
        "train_classifier.py", "--data-dir", data_dir, "--method", "diagen", "--model-path", "tiny",
        "--embed-path", tokens, "--num-synthetic", "1", "--num-inference-steps", "4", "--strength", "0.5",
        "--guidance-scale", "7.5", "--synthetic-probability", "1", "--synthetic_filter", "train",
        "--filter-backbone", "efficientnet_lite0", "--filter-mode", "loss", "--models-root", tmp_path / "models", *QUICK, cwd=tmp_path, env=SINGLE_THREAD,
        check=True)
    results, _, model = run_paths(tmp_path, "diagen", "classifier_custom_coco_0_1_[0.5]_[7.5]_filter.pth")
    assert results.is_file() and model.is_file()
    synthetic_dir = tmp_path / "RESULTS" / "custom_coco_1epc" / "diagen" / "synthetics_seed_0"
    manifest = pd.read_csv(synthetic_dir / "manifest.csv")
    assert len(manifest) == len(CUSTOM_COCO_CLASSES) and manifest["filter_weight"].between(0, 1).all()
    # resized back to the real images' size
    assert all(Image.open(tmp_path / path).size == (32, 24) for path in manifest["path"])
    assert (tmp_path / "models" / "filter_custom_coco_0_1.pth").is_file()
    assert f"{len(CUSTOM_COCO_CLASSES)} real + {len(CUSTOM_COCO_CLASSES)} synthetic images" in result.stderr


def test_the_readme_steps_find_the_filter_with_default_models_roots(script_runner, data_dir, tmp_path):
    """train_filter.py then train_classifier.py --synthetic_filter use, neither given --models-root."""
    generator = torch.Generator().manual_seed(0)
    tokens = tmp_path / "tokens.pt"
    save_tokens({token_name(name): torch.randn(32, generator=generator) for name in CUSTOM_COCO_CLASSES}, tokens)
    script_runner("train_filter.py", "--data-dir", data_dir, "--seeds", "0", "--examples-per-class", "1",
                  "--classifier-backbone", "efficientnet_lite0", "--image-size", "32", "--iterations-per-epoch", "1",
                  "--max-epochs", "1", "--batch-size", "8", "--temperature-iterations", "1", cwd=tmp_path,
                  env=SINGLE_THREAD, check=True)
    script_runner("train_classifier.py", "--data-dir", data_dir, "--method", "diagen", "--model-path", "tiny",
                  "--embed-path", tokens, "--num-synthetic", "1", "--num-inference-steps", "2",
                  "--synthetic_filter", "use", *QUICK, cwd=tmp_path, env=SINGLE_THREAD, check=True)
    manifest = pd.read_csv(tmp_path / "RESULTS" / "custom_coco_1epc" / "diagen" / "synthetics_seed_0" / "manifest.csv")
    assert manifest["filter_id"].str.startswith("filter_custom_coco_0_1.pth@").all()


@pytest.mark.parametrize("missing", ["filter", "second run's tokens", "prompt class"])
def test_every_input_is_checked_before_the_first_image(script_runner, data_dir, tmp_path, missing):
    """Tokens of every run, the prompt CSV and the filters are read before any image is generated."""
    generator = torch.Generator().manual_seed(0)
    for seed in (0, 1):
        if not (missing == "second run's tokens" and seed == 1):
            save_tokens({token_name(name): torch.randn(32, generator=generator) for name in CUSTOM_COCO_CLASSES},
                        tmp_path / f"tokens-{seed}.pt")
    classes = CUSTOM_COCO_CLASSES[:-1] if missing == "prompt class" else CUSTOM_COCO_CLASSES
    (tmp_path / "prompts.csv").write_text("class_name;class_idx;prompt\n" + "".join(
        f"{name};1;a photo of a {{name}} outside\n" for name in classes))
    if missing != "filter":
        for seed in (0, 1):  # any file will do: only its existence is checked up front
            (tmp_path / "models").mkdir(exist_ok=True)
            (tmp_path / "models" / f"filter_custom_coco_{seed}_1.pth").write_bytes(b"")
    result = script_runner(
        "train_classifier.py", "--data-dir", data_dir, "--method", "diagen", "--model-path", "tiny",
        "--embed-path", tmp_path / "tokens-{seed}.pt", "--num-synthetic", "1", "--num-inference-steps", "2",
        "--use-generated-prompts", "1", "--prompt-path", tmp_path / "prompts.csv", "--synthetic_filter", "use",
        *QUICK, "--seeds", "0", "1", cwd=tmp_path, env=SINGLE_THREAD)
    expected = {"filter": "no trained filter at models/filter_custom_coco_0_1.pth",
                "second run's tokens": "tokens-1.pt", "prompt class": "has no prompts for class(es) wine_glass"}
    assert result.returncode == 2 and expected[missing] in result.stderr.strip().splitlines()[-1]
    assert not list(tmp_path.glob("RESULTS/**/*.png"))  # nothing generated


def test_errors_are_one_line(script_runner, tmp_path):
    result = script_runner("train_classifier.py", "--data-dir", tmp_path / "missing", *QUICK, env=SINGLE_THREAD)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: dataset directory does not exist: {tmp_path / 'missing'} (from --data-dir)"]


@pytest.mark.parametrize("arguments, message", [
    (["--filter_mask_area", "3"], "--filter_mask_area 3"),
    (["--synthetic-probability", "1.5"], "--synthetic-probability must lie in [0, 1]"),
    (["--synthetic_filter", "use", "--num-synthetic", "0"], "needs synthetic images"),
    (["--use-generated-prompts", "maybe"], "expected a boolean"),
    (["--dataset", "coco", "--eval_on_test_set", "test_uncommon"], "coco has no such split"),
])
def test_impossible_flags_are_parser_errors(script, capsys, arguments, message):
    with pytest.raises(SystemExit) as stop:
        script.parse_args(arguments)
    assert stop.value.code == 2 and message in capsys.readouterr().err.strip().splitlines()[-1]


def test_flags_keep_the_reference_spellings(script):
    args = script.parse_args(["--use-generated-prompts", "0", "--use-embedding-noise", "1", "--save_model", "False",
                              "--eval_on_test_set", "test", "test_uncommon", "--synthetic_filter", "None"])
    assert args.use_generated_prompts is False and args.use_embedding_noise is True and args.save_model is False
    assert args.eval_on_test_set == ["test", "test_uncommon_context"] and args.synthetic_filter is None
    run = script.plan_run(args, seed=1, examples_per_class=4)
    assert run.embed_path.as_posix() == "tokens/custom_coco-tokens/noise/custom_coco-1-4.pt"
    assert run.layout.logdir.as_posix() == "RESULTS/custom_coco_4epc/baseline/logs"
    assert run.layout.synthetic_dir.as_posix() == "RESULTS/custom_coco_4epc/baseline/synthetics_seed_1"
    assert run.model_path.name == "classifier_custom_coco_1_4_[0.7]_[15.0]_noise.pth"


@pytest.mark.parametrize("arguments, message", [
    (["--logdir", "runs/{unknown}/logs"], "--logdir"),
    (["--eval_on_test_set", "test_uncommon_context"], "test_uncommon_context not found"),
    (["--num-synthetic", "1", "--model-path", "tiny", "--strength", "1.5"], "--strength must lie in (0, 1]"),
    (["--num-synthetic", "1", "--model-path", "tiny", "--embed-path", "no/such/tokens.pt"], "token file not found"),
])
def test_bad_inputs_raise_user_errors(script, tmp_path, monkeypatch, arguments, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=re.escape(message)):
        script.main(script.parse_args([*QUICK, "--device", "cpu", *arguments]))


def test_methods_with_identical_generation_settings_share_one_set(script_runner, data_dir, tmp_path):
    """A second method whose images would be the same (here: the first plus the filter) links them, and a method with
    other generation settings makes its own."""
    generator = torch.Generator().manual_seed(0)
    tokens = tmp_path / "tokens.pt"
    save_tokens({token_name(name): torch.randn(32, generator=generator) for name in CUSTOM_COCO_CLASSES}, tokens)
    generation = ["--data-dir", data_dir, "--model-path", "tiny", "--embed-path", tokens, "--num-synthetic", "1",
                  "--num-inference-steps", "2", "--strength", "0.5", *QUICK]

    def synthetic_files(method):
        folder = tmp_path / "RESULTS" / "custom_coco_1epc" / method / "synthetics_seed_0"
        return {path.name: path for path in folder.glob("*.png")}

    script_runner("train_classifier.py", *generation, "--method", "da_fusion", "--guidance-scale", "7.5",
                  cwd=tmp_path, env=SINGLE_THREAD, check=True)
    shared = script_runner("train_classifier.py", *generation, "--method", "da_fusion_filter", "--guidance-scale", "7.5",
                           "--synthetic_filter", "train", "--filter-backbone", "efficientnet_lite0",
                           "--models-root", tmp_path / "models",
                           cwd=tmp_path, env=SINGLE_THREAD, check=True)
    first, second = synthetic_files("da_fusion"), synthetic_files("da_fusion_filter")
    assert len(first) == len(CUSTOM_COCO_CLASSES) and first.keys() == second.keys()
    assert all(first[name].stat().st_ino == second[name].stat().st_ino for name in first)  # links, not copies
    assert f"{len(CUSTOM_COCO_CLASSES)} linked from" in shared.stderr
    assert "augmentation for custom_coco" not in shared.stderr  # nothing to make: the diffusion model is not loaded

    other = script_runner("train_classifier.py", *generation, "--method", "other_guidance", "--guidance-scale", "5",
                          cwd=tmp_path, env=SINGLE_THREAD, check=True)
    third = synthetic_files("other_guidance")
    assert "linked from" not in other.stderr and third.keys() == first.keys()
    assert all(third[name].stat().st_ino != first[name].stat().st_ino for name in first)

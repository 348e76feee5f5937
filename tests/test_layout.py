"""`RunLayout`: every hand-off file of a run in one place, and caches that follow the data (own-data rule)."""

import dataclasses
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from semantic_aug.core.layout import (FINE_TUNED_FOLDER, RESULTS_FILE, RUN_FOLDER, SYNTHETIC_FOLDER, TEST_FILE,
                                      RunLayout)
from semantic_aug.core.utils import UserError
from semantic_aug.datasets import check_dataset_arguments, dataset_key
from semantic_aug.datasets.few_shot_dataset import FolderFewShotDataset
from semantic_aug.datasets.registry import DATASETS, register_dataset


@pytest.mark.parametrize("key", ["custom_coco", "custom_coco-1a2b3c4d"])
def test_layout_names_every_file_of_the_readme_pipeline(key):
    """The README's hand-off diagram, spelled out for a plain and a fingerprinted dataset key."""
    layout = RunLayout(key, 1, 4, method="diagen")
    assert layout.fine_tuned_dir == Path(f"fine-tuned/{key}-1-4")
    assert layout.tokens() == Path(f"tokens/{key}-tokens/{key}-1-4.pt")
    assert layout.tokens(noise=True) == Path(f"tokens/{key}-tokens/noise/{key}-1-4.pt")
    assert layout.embed_path(noise=True) == layout.tokens(noise=True)
    assert layout.filter == Path(f"models/filter_{key}_1_4.pth")
    assert layout.filter_logs("logs") == (Path(f"logs/train_filter_{key}_1_4.csv"),
                                          Path(f"logs/calibration_filter_{key}_1_4.csv"))
    method_dir = Path(f"RESULTS/{key}_4epc/diagen")
    assert layout.synthetic_dir == method_dir / "synthetics_seed_1"
    assert layout.manifest == method_dir / "synthetics_seed_1/manifest.csv"
    assert layout.results_csv == method_dir / f"logs/results_{key}_1_4.csv"
    assert layout.test_csv("test") == method_dir / f"test/test_results_{key}_1_4.csv"
    assert layout.classifier() == method_dir / f"models/classifier_{key}_1_4.pth"
    assert layout.classifier(strength=[0.7], guidance_scale=[15.0], use_filter=True, use_llm=True, use_noise=True,
                             uncommon=True) == \
        method_dir / f"models/classifier_{key}_1_4_[0.7]_[15.0]_filter_llm_noise_uncommon.pth"
    assert layout.evaluation_csv("logs", "val") == Path(f"logs/evaluation_on_{key}_val_1_4.csv")

    # report.py reads the same names back
    assert RESULTS_FILE.match(layout.results_csv.name).group("dataset", "seed", "epc") == (key, "1", "4")
    assert TEST_FILE.match(layout.test_csv("test_uncommon_context").name).group("split", "dataset") == \
        ("test_uncommon_context", key)
    assert RUN_FOLDER.match(layout.method_dir.parent.name).group("dataset", "epc") == (key, "4")
    assert SYNTHETIC_FOLDER.match(layout.synthetic_dir.name)["seed"] == "1"


def test_layout_roots_and_the_path_flags_templates():
    layout = RunLayout("focus", 0, 2, method="baseline", fine_tuned_root="out/fine-tuned", tokens_root="tok",
                       models_root="m", results_root="runs",
                       logdir_template="x/{dataset}/{method}/{examples_per_class}/logs",
                       synthetic_dir_template="x/{method}/syn_{seed}",
                       embed_path_template="t/{dataset}-{seed}-{examples_per_class}.pt")
    assert layout.fine_tuned_dir == Path("out/fine-tuned/focus-0-2")
    assert layout.tokens() == Path("tok/focus-tokens/focus-0-2.pt")
    assert layout.filter == Path("m/filter_focus_0_2.pth")
    assert layout.method_dir == Path("runs/focus_2epc/baseline")
    assert layout.logdir == Path("x/focus/baseline/2/logs")
    assert layout.results_csv == Path("x/focus/baseline/2/logs/results_focus_0_2.csv")
    assert layout.test_csv("test") == Path("x/focus/baseline/2/test/test_results_focus_0_2.csv")
    assert layout.synthetic_dir == Path("x/baseline/syn_0")
    assert layout.embed_path() == layout.embed_path(noise=True) == Path("t/focus-0-2.pt")  # the flag wins
    assert dataclasses.replace(layout, method="*").synthetic_dir == Path("x/*/syn_0")
    with pytest.raises(UserError, match=re.escape("--logdir 'runs/{unknown}'")):
        _ = dataclasses.replace(layout, logdir_template="runs/{unknown}").logdir


# -- caches follow the data -----------------------------------------------------------------------------------

CLASSES = ("cat", "dog")


def write_data(root: Path, seed: int) -> Path:
    """9 train-val and 1 test image per class, each of a size drawn by `seed` (so the fingerprint tells copies)."""
    rng = np.random.default_rng(seed)
    for name in CLASSES:
        for split, count in (("train-val", 9), ("test", 1)):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                size = (int(rng.integers(16, 40)), int(rng.integers(16, 40)))
                Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture
def pets(tmp_path, monkeypatch):
    """A named two-class dataset whose default data is `tmp_path/default`, registered for this test only."""
    default = write_data(tmp_path / "default", seed=0)
    monkeypatch.setitem(DATASETS, "pets_test", None)

    @register_dataset("pets_test")
    class Pets(FolderFewShotDataset):
        class_names = CLASSES
        default_data_dir = default

    return default


def import_script(name: str):
    """A top-level script as a module, kept in `sys.modules` (its dataclasses look their module up there)."""
    import importlib.util

    from conftest import REPO_ROOT

    spec = importlib.util.spec_from_file_location(f"layout_test_{name}", REPO_ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def script_layouts(data_dir: Path | None, tmp_path: Path) -> dict:
    """Every artifact path of (seed 0, 2 per class) as each script resolves it from its own command line."""
    data = ["--data-dir", str(data_dir)] if data_dir else []
    common = ["--dataset", "pets_test", *data, "--seeds", "0", "--examples-per-class", "2"]
    paths = {}

    args = import_script("fine_tune").parse_args([*common, "--pretrained_model_name_or_path", "tiny",
                                                  "--output_dir", "out"])
    check_dataset_arguments(args, args.examples_per_class)  # what main does first
    paths["fine-tuned"] = RunLayout(args.dataset, 0, 2, fine_tuned_root=Path(args.output_dir) / FINE_TUNED_FOLDER
                                    ).fine_tuned_dir

    aggregate = import_script("aggregate_embeddings")
    args = aggregate.parse_args(common)
    args.dataset = dataset_key(args.dataset, args.data_dir)  # what main does first
    paths["tokens"] = RunLayout(args.dataset, 0, 2, tokens_root=args.output_dir).tokens()

    args = import_script("train_filter").parse_args(common)
    check_dataset_arguments(args, args.examples_per_class)
    paths["filter"] = RunLayout(args.dataset, 0, 2, models_root=args.models_root).filter

    train_classifier = import_script("train_classifier")
    args = train_classifier.parse_args([*common, "--method", "diagen", "--use-embedding-noise", "1"])
    check_dataset_arguments(args, args.examples_per_class)
    run = train_classifier.plan_run(args, 0, 2)
    paths.update({"embed": run.embed_path, "synthetic": run.layout.synthetic_dir, "classifier": run.model_path,
                  "results": run.layout.results_csv})

    from semantic_aug.runner.experiments import load_config, plan_jobs

    config_path = tmp_path / "pets.yaml"
    config_path.write_text("dataset: pets_test\nseeds: [0]\nexamples_per_class: [2]\n"
                           "methods:\n  da-fusion: {aug: textual-inversion, synthetic_filter: use}\n")
    jobs = plan_jobs({**load_config(config_path), "data_dir": str(data_dir) if data_dir else None})
    paths["runner"] = frozenset(str(path) for job in jobs for path in job.outputs)
    return paths


def test_a_named_dataset_on_other_data_shares_no_cache_and_a_copy_shares_all(pets, tmp_path):
    other = write_data(tmp_path / "other", seed=1)  # the same class names, other files
    copy = tmp_path / "copy"
    shutil.copytree(other, copy)
    default_copy = tmp_path / "default_copy"
    shutil.copytree(pets, default_copy)

    on_default, named_default, on_default_copy, on_other, on_copy = (
        script_layouts(folder, tmp_path) for folder in (None, pets, default_copy, other, copy))

    # the default data, however named, keeps the plain name: the reference's file names
    assert on_default == named_default == on_default_copy
    assert on_default["tokens"] == Path("tokens/pets_test-tokens/pets_test-0-2.pt")
    assert on_default["filter"] == Path("models/filter_pets_test_0_2.pth")
    assert on_default["classifier"].name == "classifier_pets_test_0_2_[0.7]_[15.0]_noise.pth"

    # other data: every script and the runner add the same fingerprint, so nothing learned on the default is reused
    key = dataset_key("pets_test", other)
    assert re.fullmatch(r"pets_test-[0-9a-f]{8}", key)
    for what, path in on_other.items():
        assert path != on_default[what], what
    assert not on_other["runner"] & on_default["runner"]
    for what in ("fine-tuned", "tokens", "filter", "embed", "synthetic", "classifier", "results"):
        assert key in str(on_other[what]), what
    assert on_other["tokens"] == Path(f"tokens/{key}-tokens/{key}-0-2.pt")
    assert on_other["filter"] == Path(f"models/filter_{key}_0_2.pth")
    assert all(key in path for path in on_other["runner"] if "prompts" not in path)

    # a rerun on the same images (a copy) reuses everything
    assert on_copy == on_other

    # a key names its data: given with other data, it is refused in one line
    with pytest.raises(UserError, match=f"dataset {key} was made from other data"):
        dataset_key(key, pets)


def test_the_shipped_custom_coco_keeps_its_name():
    from semantic_aug.datasets.custom_coco import CustomCOCO

    assert dataset_key("custom_coco") == dataset_key("custom_coco", CustomCOCO.default_data_dir) == "custom_coco"

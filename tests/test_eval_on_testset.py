"""eval_on_testset.py on a tiny saved classifier: the reference's CSV with the right numbers, resume, one-line
errors."""

import sys

import pandas as pd
import pytest
import torch

from semantic_aug.core.classifiers import FewShotClassifier
from semantic_aug.datasets.custom_coco import CUSTOM_COCO_CLASSES
from semantic_aug.stages.training import save_classifier
from semantic_aug.core.utils import UserError
from conftest import import_script

PREDICTED = CUSTOM_COCO_CLASSES.index("book")
IMAGE_SIZE = 32  # pixels: enough for the check, fast on a CPU






@pytest.fixture(scope="module")
def eval_script(repo_root):
    """eval_on_testset.py as a module, to call its parse_args/main in this process (saves the imports' seconds)."""
    return import_script("eval_on_testset")


def run_main(module, monkeypatch, *args) -> None:
    monkeypatch.setattr(sys, "argv", [module.__file__, *map(str, args)])
    module.main(module.parse_args())


def save_always_book(path, **metadata):
    """A classifier that predicts `book` for every image (zero head weights, a bias on that class)."""
    model = FewShotClassifier("efficientnet_lite0", len(CUSTOM_COCO_CLASSES), pretrained=False)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.bias[PREDICTED] = 10.0
    save_classifier(model, path, {"class_names": list(CUSTOM_COCO_CLASSES), "image_size": IMAGE_SIZE, **metadata})
    return path


@pytest.fixture(scope="module")
def always_book(tmp_path_factory):
    return save_always_book(tmp_path_factory.mktemp("models") / "classifier_custom_coco_0_2.pth",
                            dataset="custom_coco", seed=0, examples_per_class=2)


def test_writes_the_spec_csv_with_the_right_numbers(always_book, tmp_path, script_runner):
    result = script_runner("eval_on_testset.py", "--dataset", "custom_coco", "--split", "test", "--model", always_book,
                           "--seed", 0, "--epc", 2, "--logdir", tmp_path / "logs", "--device", "cpu",
                           check=True)
    output = tmp_path / "logs" / "evaluation_on_custom_coco_test_0_2.csv"
    table = pd.read_csv(output)
    assert list(table.columns) == ["idx", "value", "metric"]
    values = dict(zip(table["metric"], table["value"]))
    assert values["Accuracy Book"] == 1.0
    assert all(values[f"Accuracy {name.title()}"] == 0.0 for name in CUSTOM_COCO_CLASSES if name != "book")
    assert values["Mean Accuracy"] == pytest.approx(1 / len(CUSTOM_COCO_CLASSES))
    assert values["Loss Book"] < values["Loss Bench"]  # confident and right vs. confident and wrong
    assert {"Mean Loss", *(f"Loss {name.title()}" for name in CUSTOM_COCO_CLASSES)} <= set(values)
    assert "4.35%" in result.stderr  # 1/23 as the logged mean per-class accuracy

    # a rerun keeps the CSV (it is newer than the model); --overwrite evaluates again
    before = output.stat().st_mtime_ns
    result = script_runner("eval_on_testset.py", "--model", always_book, "--epc", 2, "--logdir", tmp_path / "logs",
                           "--device", "cpu", check=True)
    assert "kept" in result.stderr and output.stat().st_mtime_ns == before


def test_val_split_depends_on_the_seed_and_uses_the_alias(tmp_path, eval_script, monkeypatch):
    seed_one = save_always_book(tmp_path / "seed_one.pth", dataset="custom_coco", seed=1, examples_per_class=4)
    run_main(eval_script, monkeypatch, "--split", "val", "--model", seed_one, "--logdir", tmp_path, "--device", "cpu")
    values = pd.read_csv(tmp_path / "evaluation_on_custom_coco_val_1_4.csv").set_index("metric")["value"]
    assert values["Accuracy Book"] == 1.0

    # the reference's split name still works; the shipped Custom COCO copy has no uncommon-context folder
    with pytest.raises(UserError, match="split folder not found: .*test_uncommon_context"):
        run_main(eval_script, monkeypatch, "--split", "test_uncommon", "--model", seed_one, "--logdir", tmp_path,
                 "--device", "cpu")


def test_bad_inputs_are_one_line_errors(tmp_path, eval_script, monkeypatch, script_runner):
    result = script_runner("eval_on_testset.py", "--model", tmp_path / "missing.pth", "--logdir", tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error: classifier checkpoint not found")
    assert "Traceback" not in result.stderr

    focus_model = tmp_path / "focus.pth"
    save_classifier(FewShotClassifier("efficientnet_lite0", 10, pretrained=False), focus_model,
                    {"class_names": ["bird"] * 10, "image_size": IMAGE_SIZE, "dataset": "custom_coco", "seed": 0,
                     "examples_per_class": 1})
    with pytest.raises(UserError, match="has 10 classes but custom_coco has 23"):
        run_main(eval_script, monkeypatch, "--model", focus_model, "--logdir", tmp_path, "--device", "cpu")

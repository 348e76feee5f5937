"""report.py on a results tree with known numbers: means, standard deviations, bolding, CSV, plots, sample grids."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from semantic_aug.runner.reporting import build_report, collect_accuracies, summarize
from semantic_aug.core.utils import UserError

DATASET = "custom_coco"
CLASS_NAMES = ("Bench", "Bicycle")

# test accuracy per (method, epc): one value per seed 0, 1, 2
TEST_ACCURACY = {
    ("baseline", 2): [0.50, 0.52, 0.54],  # 52.0 ± 2.0
    ("da-fusion", 2): [0.55, 0.56, 0.60],  # 57.0 ± 2.6458 (a folder spelled as demo.sh does)
    ("diagen", 2): [0.60, 0.62, 0.64],  # 62.0 ± 2.0, best
    ("baseline", 4): [0.70, 0.70, 0.70],  # 70.0 ± 0.0, best (tie)
    ("da-fusion", 4): [0.69, 0.71],  # 70.0 ± 1.4142, best (tie), two seeds only
    ("diagen", 4): [0.65, 0.66, 0.67],  # 66.0 ± 1.0
}
# validation accuracy per epoch of (method, epc=2, seed): the best is not the last epoch
VALIDATION_HISTORY = {"baseline": [0.30, 0.45, 0.40], "diagen": [0.35, 0.50, 0.48]}


def write_results_tree(root: Path) -> None:
    """The files train_classifier.py writes, with the numbers above."""
    for (method, epc), accuracies in TEST_ACCURACY.items():
        run = root / f"{DATASET}_{epc}epc" / method
        for seed, accuracy in enumerate(accuracies):
            rows = [dict(idx=0, value=1.0 - accuracy, metric="Mean Loss"),
                    dict(idx=0, value=accuracy, metric="Mean Accuracy")]
            rows += [dict(idx=0, value=accuracy, metric=f"Accuracy {name}") for name in CLASS_NAMES]
            (run / "test").mkdir(parents=True, exist_ok=True)
            pd.DataFrame(rows).to_csv(run / "test" / f"test_results_{DATASET}_{seed}_{epc}.csv", index=False)
            validation = VALIDATION_HISTORY.get(method, [accuracy - 0.1]) if epc == 2 else [accuracy - 0.1]
            history = []
            for epoch, value in enumerate(validation):
                for split, offset in (("Training", 0.2), ("Validation", 0.0)):
                    history += [dict(idx=0, seed=seed, examples_per_class=epc, epoch=epoch, value=value + offset,
                                     metric="Accuracy", split=split),
                                dict(idx=0, seed=seed, examples_per_class=epc, epoch=epoch, value=1.0 - value,
                                     metric="Loss", split=split)]
            (run / "logs").mkdir(parents=True, exist_ok=True)
            pd.DataFrame(history).to_csv(run / "logs" / f"results_{DATASET}_{seed}_{epc}.csv", index=False)


def write_synthetic_run(root: Path, seed: int = 0, epc: int = 2, siblings: int = 3) -> Path:
    """A synthetic folder with a manifest (two classes, filter weights) and noise PNGs."""
    folder = root / f"{DATASET}_{epc}epc" / "diagen" / f"synthetics_seed_{seed}"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for real_idx, label, class_name in ((0, 0, "bench"), (2, 1, "bicycle")):
        for synthetic_idx in range(siblings):
            path = folder / f"label_{label}-{real_idx}-{synthetic_idx}.png"
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
            rows.append(dict(real_idx=real_idx, synthetic_idx=synthetic_idx, label=label, class_name=class_name,
                             token=f"<{class_name}>", prompt="a photo of a {name}", seed=seed, path=str(path),
                             confidence=0.2 * (synthetic_idx + 1), filter_weight=min(1.0, 0.4 * (synthetic_idx + 1))))
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    return folder


def row_of(markdown: str, label: str) -> list[str]:
    """The cells of the table row whose first cell is `label`."""
    for line in markdown.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells[0] == label:
            return cells[1:]
    raise AssertionError(f"no row {label!r} in:\n{markdown}")


def header_of(markdown: str) -> list[str]:
    line = next(line for line in markdown.splitlines() if line.startswith("| Method |"))
    return [cell.strip() for cell in line.strip().strip("|").split("|")][1:]


def test_summary_means_stds_and_best(tmp_path):
    write_results_tree(tmp_path)
    summary = summarize(collect_accuracies(tmp_path)).set_index(["split", "examples_per_class", "method"])
    for (method, epc), accuracies in TEST_ACCURACY.items():
        cell = summary.loc[("test", epc, method)]
        assert cell["mean"] == pytest.approx(100 * np.mean(accuracies))
        assert cell["std"] == pytest.approx(100 * np.std(accuracies, ddof=1))
        assert cell["seeds"] == len(accuracies)
    best = summary[summary["best"]].reset_index()
    assert set(zip(best["split"], best["examples_per_class"], best["method"])) >= {
        ("test", 2, "diagen"), ("test", 4, "baseline"), ("test", 4, "da-fusion")}
    assert summary.loc[("val", 2, "diagen"), "mean"] == pytest.approx(50.0)  # best epoch, not the last (48)
    assert summary.loc[("val", 2, "baseline"), "mean"] == pytest.approx(45.0)
    assert bool(summary.loc[("val", 2, "diagen"), "best"])


def test_report_cli_table_plots_and_samples(tmp_path, script_runner):
    write_results_tree(tmp_path)
    write_synthetic_run(tmp_path)
    result = script_runner("report.py", "--results-dir", tmp_path, check=True)
    markdown = (tmp_path / "report.md").read_text()
    assert markdown in result.stdout  # the table goes to stdout too

    header = header_of(markdown)
    test2, test4 = header.index("test, 2 epc"), header.index("test, 4 epc")
    baseline, da_fusion = row_of(markdown, "Baseline (real images only)"), row_of(markdown, "DA-Fusion")
    diagen = row_of(markdown, "DIAGen: (a) + (b) + (c)")
    assert baseline[test2] == "52.0 ± 2.0"
    assert da_fusion[test2] == "57.0 ± 2.6"
    assert diagen[test2] == "**62.0 ± 2.0**"
    assert baseline[test4] == "**70.0 ± 0.0**"
    assert da_fusion[test4] == "**70.0 ± 1.4** (n=2)"
    assert diagen[test4] == "66.0 ± 1.0"
    assert diagen[header.index("val (best epoch), 2 epc")] == "**50.0 ± 0.0**"

    table = pd.read_csv(tmp_path / "report.csv")
    assert {"dataset", "split", "examples_per_class", "method", "mean", "std", "seeds", "best"} <= set(table.columns)
    cell = table[(table["split"] == "test") & (table["examples_per_class"] == 2) & (table["method"] == "da-fusion")]
    assert cell["mean"].item() == pytest.approx(57.0, abs=1e-3)
    assert cell["std"].item() == pytest.approx(100 * np.std([0.55, 0.56, 0.60], ddof=1), abs=1e-3)

    plots = [Path(line.split(": ", 1)[1]) for line in result.stdout.splitlines() if line.startswith("plot: ")]
    names = {path.name for path in plots}
    assert {"accuracy_vs_epc_custom_coco_test.png", "accuracy_vs_epc_custom_coco_val.png",
            "ablation_custom_coco_test.png"} <= names
    for path in plots:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 400 and image.height > 300
            assert np.asarray(image.convert("L")).std() > 1  # something is drawn
        assert f"]({path.relative_to(tmp_path)})" in markdown  # linked from the report

    grids = [Path(line.split(": ", 1)[1]) for line in result.stdout.splitlines() if line.startswith("samples: ")]
    assert [grid.name for grid in grids] == ["custom_coco_2epc_diagen_seed0.png"]
    with Image.open(grids[0]) as image:
        assert image.width > image.height  # two rows of 1 real + 3 synthetic images
    assert "table: " + str(tmp_path / "report.md") in result.stdout


def test_report_without_results_is_a_one_line_error(tmp_path, script_runner):
    result = script_runner("report.py", "--results-dir", tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: no results CSVs under") and "Traceback" not in result.stderr


def test_duplicate_results_are_refused(tmp_path):
    write_results_tree(tmp_path / "a")
    write_results_tree(tmp_path / "b")
    with pytest.raises(UserError, match="two results for"):
        build_report(tmp_path, samples=False)

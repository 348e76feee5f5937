"""The paper's results table, plots and synthetic-image previews, built from the CSVs that the scripts write.

`report.py` is the command line; the experiment runner calls `build_report` when its grid is done.

Sources, found anywhere under the results folder (`RunLayout`'s names, read back with its patterns): each run's
results CSV (per-epoch history; "val" = the best validation "Accuracy", the mean per-class accuracy the
checkpoint was selected by), its test CSVs ("Mean Accuracy" on each split) and its synthetic manifest
(synthetic images, with the filter weights).

Accuracies are fractions in the CSVs and percentages in the report. The spread over seeds is the sample
standard deviation (ddof=1); a cell with one seed shows its mean alone.
"""

from __future__ import annotations

import io
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from semantic_aug.core.layout import MANIFEST_NAME, RESULTS_FILE, RUN_FOLDER, SYNTHETIC_FOLDER, TEST_FILE
from semantic_aug.core.utils import UserError, atomic_write_bytes, atomic_write_csv, atomic_write_text

logger = logging.getLogger(__name__)

# Method folder names used by the experiment configs, in the paper's row order, with their table labels.
METHOD_LABELS = {
    "baseline": "Baseline (real images only)",
    "real_guidance": "Real Guidance",
    "da_fusion": "DA-Fusion",
    "da_fusion_4x2000": "DA-Fusion, 4 vectors × 2000 steps",  # experiments/custom_coco_multivector.yaml
    "diagen_noise": "DA-Fusion + (a) embedding noise",
    "diagen_prompts": "DA-Fusion + (b) LLM prompts",
    "diagen_filter": "DA-Fusion + (c) weighting filter",
    "diagen_noise_prompts": "DA-Fusion + (a) + (b)",
    "diagen": "DIAGen: (a) + (b) + (c)",
    "diagen_4x2000": "DIAGen, 4 vectors × 2000 steps",  # experiments/custom_coco_multivector.yaml
}
# The ablation of DIAGen's three contributions starts from DA-Fusion (the paper's ablation table).
ABLATION_METHODS = ("da_fusion", "diagen_noise", "diagen_prompts", "diagen_filter", "diagen_noise_prompts", "diagen")
DATASET_LABELS = {"custom_coco": "Custom COCO", "coco": "COCO", "focus": "FOCUS"}
SPLIT_LABELS = {"test": "test", "test_uncommon_context": "uncommon context", "val": "val (best epoch)"}
SPLIT_ALIASES = {"test_uncommon": "test_uncommon_context"}  # the reference's name for the uncommon split


PERCENT = 100.0  # CSVs hold fractions; the report shows percentages
DECIMALS = 1  # digits after the point in the table
PLOT_DPI = 150
FIGURE_SIZE = (7.0, 4.5)  # inches, width × height of the accuracy and ablation plots
BAR_INCHES = 0.7  # the ablation plot widens beyond FIGURE_SIZE to keep each bar at least this wide
GRID_ROWS = 4  # real images per sample grid (spread over the classes)
GRID_COLUMNS = 10  # synthetic siblings shown per real image (the paper generates 10)
THUMBNAIL_PIXELS = 160  # longest side of each image in a sample grid
GRID_CELL_INCHES = 1.7  # side of one image cell in a sample grid
GRID_TITLE_INCHES = 0.8  # extra height for the grid's title (up to three lines)


@dataclass
class Report:
    """What `build_report` wrote, plus the Markdown table it printed."""

    summary: pd.DataFrame
    markdown: str
    table_md: Path
    table_csv: Path
    plots: list[Path] = field(default_factory=list)
    sample_grids: list[Path] = field(default_factory=list)

    def describe(self) -> str:
        """The Markdown, then one line per file written (`table: ...`, `plot: ...`, `samples: ...`)."""
        lines = [self.markdown, f"table: {self.table_md}", f"table (CSV): {self.table_csv}"]
        lines += [f"plot: {path}" for path in self.plots] + [f"samples: {path}" for path in self.sample_grids]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# collecting


def _method_of(csv_path: Path) -> str:
    """The method a CSV belongs to: the folder holding its `logs/` or `test/` folder (else the CSV's own folder)."""
    folder = csv_path.parent
    return folder.parent.name if folder.name in ("logs", "test") else folder.name


def collect_accuracies(results_dir: str | os.PathLike) -> pd.DataFrame:
    """Every per-seed accuracy under `results_dir`.

    Args:
        results_dir: the folder to search (recursively).

    Returns:
        DataFrame with columns dataset, method, split, examples_per_class, seed, accuracy (in %), source (the CSV).
        `split` is `val` for the best validation accuracy of a training history, else the test split's name.
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise UserError(f"results folder not found: {results_dir}")
    rows = []
    for path in sorted(results_dir.rglob("*.csv")):
        if path.name.startswith("."):  # a temporary file of an unfinished atomic write
            continue
        history = RESULTS_FILE.match(path.name)
        test = None if history else TEST_FILE.match(path.name)
        if history:
            accuracy = _best_validation_accuracy(path)
            split, match = "val", history
        elif test and path.parent.name == "test":
            accuracy = _mean_test_accuracy(path)
            split, match = SPLIT_ALIASES.get(test["split"], test["split"]), test
        else:
            continue
        if accuracy is None:
            continue
        rows.append(dict(dataset=match["dataset"], method=_method_of(path), split=split,
                         examples_per_class=int(match["epc"]), seed=int(match["seed"]), accuracy=PERCENT * accuracy,
                         source=str(path)))
    frame = pd.DataFrame(rows, columns=["dataset", "method", "split", "examples_per_class", "seed", "accuracy", "source"])
    key = ["dataset", "method", "split", "examples_per_class", "seed"]
    duplicated = frame[frame.duplicated(key, keep=False)]
    if len(duplicated):
        first = duplicated.iloc[0]
        twins = duplicated[(duplicated[key] == first[key]).all(axis=1)]["source"].tolist()
        raise UserError(f"two results for {first['method']} / {first['dataset']} / {first['split']} / "
                        f"{first['examples_per_class']} epc / seed {first['seed']}: {' and '.join(twins)}; "
                        f"move one out of the results folder")
    return frame


def _read_csv(path: Path, columns: set[str]) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise UserError(f"malformed results CSV {path}: {error}") from None
    missing = columns - set(frame.columns)
    if missing:
        raise UserError(f"results CSV {path} lacks column(s) {', '.join(sorted(missing))}")
    return frame


def _best_validation_accuracy(path: Path) -> float | None:
    frame = _read_csv(path, {"metric", "split", "value"})
    values = frame[(frame["metric"] == "Accuracy") & (frame["split"] == "Validation")]["value"]
    if values.empty:
        logger.warning("no validation accuracy in %s; left out", path)
        return None
    return float(values.max())


def _mean_test_accuracy(path: Path) -> float | None:
    frame = _read_csv(path, {"metric", "value"})
    values = frame[frame["metric"] == "Mean Accuracy"]["value"]
    if values.empty:
        logger.warning("no 'Mean Accuracy' row in %s; left out", path)
        return None
    return float(values.iloc[0])


# ----------------------------------------------------------------------------------------------------------
# summarising


def _known_method(method: str) -> str:
    """The `METHOD_LABELS` key of a method folder name; `da-fusion` and `da_fusion` are the same method."""
    return method.replace("-", "_")


def _method_sort_key(method: str) -> tuple[int, str]:
    """Paper row order for known methods, then the rest alphabetically."""
    order = list(METHOD_LABELS)
    known = _known_method(method)
    return (order.index(known), method) if known in order else (len(order), method)


def _split_sort_key(split: str) -> tuple[int, str]:
    order = list(SPLIT_LABELS)
    return (order.index(split), "") if split in order else (len(order), split)


def summarize(accuracies: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds, and which method is best in each column.

    Args:
        accuracies: the output of `collect_accuracies`.

    Returns:
        DataFrame with columns dataset, split, examples_per_class, method, mean, std (ddof=1; NaN for one seed),
        seeds (how many), best (True for the highest mean of its dataset/split/epc column; ties all True),
        sorted in the paper's order.
    """
    if accuracies.empty:
        return pd.DataFrame(columns=["dataset", "split", "examples_per_class", "method", "mean", "std", "seeds", "best"])
    column = ["dataset", "split", "examples_per_class"]
    summary = (accuracies.groupby(column + ["method"])["accuracy"]
               .agg(mean="mean", std=lambda values: values.std(ddof=1), seeds="count").reset_index())
    summary["best"] = summary["mean"] == summary.groupby(column)["mean"].transform("max")
    order = summary.apply(lambda row: (row["dataset"], _split_sort_key(row["split"]), row["examples_per_class"],
                                       _method_sort_key(row["method"])), axis=1)
    return summary.loc[order.sort_values().index].reset_index(drop=True)


def method_label(method: str) -> str:
    """The table label of a method folder name (`diagen` -> `DIAGen: (a) + (b) + (c)`); unknown names as they are."""
    return METHOD_LABELS.get(_known_method(method), method)


def dataset_label(dataset: str) -> str:
    """The paper's name of a dataset (`custom_coco` -> `Custom COCO`); unknown names as they are."""
    return DATASET_LABELS.get(dataset, dataset)


def _format_cell(mean: float, std: float, seeds: int, most_seeds: int, best: bool) -> str:
    """`71.3 ± 1.2`, bold when best; `(n=2)` when fewer seeds than the table's fullest cell."""
    text = f"{mean:.{DECIMALS}f}" if math.isnan(std) else f"{mean:.{DECIMALS}f} ± {std:.{DECIMALS}f}"
    if best:
        text = f"**{text}**"
    if seeds < most_seeds:
        text += f" (n={seeds})"
    return text


def format_markdown(summary: pd.DataFrame, plots: list[Path] = (), sample_grids: list[Path] = (),
                    relative_to: Path | None = None) -> str:
    """The paper's layout as Markdown: one table per dataset, rows = methods, columns = split × examples per class.

    Args:
        summary: the output of `summarize`.
        plots, sample_grids: images to link below the tables.
        relative_to: folder the Markdown file lives in (links are made relative to it).

    Returns:
        The Markdown text.
    """
    lines = ["# Results", "",
             "Accuracy in % on each split (mean ± standard deviation over seeds; `val` = best validation accuracy "
             "during training, the epoch the checkpoint keeps). Best per column in **bold**; (n=k): only k seeds.", ""]
    for dataset, table in summary.groupby("dataset", sort=False):
        columns = list(dict.fromkeys(zip(table["split"], table["examples_per_class"])))
        methods = sorted(table["method"].unique(), key=_method_sort_key)
        most_seeds = int(table["seeds"].max())
        cells = {(row.method, row.split, row.examples_per_class): _format_cell(row.mean, row.std, row.seeds, most_seeds,
                                                                               row.best)
                 for row in table.itertuples()}
        lines += [f"## {dataset_label(dataset)} (`{dataset}`)", "",
                  "| Method | " + " | ".join(f"{SPLIT_LABELS.get(s, s)}, {e} epc" for s, e in columns) + " |",
                  "|---|" + "---:|" * len(columns)]
        for method in methods:
            lines.append(f"| {method_label(method)} | " + " | ".join(cells.get((method, s, e), "–") for s, e in columns)
                         + " |")
        lines.append("")
    for title, paths in (("Plots", plots), ("Synthetic samples", sample_grids)):
        if paths:
            lines += [f"## {title}", ""]
            for path in paths:
                link = os.path.relpath(path, relative_to) if relative_to else str(path)
                lines += [f"![{Path(path).stem}]({link})", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# plots


def _save_figure(figure, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=PLOT_DPI, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; works without a display
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_vs_examples(summary: pd.DataFrame, dataset: str, split: str, path: Path) -> Path:
    """Line plot: accuracy (%) against examples per class, one line per method with ±std error bars.

    Args:
        summary: the output of `summarize`.
        dataset, split: which column group to draw.
        path: the PNG to write.

    Returns:
        `path`.
    """
    plt = _pyplot()
    table = summary[(summary["dataset"] == dataset) & (summary["split"] == split)]
    figure, axes = plt.subplots(figsize=FIGURE_SIZE)
    for method in sorted(table["method"].unique(), key=_method_sort_key):
        rows = table[table["method"] == method].sort_values("examples_per_class")
        axes.errorbar(rows["examples_per_class"], rows["mean"], yerr=rows["std"].fillna(0.0), marker="o", capsize=3,
                      label=method_label(method))
    examples = sorted(table["examples_per_class"].unique())
    axes.set_xscale("log", base=2)  # the paper's grid doubles: 2, 4, 8
    axes.set_xticks(examples, [str(e) for e in examples])
    axes.minorticks_off()
    axes.set_xlabel("real examples per class")
    axes.set_ylabel("accuracy (%)")
    axes.set_title(f"{dataset_label(dataset)}: {SPLIT_LABELS.get(split, split)} accuracy vs. examples per class\n"
                   f"(mean ± std over seeds)")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small", loc="best")
    _save_figure(figure, path)
    plt.close(figure)
    return path


def plot_ablation(summary: pd.DataFrame, dataset: str, split: str, path: Path) -> Path | None:
    """Grouped bars: for each examples-per-class setting, DA-Fusion and each DIAGen ablation (±std).

    Args:
        summary: the output of `summarize`.
        dataset, split: which column group to draw.
        path: the PNG to write.

    Returns:
        `path`, or None when fewer than two ablation methods have results (nothing to compare).
    """
    table = summary[(summary["dataset"] == dataset) & (summary["split"] == split)
                    & summary["method"].map(_known_method).isin(ABLATION_METHODS)]
    methods = sorted(table["method"].unique(), key=_method_sort_key)
    if len(methods) < 2:
        return None
    plt = _pyplot()
    examples = sorted(table["examples_per_class"].unique())
    width = 0.8 / len(methods)  # the bars of one group fill 80% of the space between groups
    figure, axes = plt.subplots(figsize=(max(FIGURE_SIZE[0], BAR_INCHES * len(examples) * len(methods)), FIGURE_SIZE[1]))
    for position, method in enumerate(methods):
        rows = table[table["method"] == method].set_index("examples_per_class").reindex(examples)
        offsets = np.arange(len(examples)) + (position - (len(methods) - 1) / 2) * width
        bars = axes.bar(offsets, rows["mean"], width, yerr=rows["std"].fillna(0.0), capsize=2,
                        label=method_label(method))
        axes.bar_label(bars, labels=[f"{v:.{DECIMALS}f}" if not math.isnan(v) else "" for v in rows["mean"]],
                       fontsize="x-small", padding=2)
    axes.set_xticks(np.arange(len(examples)), [f"{e} epc" for e in examples])
    axes.set_xlabel("real examples per class")
    axes.set_ylabel("accuracy (%)")
    axes.set_title(f"{dataset_label(dataset)}: ablation of DIAGen's components\n"
                   f"{SPLIT_LABELS.get(split, split)} accuracy, mean ± std over seeds")
    axes.grid(True, axis="y", alpha=0.3)
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    _save_figure(figure, path)
    plt.close(figure)
    return path


# ----------------------------------------------------------------------------------------------------------
# sample grids


@dataclass
class SyntheticRun:
    """One run's synthetic images: where the manifest is and which (dataset, method, seed, epc) made it."""

    manifest: Path
    dataset: str
    method: str
    seed: int
    examples_per_class: int

    @property
    def name(self) -> str:
        return f"{self.dataset}_{self.examples_per_class}epc_{self.method}_seed{self.seed}"


def find_synthetic_runs(results_dir: str | os.PathLike) -> list[SyntheticRun]:
    """Every run with synthetic images under `results_dir`.

    Args:
        results_dir: searched recursively for `{dataset}_{epc}epc/{method}/synthetics_seed_{seed}/manifest.csv`.

    Returns:
        One `SyntheticRun` per manifest, sorted by path.
    """
    runs = []
    for manifest in sorted(Path(results_dir).rglob(MANIFEST_NAME)):
        seed_match = SYNTHETIC_FOLDER.match(manifest.parent.name)
        run_match = RUN_FOLDER.match(manifest.parent.parent.parent.name)
        if seed_match and run_match:
            runs.append(SyntheticRun(manifest, run_match["dataset"], manifest.parent.parent.name,
                                     int(seed_match["seed"]), int(run_match["epc"])))
    return runs


def _synthetic_image_path(manifest: Path, recorded: str) -> Path:
    """A manifest path as recorded (absolute or relative to where the run started), else beside the manifest."""
    path = Path(recorded)
    return path if path.is_file() else manifest.parent / path.name


def _thumbnail(path: Path):
    from semantic_aug.core.utils import load_image

    try:
        image = load_image(path)
    except UserError as error:
        logger.warning("%s", error)
        return _placeholder()
    image.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
    return image


def _placeholder():
    from PIL import Image

    return Image.new("RGB", (THUMBNAIL_PIXELS, THUMBNAIL_PIXELS), "lightgray")


def _pick_rows(manifest: pd.DataFrame, rows: int) -> list[int]:
    """Real image indices for the grid: the first real image of `rows` classes spread evenly over the labels present."""
    first_of_class = manifest.sort_values("real_idx").groupby("label")["real_idx"].first()
    picks = np.unique(np.linspace(0, len(first_of_class) - 1, num=min(rows, len(first_of_class))).round().astype(int))
    return [int(first_of_class.iloc[i]) for i in picks]


def plot_sample_grid(run: SyntheticRun, path: Path, real_images: dict[int, object] | None = None,
                     rows: int = GRID_ROWS, columns: int = GRID_COLUMNS) -> Path:
    """A grid of real training images, each followed by its synthetic siblings with their filter weights written on them.

    Args:
        run: the synthetic run (its manifest has real_idx, synthetic_idx, label, class_name, path, and after the
            filter confidence and filter_weight).
        path: the PNG to write.
        real_images: real index -> PIL image of the training split; a missing entry shows a gray placeholder.
        rows: real images shown (spread over the classes).
        columns: synthetic siblings shown per real image.

    Returns:
        `path`.
    """
    plt = _pyplot()
    manifest = _read_csv(run.manifest, {"real_idx", "synthetic_idx", "label", "class_name", "path"})
    if manifest.empty:
        raise UserError(f"empty synthetic manifest {run.manifest}")
    picked = _pick_rows(manifest, rows)
    width = 1 + min(columns, int(manifest.groupby("real_idx").size().max()))
    figure_size = (GRID_CELL_INCHES * width, GRID_CELL_INCHES * len(picked) + GRID_TITLE_INCHES)
    figure, axes = plt.subplots(len(picked), width, figsize=figure_size, squeeze=False)
    has_weights = "filter_weight" in manifest.columns and manifest["filter_weight"].notna().any()
    for row, real_idx in enumerate(picked):
        siblings = manifest[manifest["real_idx"] == real_idx].sort_values("synthetic_idx").head(columns)
        class_name = str(siblings["class_name"].iloc[0])
        real = (real_images or {}).get(real_idx)
        _show(axes[row][0], real if real is not None else _placeholder(),
              "real" if real is not None else "real image\nunavailable")
        axes[row][0].set_ylabel(class_name.replace("_", " "), fontsize="small")
        for column in range(1, width):
            if column - 1 >= len(siblings):
                axes[row][column].axis("off")
                continue
            sibling = siblings.iloc[column - 1]
            caption = f"w={sibling['filter_weight']:.2f}" if has_weights and not pd.isna(sibling["filter_weight"]) \
                else "no filter"
            if has_weights and "confidence" in siblings.columns and not pd.isna(sibling["confidence"]):
                caption += f"\np={sibling['confidence']:.2f}"
            _show(axes[row][column], _thumbnail(_synthetic_image_path(run.manifest, str(sibling["path"]))), caption)
    figure.suptitle(f"{dataset_label(run.dataset)}: {method_label(run.method)}, seed {run.seed}, "
                    f"{run.examples_per_class} examples per class\nreal training image, then its synthetic images"
                    + ("\n(w = filter weight, p = filter confidence in the class)" if has_weights else ""),
                    fontsize="medium")
    figure.tight_layout()
    _save_figure(figure, path)
    plt.close(figure)
    return path


def _show(axes, image, caption: str) -> None:
    axes.imshow(image)
    axes.set_xticks([])
    axes.set_yticks([])
    axes.text(0.03, 0.03, caption, transform=axes.transAxes, fontsize="x-small", va="bottom", ha="left",
              bbox=dict(facecolor="white", alpha=0.8, edgecolor="none", pad=1.5))


def load_real_images(run: SyntheticRun, real_indices: list[int], data_dir: str | os.PathLike | None) -> dict[int, object]:
    """The run's real training images by index, rebuilt from the dataset (same seed and examples per class).

    Args:
        run: the synthetic run (dataset, seed, examples per class).
        real_indices: indices into its training split.
        data_dir: the dataset folder (None: the dataset's default).

    Returns:
        index -> thumbnail PIL image; empty (with a warning) when the dataset cannot be opened, e.g. COCO without
        `data_dir`.
    """
    from semantic_aug.datasets import create_dataset

    try:
        dataset = create_dataset(run.dataset, split="train", examples_per_class=run.examples_per_class, seed=run.seed,
                                 data_dir=data_dir)
    except UserError as error:
        logger.warning("sample grid %s without real images: %s", run.name, error)
        return {}
    images = {}
    for idx in real_indices:
        if idx < len(dataset):
            image = dataset.get_image_by_idx(idx)
            image.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
            images[idx] = image
    return images


# ----------------------------------------------------------------------------------------------------------
# everything


def build_report(results_dir: str | os.PathLike, output_dir: str | os.PathLike | None = None,
                 data_dir: str | os.PathLike | None = None, samples: bool = True, grid_rows: int = GRID_ROWS,
                 grid_columns: int = GRID_COLUMNS) -> Report:
    """Collect every results CSV under `results_dir` and write the table, plots and sample grids.

    Args:
        results_dir: folder searched for results CSVs and synthetic manifests.
        output_dir: where `report.md`, `report.csv`, `plots/` and `samples/` go (default: `results_dir`).
        data_dir: dataset folder, for the real images in the sample grids (None: each dataset's default).
        samples: draw a sample grid per run with a synthetic manifest (an existing grid newer than its
            manifest is kept).
        grid_rows, grid_columns: real images per grid, synthetic siblings per real image.

    Returns:
        The `Report` (paths and the Markdown table).
    """
    results_dir = Path(results_dir)
    output_dir = Path(output_dir) if output_dir is not None else results_dir
    accuracies = collect_accuracies(results_dir)
    if accuracies.empty:
        raise UserError(f"no results CSVs under {results_dir}; run train_classifier.py or "
                        f"`python -m semantic_aug.runner` first")
    summary = summarize(accuracies)

    plots = []
    for (dataset, split), _ in summary.groupby(["dataset", "split"], sort=False):
        plots.append(plot_accuracy_vs_examples(summary, dataset, split,
                                               output_dir / "plots" / f"accuracy_vs_epc_{dataset}_{split}.png"))
        ablation = plot_ablation(summary, dataset, split, output_dir / "plots" / f"ablation_{dataset}_{split}.png")
        if ablation is not None:
            plots.append(ablation)

    sample_grids = []
    for run in find_synthetic_runs(results_dir) if samples else []:
        grid = output_dir / "samples" / f"{run.name}.png"
        if not (grid.is_file() and grid.stat().st_mtime >= run.manifest.stat().st_mtime):
            manifest = _read_csv(run.manifest, {"real_idx", "synthetic_idx", "label", "class_name", "path"})
            real_images = load_real_images(run, _pick_rows(manifest, grid_rows), data_dir)
            plot_sample_grid(run, grid, real_images, grid_rows, grid_columns)
        sample_grids.append(grid)

    table_md, table_csv = output_dir / "report.md", output_dir / "report.csv"
    markdown = format_markdown(summary, plots, sample_grids, relative_to=output_dir)
    atomic_write_text(table_md, markdown)
    atomic_write_csv(summary, table_csv, float_format="%.4f")
    return Report(summary, markdown, table_md, table_csv, plots, sample_grids)

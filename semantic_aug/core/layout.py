"""Every file of one (dataset, seed, examples per class) run, named in one place: `RunLayout`.

The names are the reference's hand-offs between the scripts (`{ds}` is the dataset key, see
`semantic_aug.datasets.dataset_key`; `{epc}` the examples per class):

    {fine_tuned_root}/{ds}-{seed}-{epc}/{class}/learned_embeds.bin      fine_tune.py            `fine_tuned_dir`
    {tokens_root}/{ds}-tokens/{ds}-{seed}-{epc}.pt                      aggregate_embeddings.py `tokens()`
    {tokens_root}/{ds}-tokens/noise/{ds}-{seed}-{epc}.pt                  with embedding noise  `tokens(noise=True)`
    {models_root}/filter_{ds}_{seed}_{epc}.pth                          train_filter.py         `filter`
    {logdir}/{train,calibration}_filter_{ds}_{seed}_{epc}.csv             its logs              `filter_logs()`
    {results_root}/{ds}_{epc}epc/{method}/synthetics_seed_{seed}/       train_classifier.py     `synthetic_dir`
        label_{label}-{idx}-{num}.png, manifest.csv                                             `manifest`
    {results_root}/{ds}_{epc}epc/{method}/logs/results_{ds}_{seed}_{epc}.csv                    `results_csv`
    {results_root}/{ds}_{epc}epc/{method}/models/classifier_{ds}_{seed}_{epc}[...].pth          `classifier()`
    {results_root}/{ds}_{epc}epc/{method}/test/{split}_results_{ds}_{seed}_{epc}.csv            `test_csv()`
    {logdir}/evaluation_on_{ds}_{split}_{seed}_{epc}.csv                eval_on_testset.py      `evaluation_csv()`

train_classifier.py's `--logdir`, `--synthetic-dir` and `--embed-path` may be templates with `{dataset}`,
`{examples_per_class}`, `{method}` and `{seed}`; the layout fills them (`fill`). `report.py` reads the same names
back with the patterns at the end of this module. The experiment runner puts `fine-tuned/` and `tokens/` (the
roots above) under its `pipeline_dir` (default `.`, the scripts' defaults), and the tokens of a method with
Textual Inversion settings of its own under `{pipeline_dir}/variants/{settings}/`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from semantic_aug.core.utils import UserError

FINE_TUNED_FOLDER = "fine-tuned"  # fine_tune.py writes it under --output_dir; aggregate_embeddings.py's --input-path
TOKENS_ROOT = "tokens"
VARIANTS_FOLDER = "variants"  # the runner's {pipeline_dir}/variants/{settings}/: tokens of other fine_tune.py settings
MODELS_ROOT = "models"
RESULTS_ROOT = "RESULTS"
MANIFEST_NAME = "manifest.csv"
METHOD_FOLDER = "{dataset}_{examples_per_class}epc/{method}"
DEFAULT_LOGDIR = f"{RESULTS_ROOT}/{METHOD_FOLDER}/logs"
DEFAULT_SYNTHETIC_DIR = f"{RESULTS_ROOT}/{METHOD_FOLDER}/synthetics_seed_{{seed}}"
TOKENS_FILE = "{dataset}-tokens/{dataset}-{seed}-{examples_per_class}.pt"
NOISY_TOKENS_FILE = "{dataset}-tokens/noise/{dataset}-{seed}-{examples_per_class}.pt"
DEFAULT_EMBED_PATH = f"{TOKENS_ROOT}/{TOKENS_FILE}"
NOISY_EMBED_PATH = f"{TOKENS_ROOT}/{NOISY_TOKENS_FILE}"


def fill(template: str, flag: str, **fields) -> str:
    """A path template with its {placeholders} filled in; a `UserError` names the flag and an unknown placeholder."""
    try:
        return template.format(**fields)
    except (KeyError, IndexError, ValueError) as error:
        raise UserError(f"{flag} {template!r}: cannot fill in its placeholders ({error}); use only "
                        f"{', '.join('{' + k + '}' for k in fields)}") from None


def format_list(values) -> str:
    """The reference's spelling of a list flag inside a file name: [0.7] -> `[0.7]`."""
    return str(list(values)) if isinstance(values, (list, tuple)) else str(values)


@dataclass(frozen=True)
class RunLayout:
    """Where every artifact of one (dataset, seed, examples per class) run lives.

    Args:
        dataset: the dataset key (`custom_coco`, or with the data fingerprint `folder-1a2b3c4d`, `dataset_key`).
        seed: the run's seed.
        examples_per_class: the run's real training images per class.
        method: the classifier's method folder (`--method`).
        fine_tuned_root: the `fine-tuned/` folder (fine_tune.py's `{--output_dir}/fine-tuned`).
        tokens_root: the token folder (aggregate_embeddings.py's `--output-dir`).
        models_root: the filters' folder (`--models-root`).
        results_root: the classifiers' results folder (the runner's `results_dir`).
        logdir_template, synthetic_dir_template, embed_path_template: train_classifier.py's `--logdir`,
            `--synthetic-dir` and `--embed-path` (None: under `results_root` and `tokens_root`).
    """

    dataset: str
    seed: int
    examples_per_class: int
    method: str = "baseline"
    fine_tuned_root: Path = Path(FINE_TUNED_FOLDER)
    tokens_root: Path = Path(TOKENS_ROOT)
    models_root: Path = Path(MODELS_ROOT)
    results_root: Path = Path(RESULTS_ROOT)
    logdir_template: str | None = None
    synthetic_dir_template: str | None = None
    embed_path_template: str | None = None

    def __post_init__(self):
        for name in ("fine_tuned_root", "tokens_root", "models_root", "results_root"):
            object.__setattr__(self, name, Path(getattr(self, name)))

    # -- names -------------------------------------------------------------------------------------------------

    @property
    def fields(self) -> dict:
        """The template placeholders of this run."""
        return dict(dataset=self.dataset, examples_per_class=self.examples_per_class, method=self.method,
                    seed=self.seed)

    @property
    def run_id(self) -> str:
        """`{ds}_{seed}_{epc}`, the tail of every model and CSV name."""
        return f"{self.dataset}_{self.seed}_{self.examples_per_class}"

    # -- textual inversion (fine_tune.py, aggregate_embeddings.py) ---------------------------------------------

    @property
    def fine_tuned_dir(self) -> Path:
        """`{fine_tuned_root}/{ds}-{seed}-{epc}`: one folder per class, each with its `learned_embeds.bin`."""
        return self.fine_tuned_root / f"{self.dataset}-{self.seed}-{self.examples_per_class}"

    def tokens(self, noise: bool = False) -> Path:
        """The merged token file (`noise`: with DIAGen's noisy copies) under `tokens_root`."""
        return self.tokens_root / (NOISY_TOKENS_FILE if noise else TOKENS_FILE).format(**self.fields)

    def embed_path(self, noise: bool = False) -> Path:
        """The token file a classifier run reads: `--embed-path` filled in, else `tokens(noise)`."""
        if self.embed_path_template is None:
            return self.tokens(noise)
        return Path(fill(self.embed_path_template, "--embed-path", **self.fields))

    # -- the filter (train_filter.py) --------------------------------------------------------------------------

    @property
    def filter(self) -> Path:
        """`{models_root}/filter_{ds}_{seed}_{epc}.pth`."""
        return self.models_root / f"filter_{self.run_id}.pth"

    def filter_logs(self, logdir: str | os.PathLike) -> tuple[Path, Path]:
        """(training curves, calibration NLL/ECE) CSVs of the filter in `logdir`."""
        return Path(logdir) / f"train_filter_{self.run_id}.csv", Path(logdir) / f"calibration_filter_{self.run_id}.csv"

    # -- the classifier (train_classifier.py, eval_on_testset.py) ---------------------------------------------

    @property
    def method_dir(self) -> Path:
        """`{results_root}/{ds}_{epc}epc/{method}`."""
        return self.results_root / METHOD_FOLDER.format(**self.fields)

    @property
    def logdir(self) -> Path:
        """The folder of the results CSV: `--logdir` filled in, else `{method_dir}/logs`."""
        if self.logdir_template is None:
            return self.method_dir / "logs"
        return Path(fill(self.logdir_template, "--logdir", **self.fields))

    @property
    def synthetic_dir(self) -> Path:
        """The synthetic images' cache: `--synthetic-dir` filled in, else `{method_dir}/synthetics_seed_{seed}`."""
        if self.synthetic_dir_template is None:
            return self.method_dir / f"synthetics_seed_{self.seed}"
        return Path(fill(self.synthetic_dir_template, "--synthetic-dir", **self.fields))

    @property
    def manifest(self) -> Path:
        """The synthetic set's `manifest.csv`."""
        return self.synthetic_dir / MANIFEST_NAME

    @property
    def results_csv(self) -> Path:
        """`{logdir}/results_{ds}_{seed}_{epc}.csv`: the training history."""
        return self.logdir / f"results_{self.run_id}.csv"

    def test_csv(self, split: str) -> Path:
        """`{dirname(logdir)}/test/{split}_results_{ds}_{seed}_{epc}.csv`: the best model on `split`."""
        return self.logdir.parent / "test" / f"{split}_results_{self.run_id}.csv"

    def classifier(self, *, strength=None, guidance_scale=None, use_filter: bool = False, use_llm: bool = False,
                   use_noise: bool = False, uncommon: bool = False) -> Path:
        """`{dirname(logdir)}/models/classifier_{ds}_{seed}_{epc}[_{strength}_{guidance}][_filter][_llm][_noise]
        [_uncommon].pth`, the reference's name.

        Args:
            strength, guidance_scale: given (lists or numbers) when synthetic images were used.
            use_filter, use_llm, use_noise, uncommon: DIAGen's switches of the run.
        """
        name = f"classifier_{self.run_id}"
        if strength is not None and guidance_scale is not None:
            name += f"_{format_list(strength)}_{format_list(guidance_scale)}"
        for flag, suffix in ((use_filter, "_filter"), (use_llm, "_llm"), (use_noise, "_noise"),
                             (uncommon, "_uncommon")):
            if flag:
                name += suffix
        return self.logdir.parent / "models" / (name + ".pth")

    def evaluation_csv(self, logdir: str | os.PathLike, split: str) -> Path:
        """`{logdir}/evaluation_on_{ds}_{split}_{seed}_{epc}.csv` (eval_on_testset.py)."""
        return Path(logdir) / f"evaluation_on_{self.dataset}_{split}_{self.seed}_{self.examples_per_class}.csv"


# the names read back (report.py): the inverse of `results_csv`, `test_csv`, `method_dir` and `synthetic_dir`
RESULTS_FILE = re.compile(r"^results_(?P<dataset>.+)_(?P<seed>\d+)_(?P<epc>\d+)\.csv$")
TEST_FILE = re.compile(r"^(?P<split>.+?)_results_(?P<dataset>.+)_(?P<seed>\d+)_(?P<epc>\d+)\.csv$")
RUN_FOLDER = re.compile(r"^(?P<dataset>.+)_(?P<epc>\d+)epc$")
SYNTHETIC_FOLDER = re.compile(r"^synthetics_seed_(?P<seed>\d+)$")

"""The paper's experiment grid: methods × seeds × examples per class, run through the repository's scripts.

    python -m semantic_aug.runner --config experiments/custom_coco.yaml --dry-run   # print the commands
    python -m semantic_aug.runner --config experiments/custom_coco.yaml             # run them

A YAML config (see experiments/*.yaml) names the dataset, the seeds and examples per class, the flags of each
script, and the methods: each method is a set of `train_classifier.py` flags on top of the common ones.
The runner plans one job per script call:

1. `generate_prompts.py` once per dataset, if a method uses LLM prompts and the prompt CSV is missing;
2. per (seed, examples per class), if a method needs them: `fine_tune.py`, `aggregate_embeddings.py`
   (plain and, with embedding noise, noisy tokens) and `train_filter.py`; the tokens go to `{pipeline_dir}/fine-tuned`
   and `{pipeline_dir}/tokens`, and a method with Textual Inversion settings of its own (a `fine_tune:` mapping)
   gets its own token variant, learned and merged under `{pipeline_dir}/variants/<settings>/`;
3. `train_classifier.py` per (method, seed, examples per class), logging to
   `{results_dir}/{dataset}_{epc}epc/{method}/logs`, the layout `report.py` reads.

A job whose outputs exist is skipped, so a rerun resumes the grid. `plan_jobs` is the whole plan; an executor
(`semantic_aug.runner.executors`) runs it: `--executor local` runs `--jobs-per-gpu` jobs at a time on each GPU
(`CUDA_VISIBLE_DEVICES` names the GPU; the scripts then use "their" GPU 0), or one at a time on a CPU-only
machine; `--executor slurm` submits the jobs to a Slurm cluster through submitit, prerequisites as Slurm
dependencies. Each job writes its own log file (appended to on reruns). When the grid is done the report
(`semantic_aug.runner.reporting`) is built from the results folder.

Flags in the config: a key is the script's flag without `--`, spelled as the script spells it
(`pretrained_model_name_or_path`, `use-embedding-noise`, `synthetic_filter`); `true` passes the bare flag,
`false` and `null` leave it out, a list passes several values. The reference's value-taking booleans are
written as values (`use-embedding-noise: 1`). A method's `fine_tune:` mapping holds `fine_tune.py` flags that
override the common `fine_tune:` ones for its tokens (`num_vectors: 4`, `max_train_steps: 2000`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import json
import logging
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from semantic_aug.runner.executors import (REPO_ROOT, Scheduler, SlurmExecutor, SlurmSettings, describe_submissions,
                                    visible_gpus, worker_slots)
from semantic_aug.core.utils import HelpFormatter, UserError, str2bool

logger = logging.getLogger(__name__)

CONFIG_KEYS = {
    "dataset": None, "data_dir": None, "results_dir": "RESULTS", "pipeline_dir": ".",
    "model_path": "CompVis/stable-diffusion-v1-4",
    "seeds": [0, 1, 2], "examples_per_class": [2, 4, 8], "eval_splits": ["test"], "models_root": "models",
    "fine_tune": {}, "aggregate_embeddings": {}, "prompts": {}, "filter": {}, "train_classifier": {}, "methods": None,
    "report": True, "executor": "local", "jobs_per_gpu": 1, "max_retries": 1, "slurm": {},
}
EXECUTORS = ("local", "slurm")
# The `slurm:` keys of a config (SlurmSettings' fields; `time` in minutes).
SLURM_KEYS = {"partition": "partition", "account": "account", "qos": "qos", "gpus_per_job": "gpus_per_job",
              "cpus_per_job": "cpus_per_job", "mem": "mem", "time": "time_min", "array_parallelism": "array_parallelism",
              "sbatch": "sbatch", "poll_seconds": "poll_seconds", "folder": "folder"}
# Flags the runner sets itself per job; a config that sets them would contradict the grid.
RUNNER_FLAGS = {
    "fine_tune": {"pretrained_model_name_or_path", "dataset", "seeds", "examples-per-class", "data-dir", "output_dir"},
    "aggregate_embeddings": {"dataset", "seeds", "examples-per-class", "augment-embeddings", "input-path", "data-dir",
                             "output-dir", "embed-path"},
    "generate": {"dataset", "outdir", "out-filename"},
    "filter": {"dataset", "seeds", "seed", "examples-per-class", "data-dir", "models-root"},
    "train_classifier": {"dataset", "seeds", "examples-per-class", "method", "logdir", "synthetic-dir",
                         "eval_on_test_set", "data-dir", "model-path", "prompt-path", "models-root"},
}
DEFAULT_PIPELINE_DIR = Path(".")  # fine_tune.py's default --output_dir, and the folder of aggregate's --output-dir
METHOD_FINE_TUNE = "fine_tune"  # a method's key for its own Textual Inversion settings (not a train_classifier.py flag)
VARIANT_NAME = re.compile(r"^[A-Za-z0-9._,+-]+$")  # a token variant's folder name as it is, else with a digest
VARIANT_NAME_LENGTH = 100  # longer names get shortened with a digest
METHOD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # becomes a folder name
TEST_SPLITS = ("test", "test_uncommon_context")  # what train_classifier.py --eval_on_test_set evaluates
DEFAULT_AUG = "textual-inversion"  # train_classifier.py's default --aug
DEFAULT_NUM_SYNTHETIC = 10  # train_classifier.py's default --num-synthetic


# ----------------------------------------------------------------------------------------------------------
# config


def load_config(path: str | os.PathLike) -> dict:
    """Read and check an experiment config; missing keys get their defaults (`CONFIG_KEYS`).

    Args:
        path: the YAML file.

    Returns:
        The config as a dict.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UserError(f"config {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise UserError(f"config {path} must be a mapping of keys to values")
    unknown = sorted(set(raw) - set(CONFIG_KEYS))
    if unknown:
        raise UserError(f"unknown key(s) {', '.join(unknown)} in {path}; known: {', '.join(CONFIG_KEYS)}")
    config = {key: raw.get(key, default) for key, default in CONFIG_KEYS.items()}
    for key in ("fine_tune", "aggregate_embeddings", "prompts", "filter", "train_classifier"):
        config[key] = config[key] or {}
        if not isinstance(config[key], dict):
            raise UserError(f"{key} in {path} must be a mapping of flags to values")
    if not config["dataset"]:
        raise UserError(f"config {path} needs `dataset:` (e.g. custom_coco)")
    if not isinstance(config["methods"], dict) or not config["methods"]:
        raise UserError(f"config {path} needs `methods:`, a mapping of method names to train_classifier.py flags")
    for method, flags in config["methods"].items():
        if not METHOD_NAME.match(str(method)):
            raise UserError(f"method name {method!r} in {path} must be a plain folder name (letters, digits, _ . -)")
        if flags is not None and not isinstance(flags, dict):
            raise UserError(f"method {method} in {path} must map flags to values (or be empty)")
        config["methods"][method] = flags or {}
        if not isinstance(config["methods"][method].get(METHOD_FINE_TUNE) or {}, dict):
            raise UserError(f"fine_tune of method {method} in {path} must map fine_tune.py flags to values "
                            f"(e.g. num_vectors: 4)")
    config["pipeline_dir"] = str(config["pipeline_dir"] or DEFAULT_PIPELINE_DIR)  # an empty key: the scripts' folders
    config["slurm"] = config["slurm"] or {}
    if not isinstance(config["slurm"], dict) or not isinstance(config["slurm"].get("sbatch") or {}, dict):
        raise UserError(f"slurm in {path} must be a mapping of settings to values (slurm.sbatch: options to values)")
    unknown = sorted(set(config["slurm"]) - set(SLURM_KEYS))
    if unknown:
        raise UserError(f"unknown slurm setting(s) {', '.join(unknown)} in {path}; known: {', '.join(SLURM_KEYS)}")
    for key in ("seeds", "examples_per_class", "eval_splits"):
        config[key] = [config[key]] if isinstance(config[key], (int, str)) else list(config[key] or [])
    _check_runner_flags(config, path)
    _check_method_fine_tune(config, path)
    return config


def _check_runner_flags(config: dict, path: Path) -> None:
    sections = [("fine_tune", config["fine_tune"]), ("aggregate_embeddings", config["aggregate_embeddings"]),
                ("generate", config["prompts"].get("generate") or {}), ("filter", config["filter"]),
                ("train_classifier", config["train_classifier"])]
    for flags in config["methods"].values():
        classifier_flags, fine_tune = split_method(flags)
        sections += [("train_classifier", classifier_flags), ("fine_tune", fine_tune)]
    for section, flags in sections:
        clash = sorted(set(flags) & RUNNER_FLAGS[section])
        if clash:
            raise UserError(f"{', '.join(clash)} in the {section} flags of {path} is set by the runner per job; "
                            f"use the top-level keys (dataset, data_dir, seeds, examples_per_class, model_path, "
                            f"eval_splits, models_root, pipeline_dir, prompts.path) instead")


def split_method(flags: dict) -> tuple[dict, dict]:
    """A method's `train_classifier.py` flags and its own `fine_tune.py` flags (its `fine_tune:` mapping, `{}` if none).

    Args:
        flags: the method's mapping in the config.

    Returns:
        (train_classifier.py flags, fine_tune.py overrides).
    """
    classifier_flags = {name: value for name, value in flags.items() if name != METHOD_FINE_TUNE}
    return classifier_flags, dict(flags.get(METHOD_FINE_TUNE) or {})


def script_flags(script: str) -> set[str]:
    """The flags (without `--`) that a top-level script defines itself, read from its `add_argument` calls, with the
    `no-` form of its `BooleanOptionalAction`s (the dataset flags it adds through `add_dataset_arguments` are the
    grid's, not a method's)."""
    flags = set()
    for call in (REPO_ROOT / script).read_text().split("add_argument(")[1:]:
        name = re.match(r"""\s*["']--([\w-]+)["']""", call)
        if name:
            flags.add(name.group(1))
            if "BooleanOptionalAction" in call:  # the call's own text runs up to the next add_argument
                flags.add(f"no-{name.group(1)}")
    return flags


def _check_method_fine_tune(config: dict, path: Path) -> None:
    """A method's `fine_tune:` flags must be fine_tune.py's own, with plain values, on a method that learns tokens."""
    known = script_flags("fine_tune.py")
    for method, flags in config["methods"].items():
        classifier_flags, overrides = split_method(flags)
        if not overrides:
            continue
        unknown = sorted(set(overrides) - known)
        if unknown:
            close = difflib.get_close_matches(unknown[0], known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UserError(f"{', '.join(unknown)} in the fine_tune flags of method {method} in {path} is not a "
                            f"fine_tune.py flag a method can set{hint}; see `python fine_tune.py --help` (the dataset "
                            f"flags are the grid's)")
        nested = sorted(name for name, value in overrides.items() if isinstance(value, dict))
        if nested:
            raise UserError(f"{', '.join(nested)} in the fine_tune flags of method {method} in {path} must be a value "
                            f"or a list of values, not a mapping")
        needs = method_needs({**config["train_classifier"], **classifier_flags})
        if not (needs.tokens or needs.noisy_tokens):
            raise UserError(f"method {method} in {path} has fine_tune flags but learns no tokens (that takes aug "
                            f"textual-inversion, num-synthetic above 0 and no embed-path); drop its fine_tune")


def token_variant_name(overrides: dict) -> str:
    """The folder of the tokens learned with a method's `fine_tune.py` overrides: `flag-value` per override, sorted by
    flag and joined by `_` (`max_train_steps-2000_num_vectors-4`), so that methods with the same overrides share it.
    A value with `_` or another character unfit for a folder name, or a name over `VARIANT_NAME_LENGTH`, gets the
    name's readable part followed by a digest of the overrides, so that two different sets never share a folder.

    Args:
        overrides: fine_tune.py flag (without `--`) to value.

    Returns:
        The folder name.
    """
    def text(value) -> str:
        if isinstance(value, (list, tuple)):
            return ",".join(map(text, value))
        return str(value).lower() if isinstance(value, bool) or value is None else str(value)

    values = {name: text(overrides[name]) for name in sorted(overrides)}
    name = "_".join(f"{flag}-{value}" for flag, value in values.items())
    if VARIANT_NAME.match(name) and len(name) <= VARIANT_NAME_LENGTH and not any("_" in v for v in values.values()):
        return name
    digest = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:8]
    return re.sub(r"[^A-Za-z0-9._,+-]+", "-", name)[:VARIANT_NAME_LENGTH] + "-" + digest


def flag_arguments(flags: dict) -> list[str]:
    """Turn a config mapping into command-line arguments (`true` → bare flag, `false`/`null` → left out).

    Args:
        flags: flag name (without `--`) to value.

    Returns:
        The argument list, e.g. `["--strength", "0.7", "--scale_lr"]`.
    """
    arguments = []
    for name, value in flags.items():
        if value is None or value is False:
            continue
        if value is True:
            arguments.append(f"--{name}")
        elif isinstance(value, (list, tuple)):
            arguments += [f"--{name}", *map(str, value)]
        else:
            arguments += [f"--{name}", str(value)]
    return arguments


def _is_on(value) -> bool:
    """A value-taking boolean flag of the config (`1`, `true`, "True", ...)."""
    try:
        return str2bool(value) if value is not None else False
    except argparse.ArgumentTypeError as error:
        raise UserError(str(error)) from None


# ----------------------------------------------------------------------------------------------------------
# jobs


@dataclass
class Job:
    """One script call of the grid.

    Args:
        name: unique, human-readable (`train_classifier diagen custom_coco seed 0 2epc`).
        script: the top-level script it runs.
        arguments: its command-line arguments.
        outputs: files a successful run must leave.
        log: where its stdout and stderr go (appended).
        needs: names of the jobs that must succeed first.
        skip_when: the job is done (skipped) when all of these exist; default `outputs`.
        complete: a stricter test of a finished job than its files existing (e.g. a prompt CSV that a killed run
            left with only some classes).
    """

    name: str
    script: str
    arguments: list[str]
    outputs: list[Path]
    log: Path
    needs: list[str] = field(default_factory=list)
    skip_when: list[Path] | None = None
    complete: Callable[[], bool] | None = None

    def done(self) -> bool:
        paths = self.outputs if self.skip_when is None else self.skip_when
        return bool(paths) and all(path.exists() for path in paths) and (self.complete is None or self.complete())

    def produced(self) -> bool:
        return all(path.exists() for path in self.outputs)

    def command(self) -> list[str]:
        return [sys.executable, str(REPO_ROOT / self.script), *self.arguments]

    def display(self) -> str:
        """The command as a user would type it in the current folder."""
        script = REPO_ROOT / self.script
        try:
            script = script.relative_to(Path.cwd())
        except ValueError:
            pass
        return shlex.join(["python", str(script), *self.arguments])


@dataclass
class MethodNeeds:
    """The prerequisites of one method's runs."""

    tokens: bool = False
    noisy_tokens: bool = False
    prompts: bool = False
    filter: bool = False


def method_needs(flags: dict) -> MethodNeeds:
    """Which pipeline steps a method needs before it can run.

    Args:
        flags: its `train_classifier.py` flags (common ones merged with the method's).

    Returns:
        The prerequisites: none for `num-synthetic: 0`; tokens (plain, or noisy with `use-embedding-noise`) for
        `textual-inversion` without an explicit `embed-path`; prompts for `use-generated-prompts`; the filter
        for `synthetic_filter: use` (`train` trains it inside the run).
    """
    if int(flags.get("num-synthetic", DEFAULT_NUM_SYNTHETIC)) == 0:
        return MethodNeeds()  # the baseline: real images only
    augmentations = flags.get("aug", DEFAULT_AUG)
    augmentations = [augmentations] if isinstance(augmentations, str) else list(augmentations)
    textual_inversion = DEFAULT_AUG in augmentations and "embed-path" not in flags
    noise = _is_on(flags.get("use-embedding-noise"))
    return MethodNeeds(tokens=textual_inversion and not noise, noisy_tokens=textual_inversion and noise,
                       prompts=_is_on(flags.get("use-generated-prompts")),
                       filter=str(flags.get("synthetic_filter")) == "use")


def _prompts_cover_classes(path: Path, dataset: str) -> bool:
    """Whether the prompt CSV has prompts for every class of `dataset` (classes known without loading it)."""
    from semantic_aug.datasets import get_dataset_class
    from semantic_aug.stages.prompts import read_prompt_csv

    try:
        read_prompt_csv(path, list(get_dataset_class(dataset).class_names) or None)
    except UserError:
        return False
    return True


@dataclass
class GridPlan:
    """What every job of a grid shares: the dataset key, its data flags, the methods' flags, needs and token variants
    (None: the tokens of the common `fine_tune:` flags; else `token_variant_name` of the method's overrides)."""

    config: dict
    dataset: str
    data_flags: list[str]
    pipeline_logs: Path
    methods: list[str]
    flags_of: dict[str, dict]
    needs_of: dict[str, MethodNeeds]
    variant_of: dict[str, str | None] = field(default_factory=dict)
    fine_tune_of: dict[str | None, dict] = field(default_factory=dict)

    def any_needs(self, what: str) -> bool:
        return any(getattr(needs, what) for needs in self.needs_of.values())

    def variant_needs(self, what: str, variant: str | None) -> bool:
        """Whether a method of token variant `variant` needs `what` (`tokens` or `noisy_tokens`)."""
        return any(getattr(needs, what) for method, needs in self.needs_of.items()
                   if self.variant_of.get(method) == variant)

    @property
    def variants(self) -> list[str | None]:
        """The token variants the methods use, in the order of the methods."""
        return list(dict.fromkeys(self.variant_of.get(method) for method in self.methods))

    def token_layout(self, layout, variant: str | None):
        """`layout` with the `fine-tuned/` and `tokens/` folders of `variant`: under `pipeline_dir`, a variant's
        under `{pipeline_dir}/variants/{variant}`."""
        from semantic_aug.core.layout import FINE_TUNED_FOLDER, TOKENS_ROOT

        root = self.token_root(variant)
        return dataclasses.replace(layout, fine_tuned_root=root / FINE_TUNED_FOLDER, tokens_root=root / TOKENS_ROOT)

    def token_root(self, variant: str | None) -> Path:
        """The folder that holds `variant`'s `fine-tuned/` and `tokens/` (fine_tune.py's `--output_dir`)."""
        from semantic_aug.core.layout import VARIANTS_FOLDER

        root = Path(self.config["pipeline_dir"])
        return root if variant is None else root / VARIANTS_FOLDER / variant

    def scripts_default_folders(self, variant: str | None) -> bool:
        """Whether `variant`'s tokens are where the scripts look by default (then no path flag is passed)."""
        return self.token_root(variant) == DEFAULT_PIPELINE_DIR


def plan_jobs(config: dict, methods: list[str] | None = None) -> list[Job]:
    """Every job of the grid, prerequisites before the runs that need them.

    Args:
        config: from `load_config` (its seeds / examples_per_class already narrowed if the user asked).
        methods: run only these methods (default: all of the config).

    Returns:
        The jobs in a valid order (a job's `needs` come before it).
    """
    from semantic_aug.core.layout import RunLayout
    from semantic_aug.datasets import dataset_key

    data_dir, results_dir = config["data_dir"], Path(config["results_dir"])
    methods = methods or list(config["methods"])
    unknown = [m for m in methods if m not in config["methods"]]
    if unknown:
        raise UserError(f"unknown method(s) {', '.join(unknown)}; the config has: {', '.join(config['methods'])}")
    split = {m: split_method(config["methods"][m]) for m in methods}
    flags_of = {m: {**config["train_classifier"], **split[m][0]} for m in methods}
    variant_of = {m: token_variant_name(split[m][1]) if split[m][1] else None for m in methods}
    fine_tune_of = {variant_of[m]: {**config["fine_tune"], **split[m][1]} for m in methods}
    fine_tune_of.setdefault(None, config["fine_tune"])
    # the key carries the data fingerprint off the dataset's default data, so a run on other data is never "finished"
    plan = GridPlan(config, dataset_key(config["dataset"], data_dir), ["--data-dir", str(data_dir)] if data_dir else [],
                    results_dir / "pipeline_logs", methods, flags_of,
                    {m: method_needs(flags) for m, flags in flags_of.items()}, variant_of, fine_tune_of)

    prompt_job, prompt_path = plan_prompt_job(plan)  # 1. LLM prompts, once per dataset
    jobs = [prompt_job] if prompt_job else []
    for seed in config["seeds"]:
        for epc in config["examples_per_class"]:
            # the run's files; its tokens are under pipeline_dir (`GridPlan.token_layout`)
            layout = RunLayout(plan.dataset, seed, epc, models_root=config["models_root"], results_root=results_dir)
            prerequisites = plan_run_prerequisites(plan, layout)  # 2. tokens and the filter
            jobs += {job.name: job for job in prerequisites.values()}.values()  # aggregation provides two things
            needed = {what: job.name for what, job in prerequisites.items()}
            if prompt_job:
                needed[("prompts", None)] = prompt_job.name
            jobs += plan_classifier_runs(plan, layout, needed, prompt_path)  # 3. one classifier run per method
    return jobs


def _selection(layout) -> list[str]:
    return ["--seeds", str(layout.seed), "--examples-per-class", str(layout.examples_per_class)]


def plan_prompt_job(plan: GridPlan) -> tuple[Job | None, Path | None]:
    """The job that writes the LLM prompts (None where the file is given or no method uses prompts), and the file."""
    from semantic_aug.datasets import get_dataset_class

    config, dataset = plan.config, plan.dataset
    if not plan.any_needs("prompts"):
        return None, None
    if not config["prompts"].get("path"):
        raise UserError("a method uses LLM prompts (use-generated-prompts), so the config needs prompts.path")
    prompt_path = Path(config["prompts"]["path"])
    generate = config["prompts"].get("generate")
    if generate:
        return Job(f"generate_prompts {dataset}", "generate_prompts.py",
                   ["--dataset", dataset, "--outdir", str(prompt_path.parent), "--out-filename", prompt_path.name,
                    *(plan.data_flags if not get_dataset_class(dataset).class_names else []),
                    *flag_arguments(generate)],
                   [prompt_path], plan.pipeline_logs / f"generate_prompts_{dataset}.log",
                   complete=lambda: _prompts_cover_classes(prompt_path, dataset)), prompt_path
    if not prompt_path.is_file():
        raise UserError(f"prompt file {prompt_path} not found; create it with generate_prompts.py or add "
                        f"prompts.generate (generate_prompts.py flags) to the config")
    return None, prompt_path


def plan_run_prerequisites(plan: GridPlan, layout) -> dict[tuple[str, str | None], Job]:
    """A run's textual-inversion tokens, per token variant (with --augment-embeddings, aggregation writes the plain
    and the noisy file), and its filter, keyed by what they provide: (`tokens` or `noisy_tokens`, variant) and
    (`filter`, None)."""
    jobs: dict[tuple[str, str | None], Job] = {}
    for variant in plan.variants:
        jobs.update(plan_token_jobs(plan, layout, variant))
    if plan.any_needs("filter"):
        config = plan.config
        jobs[("filter", None)] = Job(
            f"train_filter {plan.dataset} seed {layout.seed} {layout.examples_per_class}epc", "train_filter.py",
            ["--dataset", plan.dataset, *_selection(layout), *plan.data_flags, "--models-root",
             str(config["models_root"]), *flag_arguments(config["filter"])],
            [layout.filter], plan.pipeline_logs / f"train_filter_{layout.run_id}.log")
    return jobs


def plan_token_jobs(plan: GridPlan, layout, variant: str | None) -> dict[tuple[str, str | None], Job]:
    """The `fine_tune.py` and `aggregate_embeddings.py` jobs of one token variant of a run (none if no method of the
    variant needs tokens), keyed by what they provide."""
    config, layout = plan.config, plan.token_layout(layout, variant)
    run_id = f"{plan.dataset} seed {layout.seed} {layout.examples_per_class}epc"
    name = run_id if variant is None else f"{run_id} {variant}"  # a job name per variant
    log_suffix = f"{layout.run_id}.log" if variant is None else f"{variant}_{layout.run_id}.log"
    variants = [noise for noise, wanted in ((False, plan.variant_needs("tokens", variant)),
                                            (True, plan.variant_needs("noisy_tokens", variant))) if wanted]
    if not variants:
        return {}
    token_files = [layout.tokens(noise) for noise in variants]
    # the scripts' own default folders need no flag: the plan of pipeline_dir "." is the scripts' plain commands
    output_dir = [] if plan.scripts_default_folders(variant) else ["--output_dir", str(plan.token_root(variant))]
    tokens_dir = [] if plan.scripts_default_folders(variant) else ["--output-dir", str(layout.tokens_root)]
    fine_tune = Job(f"fine_tune {name}", "fine_tune.py",
                    ["--pretrained_model_name_or_path", str(config["model_path"]), "--dataset", plan.dataset,
                     *_selection(layout), *plan.data_flags, *output_dir, *flag_arguments(plan.fine_tune_of[variant])],
                    [], plan.pipeline_logs / f"fine_tune_{log_suffix}", skip_when=token_files)
    aggregate = Job(f"aggregate_embeddings {name}", "aggregate_embeddings.py",
                    ["--dataset", plan.dataset, *_selection(layout), *plan.data_flags,
                     "--input-path", str(layout.fine_tuned_root), *tokens_dir,
                     "--augment-embeddings", str(True in variants), *flag_arguments(config["aggregate_embeddings"])],
                    token_files, plan.pipeline_logs / f"aggregate_embeddings_{log_suffix}", needs=[fine_tune.name])
    return {("fine_tune", variant): fine_tune, ("tokens", variant): aggregate, ("noisy_tokens", variant): aggregate}


def plan_classifier_runs(plan: GridPlan, layout, needed: dict[tuple[str, str | None], str],
                         prompt_path: Path | None) -> list[Job]:
    """One `train_classifier.py` job per method, needing the jobs that make its tokens, prompts and filter."""
    config, run_id = plan.config, f"{plan.dataset} seed {layout.seed} {layout.examples_per_class}epc"
    jobs = []
    for method in plan.methods:
        needs, variant = plan.needs_of[method], plan.variant_of[method]
        run = dataclasses.replace(layout, method=method)
        outputs = [run.results_csv, *(run.test_csv(split) for split in config["eval_splits"])]
        arguments = ["--dataset", plan.dataset, *_selection(layout), "--method", method, "--logdir", str(run.logdir),
                     "--synthetic-dir", str(run.synthetic_dir), "--model-path", str(config["model_path"]),
                     *plan.data_flags]
        if config["eval_splits"]:
            arguments += ["--eval_on_test_set", *config["eval_splits"]]
        if needs.prompts:
            arguments += ["--prompt-path", str(prompt_path)]
        if needs.filter:
            arguments += ["--models-root", str(config["models_root"])]
        if (needs.tokens or needs.noisy_tokens) and not plan.scripts_default_folders(variant):
            arguments += ["--embed-path", str(plan.token_layout(layout, variant).tokens(needs.noisy_tokens))]
        keys = [(what, variant if what in ("tokens", "noisy_tokens") else None)
                for what in ("tokens", "noisy_tokens", "prompts", "filter") if getattr(needs, what)]
        jobs.append(Job(f"train_classifier {method} {run_id}", "train_classifier.py",
                        arguments + flag_arguments(plan.flags_of[method]), outputs,
                        run.logdir / f"train_classifier_{layout.run_id}.log",
                        needs=[needed[key] for key in keys if key in needed]))
    return jobs


def check_dataset(config: dict) -> None:
    """Fail before any GPU time is spent if the dataset folder or an evaluation split is missing.

    Args:
        config: from `load_config` (dataset, data_dir, eval_splits).

    Raises:
        UserError: naming what is missing and what to set.
    """
    from semantic_aug.datasets import get_dataset_class

    dataset_class = get_dataset_class(config["dataset"])
    data_env = getattr(dataset_class, "data_dir_env", None)
    if config["data_dir"] is not None and not Path(config["data_dir"]).expanduser().is_dir():
        raise UserError(f"data_dir {config['data_dir']} does not exist")
    if config["data_dir"] is None and getattr(dataset_class, "default_data_dir", None) is None \
            and not (data_env and os.environ.get(data_env)):
        hint = f", or set ${data_env}" if data_env else ""
        raise UserError(f"{config['dataset']} needs its data folder: set data_dir in the config (or pass --data-dir{hint})")
    for split in config["eval_splits"]:
        if split not in TEST_SPLITS:
            raise UserError(f"eval_splits takes {' and '.join(TEST_SPLITS)}, got {split!r} (the best validation "
                            f"accuracy is in every run's training history; report.py shows it as `val`)")
        if split not in dataset_class.splits:
            raise UserError(f"{config['dataset']} has no split {split!r} (eval_splits); it has: "
                            f"{', '.join(s for s in dataset_class.splits if s != 'train')}")
        folders = getattr(dataset_class, "split_folders", None)
        if folders:  # folder datasets: the split is a folder that a downscaled copy may lack
            folder = dataset_class.resolve_data_dir(config["data_dir"]) / folders[split]
            if not folder.is_dir():
                raise UserError(f"eval split {split!r} needs {folder}, which does not exist; set data_dir to a copy of "
                                f"{config['dataset']} that has it, or leave {split} out of eval_splits")


# ----------------------------------------------------------------------------------------------------------
# command line


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--config", required=True, help="experiment YAML, e.g. experiments/custom_coco.yaml")
    parser.add_argument("--dry-run", action=argparse.BooleanOptionalAction, default=False,
                        help="print the commands (marking those whose results exist), the work and estimated time per "
                             "stage, and with --executor slurm the sbatch settings and job count; run nothing")
    parser.add_argument("--methods", nargs="+", default=None, help="run only these methods of the config")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the config's seeds")
    parser.add_argument("--examples-per-class", type=int, nargs="+", default=None,
                        help="override the config's examples_per_class")
    parser.add_argument("--data-dir", default=None, help="override the config's data_dir (the dataset folder)")
    parser.add_argument("--results-dir", default=None, help="override the config's results_dir")
    parser.add_argument("--eval-splits", nargs="*", default=None, choices=TEST_SPLITS,
                        help="override the config's eval_splits (splits the best classifier is tested on)")
    parser.add_argument("--executor", default=None, choices=EXECUTORS,
                        help="where the jobs run: `local` on this machine's GPUs, `slurm` as sbatch jobs through "
                             "submitit (default: the config's `executor`, else local)")
    parser.add_argument("--gpus", default=None,
                        help="comma-separated GPU ids to spread the jobs over (default: every GPU torch sees); `none` "
                             "runs one job at a time on the CPU; the dry run estimates the wall time for these GPUs")
    parser.add_argument("--jobs-per-gpu", type=int, default=None,
                        help="local executor: jobs that share one GPU at a time, each with CUDA_VISIBLE_DEVICES of "
                             "its GPU (default: the config's `jobs_per_gpu`, else 1)")
    parser.add_argument("--max-retries", type=int, default=None,
                        help="runs of a failed (Slurm: also cancelled, pre-empted or timed-out) job after the first; "
                             "the scripts resume from their checkpoints (default: the config's `max_retries`, else 1)")
    slurm = parser.add_argument_group("Slurm (--executor slurm; each overrides the key of the config's `slurm:`)")
    slurm.add_argument("--slurm-partition", default=None, help="sbatch --partition (default: the cluster's)")
    slurm.add_argument("--slurm-account", default=None, help="sbatch --account (default: none)")
    slurm.add_argument("--slurm-qos", default=None, help="sbatch --qos (default: none)")
    slurm.add_argument("--slurm-gpus-per-job", type=int, default=None,
                       help=f"GPUs per job, 0 for CPU jobs (default: {SlurmSettings.gpus_per_job})")
    slurm.add_argument("--slurm-cpus-per-job", type=int, default=None,
                       help=f"CPU cores per job (default: {SlurmSettings.cpus_per_job})")
    slurm.add_argument("--slurm-mem", default=None, help="memory per job, e.g. 32G (default: the partition's)")
    slurm.add_argument("--slurm-time", type=int, default=None,
                       help=f"time limit per job in minutes; a job that reaches it is requeued and resumes "
                            f"(default: {SlurmSettings.time_min})")
    slurm.add_argument("--slurm-array-parallelism", type=int, default=None,
                       help=f"tasks of one job array running at once (default: {SlurmSettings.array_parallelism})")
    slurm.add_argument("--slurm-option", action="append", default=None, metavar="KEY=VALUE",
                       help="a further sbatch option without `--` (e.g. constraint=h100); repeatable (default: none)")
    slurm.add_argument("--slurm-poll-seconds", type=float, default=None,
                       help=f"how often the runner asks squeue about its jobs (default: {SlurmSettings.poll_seconds:g})")
    slurm.add_argument("--slurm-folder", default=None,
                       help="submitit's job files and Slurm's stdout/stderr (default: {results_dir}/slurm)")
    parser.add_argument("--report", action=argparse.BooleanOptionalAction, default=None,
                        help="build the results table and plots when the grid is done (default: the config's "
                             "`report`, on unless set false)")
    return parser.parse_args()


def slurm_settings(config: dict, args: argparse.Namespace | None = None) -> SlurmSettings:
    """The sbatch settings: the config's `slurm:` keys, overridden by the `--slurm-*` flags.

    Raises:
        UserError: for a malformed `--slurm-option` or a non-positive count.
    """
    values = {SLURM_KEYS[key]: value for key, value in config["slurm"].items() if value is not None}
    values.setdefault("folder", str(Path(config["results_dir"]) / "slurm"))
    values["sbatch"] = dict(values.get("sbatch") or {})
    if args is not None:
        for name in ("partition", "account", "qos", "gpus_per_job", "cpus_per_job", "mem", "array_parallelism",
                     "poll_seconds", "folder"):
            if getattr(args, f"slurm_{name}") is not None:
                values[name] = getattr(args, f"slurm_{name}")
        if args.slurm_time is not None:
            values["time_min"] = args.slurm_time
        for option in args.slurm_option or []:
            key, separator, value = option.partition("=")
            if not separator or not key.strip():
                raise UserError(f"--slurm-option {option!r} must be KEY=VALUE (an sbatch option without --, e.g. "
                                f"constraint=h100)")
            values["sbatch"][key.strip().lstrip("-")] = value
    settings = SlurmSettings(**values)
    for name in ("cpus_per_job", "time_min", "array_parallelism"):
        if int(getattr(settings, name)) < 1:
            raise UserError(f"slurm {name} must be at least 1, got {getattr(settings, name)}")
    if settings.gpus_per_job < 0 or settings.poll_seconds <= 0:
        raise UserError(f"slurm gpus_per_job must be 0 or more and poll_seconds above 0, got "
                        f"{settings.gpus_per_job} and {settings.poll_seconds}")
    return settings


def main(args: argparse.Namespace) -> None:
    from semantic_aug.runner.grid_cost import describe_cost

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s: %(message)s", datefmt="%H:%M:%S")
    config = load_config(args.config)
    for key, override in (("seeds", args.seeds), ("examples_per_class", args.examples_per_class),
                          ("data_dir", args.data_dir), ("results_dir", args.results_dir),
                          ("eval_splits", args.eval_splits), ("report", args.report), ("executor", args.executor),
                          ("jobs_per_gpu", args.jobs_per_gpu), ("max_retries", args.max_retries)):
        if override is not None:
            config[key] = override
    if config["executor"] not in EXECUTORS:
        raise UserError(f"executor {config['executor']!r} in {args.config} is not one of {', '.join(EXECUTORS)}")
    if int(config["jobs_per_gpu"]) < 1 or int(config["max_retries"]) < 0:
        raise UserError(f"jobs_per_gpu must be at least 1 and max_retries 0 or more, got {config['jobs_per_gpu']} "
                        f"and {config['max_retries']}")
    slurm = slurm_settings(config, args) if config["executor"] == "slurm" else None
    check_dataset(config)
    jobs = plan_jobs(config, args.methods)
    gpus = visible_gpus(args.gpus)
    per_gpu = int(config["jobs_per_gpu"])
    if slurm is not None:
        where = "Slurm (sbatch through submitit)"
    elif gpus:
        where = f"GPUs {', '.join(gpus)} ({'one job' if per_gpu == 1 else f'{per_gpu} jobs'} per GPU)"
    else:
        where = "the CPU (one job at a time)"

    if args.dry_run:
        done = [job.done() for job in jobs]
        for job, finished in zip(jobs, done):
            print(f"{'[skip]' if finished else '[run] '} {job.display()}")
        print("\n".join(describe_cost(jobs, config, len(gpus))))
        if slurm is not None:
            print("# sbatch settings of every job (dependencies per array: --dependency=afterok:<ids>):")
            print("\n".join(slurm.sbatch_lines()))
            pending = {job.name for job, finished in zip(jobs, done) if not finished}
            where = f"Slurm as {describe_submissions(jobs, pending)}, up to {config['max_retries']} resubmission(s) each"
        print(f"# {len(jobs)} jobs: {len(jobs) - sum(done)} to run, {sum(done)} already done (skipped); "
              f"would run on {where}")
        return

    logger.info("%d jobs (%d already done) from %s, on %s", len(jobs), sum(job.done() for job in jobs), args.config, where)
    if slurm is not None:
        status = SlurmExecutor(jobs, slurm, max_retries=int(config["max_retries"])).run()
    else:
        status = Scheduler(jobs, worker_slots(gpus, per_gpu), max_retries=int(config["max_retries"])).run()
    failed = [name for name in status if status[name] == "failed"]
    blocked = [name for name in status if status[name] == "blocked"]
    logger.info("finished: %d run, %d skipped, %d failed, %d blocked", list(status.values()).count("done"),
                list(status.values()).count("skipped"), len(failed), len(blocked))

    if config["report"]:
        from semantic_aug.runner.reporting import build_report

        try:
            print(build_report(config["results_dir"], data_dir=config["data_dir"]).describe())
        except UserError as error:
            if not (failed or blocked):
                raise
            logger.warning("no report: %s", error)
    if failed or blocked:
        logs = ", ".join(str(next(job.log for job in jobs if job.name == name)) for name in failed)
        raise UserError(f"{len(failed)} job(s) failed and {len(blocked)} could not run; see {logs}; rerun the same "
                        f"command to retry them (finished jobs are skipped)")


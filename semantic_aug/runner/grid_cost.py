"""What the experiment grid costs before it runs: per stage, the jobs, updates, images and iterations of the jobs
still to run, and the wall time they would take on N GPUs, from measured rates (`STAGE_RATES`).

The wall time is simulated: jobs start in plan order as soon as a GPU is free and the jobs they need have finished,
one job per GPU. It is bounded below by the longest chain of dependent jobs (Textual Inversion, aggregation,
classifier run), which is what many GPUs leave.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# Measured through the scripts on one H100 (SD v1.4 architecture and ResNet-50 with random weights, Custom COCO,
# seed 0, 2 examples per class, the scripts' defaults): benchmarks/results/bench_run.log. Refresh from its log.
STAGE_RATES = {
    "textual_inversion_samples_per_s": 1.77 * 92,  # `fine_tune.py --joint`, compiled: 1.77 updates/s of 23 x 4
    "textual_inversion_setup_s": 35.0 + 157.0,  # loading and latents, then compiling up to the first update
    "generation_images_per_s": 6.33,  # steady, compiled, bf16, batch 32
    "generation_compile_s": 75.0,  # the first batch of a machine's first generating run (empty compile cache)
    "generation_cached_compile_s": 75.0,  # later runs load the compiled code; not measured apart yet: an upper bound
    "generation_eager_images_per_s": 5.0,  # `--no-compile-generation` (bench_generation.py, H100, eager)
    "classifier_iterations_per_s": 84.3,  # ResNet-50 linear probe, batch `classifier_batch`, validation included
    "classifier_batch": 16,
    "filter_iterations_per_s": 31.7,  # the filter's ResNet-50 with its RandAugment chain, validation included
    "script_setup_s": 57.0,  # DIAGen's classifier run apart from generation and training: loading, scoring, testing
}
STAGES = ("Textual Inversion", "aggregation", "prompts", "filter", "generation", "classifier", "evaluation")
FINE_TUNE_DEFAULT_STEPS = 5000  # fine_tune.py's --max_train_steps default (the reference's)
FINE_TUNE_DEFAULT_BATCH = 4  # fine_tune.py's --train_batch_size default
CLASSIFIER_DEFAULTS = {"iterations-per-epoch": 200, "num-epochs": 50, "batch-size": 16, "num-synthetic": 10}
FILTER_DEFAULTS = {"iterations-per-epoch": 200, "max-epochs": 50, "batch-size": 16}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# train_classifier.py flags that do not change the synthetic images: runs that differ only in these link one set
NOT_GENERATION_FLAGS = {
    "method", "logdir", "synthetic-dir", "synthetic_filter", "filter-mode", "filter-threshold", "models-root",
    "classifier-backbone", "finetune-backbone", "image-size", "iterations-per-epoch", "num-epochs", "batch-size",
    "synthetic-probability", "use-randaugment", "use-cutmix", "eval_on_test_set", "save_model", "device",
    "num-workers", "generation-batch-size", "generation-dtype", "compile-generation", "no-compile-generation",
    "overwrite-synthetic"}


@dataclass
class StageWork:
    """The work of one stage: jobs, Textual Inversion updates, images (generated or evaluated), training iterations
    and GPU seconds."""

    jobs: int = 0
    updates: int = 0
    images: int = 0
    iterations: int = 0
    seconds: float = 0.0


@dataclass
class GridCost:
    """Per-stage work of the jobs to run, and each job's estimated seconds (for the wall-time simulation)."""

    stages: dict[str, StageWork] = field(default_factory=lambda: {stage: StageWork() for stage in STAGES})
    job_seconds: dict[str, float] = field(default_factory=dict)


def argument_values(arguments: list[str]) -> dict[str, list[str]]:
    """A script's arguments as flag name (without `--`) -> the values after it (`[]` for a bare flag)."""
    values: dict[str, list[str]] = {}
    name = None
    for argument in arguments:
        if argument.startswith("--"):
            name = argument[2:]
            values[name] = []
        elif name is not None:
            values[name].append(argument)
    return values


def _number(values: dict, name: str, default: float) -> float:
    return float(values[name][0]) if values.get(name) else default


def _split_images(dataset: str, data_dir: str | None, split: str) -> int:
    """Images of an evaluation split (folder datasets; 0 where the folder cannot be read without loading the data)."""
    from semantic_aug.datasets import get_dataset_class

    dataset_class = get_dataset_class(dataset)
    folders = getattr(dataset_class, "split_folders", None)
    if not folders or split not in folders:
        return 0
    try:
        folder = Path(dataset_class.resolve_data_dir(data_dir)) / folders[split]
    except Exception:  # no data folder yet: the dry run still prints the rest
        return 0
    return sum(1 for path in folder.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES)


def grid_cost(jobs: list, config: dict, rates: dict = STAGE_RATES) -> GridCost:
    """The work and the estimated GPU seconds of the jobs that are not done.

    Args:
        jobs: the plan (`plan_jobs`).
        config: the experiment config (dataset, data_dir, eval_splits).
        rates: the measured rates (`STAGE_RATES`).

    Returns:
        Per stage and per job.
    """
    from semantic_aug.datasets import get_dataset_class

    classes = len(get_dataset_class(config["dataset"]).class_names)
    eval_images = sum(_split_images(config["dataset"], config["data_dir"], split) for split in config["eval_splits"])
    setup = rates["script_setup_s"]
    cost = GridCost()
    generated: set = set()  # the synthetic sets made so far (a later run with the same settings links them)
    for job in jobs:
        if job.done():
            continue
        values = argument_values(job.arguments)
        script = Path(job.script).name
        seconds = 0.0
        if script == "fine_tune.py":
            stage = cost.stages["Textual Inversion"]
            updates = int(_number(values, "max_train_steps", FINE_TUNE_DEFAULT_STEPS))
            samples = updates * _number(values, "train_batch_size", FINE_TUNE_DEFAULT_BATCH) * classes
            seconds = rates["textual_inversion_setup_s"] + samples / rates["textual_inversion_samples_per_s"]
            stage.updates += updates
        elif script == "aggregate_embeddings.py":
            stage, seconds = cost.stages["aggregation"], setup
        elif script == "generate_prompts.py":
            stage, seconds = cost.stages["prompts"], setup  # the language model's time is not in the table
        elif script == "train_filter.py":
            stage = cost.stages["filter"]
            iterations = int(_number(values, "iterations-per-epoch", FILTER_DEFAULTS["iterations-per-epoch"])
                             * _number(values, "max-epochs", FILTER_DEFAULTS["max-epochs"]))  # early stopping: less
            batch = _number(values, "batch-size", FILTER_DEFAULTS["batch-size"])
            seconds = setup + iterations * batch / rates["classifier_batch"] / rates["filter_iterations_per_s"]
            stage.iterations += iterations
        elif script == "train_classifier.py":
            seconds = setup + _classifier_work(cost, values, classes, eval_images, rates, generated)
            cost.job_seconds[job.name] = seconds
            continue
        else:
            stage, seconds = None, setup
        if stage is not None:
            stage.jobs += 1
            stage.seconds += seconds
        cost.job_seconds[job.name] = seconds
    return cost


def _classifier_work(cost: GridCost, values: dict, classes: int, eval_images: int, rates: dict,
                     generated: set) -> float:
    """Add a `train_classifier.py` job's generation, training and evaluation to the stages; returns its seconds.
    A job whose synthetic set is in `generated` links it (no generation); otherwise its set is added there."""
    seconds = 0.0
    epc = int(_number(values, "examples-per-class", 1))
    synthetic = int(_number(values, "num-synthetic", CLASSIFIER_DEFAULTS["num-synthetic"]))
    generation_key = tuple(sorted((name, tuple(value)) for name, value in values.items()
                                  if name not in NOT_GENERATION_FLAGS))
    if synthetic > 0 and generation_key not in generated:
        stage = cost.stages["generation"]
        images = synthetic * epc * classes
        compiled = "no-compile-generation" not in values  # on by default on a GPU
        rate = rates["generation_images_per_s"] if compiled else rates["generation_eager_images_per_s"]
        warm_up = rates["generation_cached_compile_s"] if generated else rates["generation_compile_s"]
        generation = images / rate + (warm_up if compiled else 0.0)
        generated.add(generation_key)
        stage.jobs += 1
        stage.images += images
        stage.seconds += generation
        seconds += generation
    stage = cost.stages["classifier"]
    iterations = int(_number(values, "iterations-per-epoch", CLASSIFIER_DEFAULTS["iterations-per-epoch"])
                     * _number(values, "num-epochs", CLASSIFIER_DEFAULTS["num-epochs"]))
    batch = _number(values, "batch-size", CLASSIFIER_DEFAULTS["batch-size"])
    training = iterations * batch / rates["classifier_batch"] / rates["classifier_iterations_per_s"]
    stage.jobs += 1
    stage.iterations += iterations
    stage.seconds += training
    seconds += training
    if values.get("eval_on_test_set"):
        stage = cost.stages["evaluation"]
        # inference at the training step's image rate: an upper bound (no backward pass)
        evaluation = eval_images / (rates["classifier_iterations_per_s"] * rates["classifier_batch"])
        stage.jobs += 1
        stage.images += eval_images
        stage.seconds += evaluation
        seconds += evaluation
    return seconds


def simulate_wall_time(jobs: list, job_seconds: dict[str, float], gpus: int) -> tuple[float, float]:
    """The wall time of the jobs on `gpus` GPUs, one job per GPU, and the longest chain of dependent jobs.

    Each step starts, among the jobs whose prerequisites are scheduled, the one that can start first (plan order on
    ties) on the GPU that is free first. Jobs not in `job_seconds` (done) take no time.

    Returns:
        (wall seconds, longest-chain seconds).
    """
    finish: dict[str, float] = {}
    chain: dict[str, float] = {}
    free = [0.0] * max(gpus, 1)
    remaining = [job for job in jobs]
    while remaining:
        ready = [job for job in remaining if all(need in finish for need in job.needs)]
        job = min(ready, key=lambda job: max([finish[need] for need in job.needs], default=0.0))
        remaining.remove(job)
        seconds = job_seconds.get(job.name, 0.0)
        ready_at = max([finish[need] for need in job.needs], default=0.0)
        chain[job.name] = seconds + max([chain[need] for need in job.needs], default=0.0)
        if not seconds:
            finish[job.name] = ready_at
            continue
        gpu = min(range(len(free)), key=free.__getitem__)
        finish[job.name] = max(free[gpu], ready_at) + seconds
        free[gpu] = finish[job.name]
    return max(finish.values(), default=0.0), max(chain.values(), default=0.0)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def describe_cost(jobs: list, config: dict, gpus: int, rates: dict = STAGE_RATES) -> list[str]:
    """The dry run's cost table (lines starting with `#`) and the wall-time estimate for `gpus` GPUs."""
    cost = grid_cost(jobs, config, rates)
    lines = [f"# {'stage':<18} {'jobs':>5} {'updates':>9} {'images':>9} {'iterations':>11} {'GPU time':>10}"]
    for name, work in cost.stages.items():
        lines.append(f"# {name:<18} {work.jobs:>5} {work.updates:>9} {work.images:>9} {work.iterations:>11} "
                     f"{_duration(work.seconds):>10}")
    total = sum(cost.job_seconds.values())
    lines.append(f"# {'total (with set-up)':<58} {_duration(total):>10}")
    wall, chain = simulate_wall_time(jobs, cost.job_seconds, gpus)
    if gpus:
        lines.append(f"# estimated wall time on {gpus} GPU(s): {_duration(wall)} (longest chain of dependent jobs: "
                     f"{_duration(chain)}; rates measured on one H100, semantic_aug/runner/grid_cost.py)")
    else:
        lines.append(f"# no GPU visible: no wall-time estimate (the rates are a GPU's; pass --gpus 0,1 to estimate "
                     f"for two GPUs); longest chain of dependent jobs on one GPU each: {_duration(chain)}")
    return lines

"""Kill tests: each long stage runs as a real subprocess, is SIGKILLed part-way, rerun, and must end exactly where an
uninterrupted run ends (issue #9).

Stages: Textual Inversion (fine_tune.py, resumes from its checkpoints), prompt generation (generate_prompts.py
against a local OpenAI-compatible server, killed mid-request), synthetic generation (train_classifier.py, killed
between images), classifier training (train_classifier.py) and filter training (train_filter.py). The two training
stages keep no mid-run checkpoint: a killed run leaves no output of its own, and the rerun says that it restarts
and trains that run again from the start, which the tests check gives the uninterrupted run's files.

Every kill point is drawn from a generator seeded by `KILL_SEED` and the stage, and the assertion messages name
it, so a failure can be replayed. A kill that lands inside a write leaves a hidden temporary file (the writes are
atomic); since a random kill rarely lands there, each test also plants such a file before the rerun, and checks
that the rerun removes it. The stages run on the tiny Stable Diffusion, efficientnet_lite0 at 32 px and a
10-class FOCUS layout of one training image per class, one CPU thread each.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from fault_kit import FakeOpenAI, write_focus_layout, write_focus_tokens
from semantic_aug.datasets.focus import FOCUS_CLASSES
from semantic_aug.core.embeddings import LEARNED_EMBEDS_NAME, load_tokens
from semantic_aug.stages.filtering import load_filter
from semantic_aug.stages.prompts import read_prompt_csv
from semantic_aug.stages.training import load_classifier

REPO_ROOT = Path(__file__).resolve().parents[1]
KILL_SEED = 9  # seeds every kill point of this file
RUN_TIMEOUT_S = 300  # per subprocess; a healthy one takes seconds
POLL_S = 0.005  # how often a test looks for the output that marks its kill point
PIXEL_TOLERANCE = 2  # uint8 levels a resumed synthetic image may differ by (float rounding)
TEST_API_KEY = "sk-test-SECRET-faults-0123456789"
KILL_JITTER_S = 0.05  # extra random delay after a kill point's file appears, so kills land inside steps too
WORK_LEFT_AFTER_KILL = 5  # checkpoints / images still to come after a kill point, so the run is surely alive
TRAINING_ITERATIONS = (10, 4)  # iterations per epoch, epochs of the classifier and filter runs
ITERATIONS_LEFT_AFTER_KILL = 15  # training iterations still to come after a kill point
TRAIN_PROGRESS = re.compile(r"train:\s+\d+%\|[^|]*\|\s*(\d+)/\d+")  # the tqdm bar of semantic_aug.stages.training.fit


def stage_rng(stage: str) -> np.random.Generator:
    """The generator of one stage's kill point: the same on every run and machine."""
    return np.random.default_rng([KILL_SEED, zlib.crc32(stage.encode("utf-8"))])


def script_env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                NO_PROXY="127.0.0.1,localhost", OPENAI_API_KEY=TEST_API_KEY)


def start(script: str, args: list, cwd: Path, log: Path) -> subprocess.Popen:
    """Start a top-level script; its stdout and stderr go to `log` (read while it runs)."""
    cwd.mkdir(parents=True, exist_ok=True)
    handle = open(log, "w")
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / script), *map(str, args)], cwd=cwd, env=script_env(),
                               stdout=handle, stderr=subprocess.STDOUT)
    handle.close()
    return process


def wait_until(condition, process: subprocess.Popen, log: Path, what: str, timeout: float = RUN_TIMEOUT_S) -> float:
    """Poll `condition()` until true (returns the time), failing if the process ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return time.monotonic()
        if process.poll() is not None:
            pytest.fail(f"the process ended ({process.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        time.sleep(POLL_S)
    process.kill()
    pytest.fail(f"timed out waiting for {what}")


def sigkill(process: subprocess.Popen, log: Path, point: str) -> None:
    """SIGKILL a process that must still be running (otherwise the test would not test a kill)."""
    assert process.poll() is None, f"the run ended before the kill point ({point}); make the stage longer"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=RUN_TIMEOUT_S)
    assert process.returncode == -signal.SIGKILL, log.read_text()[-3000:]


def finish(script: str, args: list, cwd: Path, log: Path) -> str:
    """Run a script to the end (it must succeed); returns its log."""
    process = start(script, args, cwd, log)
    try:
        process.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    text = log.read_text()
    assert process.returncode == 0, f"{script} failed ({process.returncode}):\n{text[-3000:]}"
    return text


def kill_during_training(script: str, args: list, cwd: Path, log: Path, stage: str) -> str:
    """Start a training script and SIGKILL it once its progress bar shows a seeded number of iterations done.

    Returns:
        The kill point, in words.
    """
    total = TRAINING_ITERATIONS[0] * TRAINING_ITERATIONS[1]
    iterations = int(stage_rng(stage).integers(1, total - ITERATIONS_LEFT_AFTER_KILL))
    point = f"{stage} killed after {iterations} of {total} training iterations"

    def done() -> int:
        return max(map(int, TRAIN_PROGRESS.findall(log.read_text())), default=0)

    process = start(script, args, cwd, log)
    wait_until(lambda: done() >= iterations, process, log, point)
    sigkill(process, log, point)
    return point


def files_under(root: Path) -> set[str]:
    """The files under `root` (relative paths), temporaries of interrupted writes left out."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.suffix != ".tmp"}


def temporaries(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.tmp"))


def plant_interrupted_write(target: Path) -> None:
    """Leave what a kill inside `semantic_aug.core.utils.atomic_path`'s write of `target` leaves: a hidden partial file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    (target.parent / f".{target.name}.killed{target.suffix}.tmp").write_bytes(b"half a file")


def assert_same_table(a: Path, b: Path) -> None:
    pd.testing.assert_frame_equal(pd.read_csv(a), pd.read_csv(b), rtol=1e-5, atol=1e-6)


def assert_same_classifier(a: Path, b: Path) -> None:
    first, second = load_classifier(a), load_classifier(b)
    assert first.metadata == second.metadata
    for (name, x), y in zip(first.state_dict().items(), second.state_dict().values()):
        torch.testing.assert_close(x, y, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------------------------------------
# shared data


@pytest.fixture(scope="module")
def focus(tmp_path_factory) -> SimpleNamespace:
    """A 10-class FOCUS layout (one training image per class at epc 1) and a token per class for the tiny SD.

    It is FOCUS's default data ($FOCUS_DIR) for the scripts, so their files keep the plain names (`focus_0_1`)."""
    root = tmp_path_factory.mktemp("focus")
    data = write_focus_layout(root / "data")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FOCUS_DIR", str(data))
        yield SimpleNamespace(data=data, tokens=write_focus_tokens(root / "tokens.pt"))


# ----------------------------------------------------------------------------------------------------------
# Textual Inversion


TI_STEPS, TI_CHECKPOINT_EVERY = 40, 4
TI_ARGS = ["--dataset", "custom_coco", "--pretrained_model_name_or_path", "tiny", "--examples-per-class", "1",
           "--seeds", "0", "--classes", "bench", "car", "--max_train_steps", str(TI_STEPS), "--train_batch_size", "1",
           "--resolution", "32", "--learning_rate", "5e-3", "--lr_warmup_steps", "0",
           "--checkpointing_steps", str(TI_CHECKPOINT_EVERY), "--save_steps", "6", "--output_dir", "out"]
TI_RUN = Path("out/fine-tuned/custom_coco-0-1")


def test_textual_inversion_killed_mid_training_resumes_to_the_uninterrupted_tokens(tmp_path, tiny_model_path):
    finish("fine_tune.py", TI_ARGS, tmp_path / "reference", tmp_path / "reference.log")

    rng = stage_rng("textual inversion")
    checkpoint = int(rng.integers(1, TI_STEPS // TI_CHECKPOINT_EVERY - WORK_LEFT_AFTER_KILL)) * TI_CHECKPOINT_EVERY
    delay = float(rng.uniform(0.0, KILL_JITTER_S))
    point = f"checkpoint-{checkpoint} of car + {delay:.3f} s"
    cwd, log = tmp_path / "killed", tmp_path / "killed.log"
    process = start("fine_tune.py", TI_ARGS, cwd, log)
    wait_until(lambda: (cwd / TI_RUN / "car" / f"checkpoint-{checkpoint}.pt").is_file(), process, log, point)
    time.sleep(delay)
    sigkill(process, log, point)
    assert not any((cwd / TI_RUN / name / LEARNED_EMBEDS_NAME).exists() for name in ("bench", "car")), point
    plant_interrupted_write(cwd / TI_RUN / "car" / LEARNED_EMBEDS_NAME)

    rerun = finish("fine_tune.py", TI_ARGS, cwd, tmp_path / "rerun.log")
    assert "resuming at update" in rerun, point
    assert files_under(cwd / "out") == files_under(tmp_path / "reference" / "out"), point
    assert temporaries(cwd) == []
    for name in ("bench", "car"):
        resumed = load_tokens(cwd / TI_RUN / name / LEARNED_EMBEDS_NAME)[f"<{name}>"]
        reference = load_tokens(tmp_path / "reference" / TI_RUN / name / LEARNED_EMBEDS_NAME)[f"<{name}>"]
        torch.testing.assert_close(resumed, reference, msg=lambda m: f"{name} after a kill at {point}: {m}")


# ----------------------------------------------------------------------------------------------------------
# prompt generation


PROMPT_CLASSES = ("bench", "bicycle", "book", "bottle")


def prompt_args(base_url: str) -> list:
    return ["--dataset", "custom_coco", "--classes", *PROMPT_CLASSES, "--prompts-per-class", "3", "--model",
            "fake-chat", "--base-url", base_url, "--outdir", "prompts", "--out-filename", "prompts.csv",
            "--max-retries", "0", "--timeout", "120"]


PROMPTS_CSV = Path("prompts/prompts.csv")


@pytest.fixture(scope="module")
def killed_prompts(tmp_path_factory) -> SimpleNamespace:
    """A reference generate_prompts.py run, and one killed while it waits for the answer about a seeded class, then
    rerun."""
    root = tmp_path_factory.mktemp("prompts")
    with FakeOpenAI() as server:
        finish("generate_prompts.py", prompt_args(server.base_url), root / "reference", root / "reference.log")

    killed_at = int(stage_rng("prompts").integers(1, len(PROMPT_CLASSES)))
    point = f"the request for class {PROMPT_CLASSES[killed_at]!r}"
    cwd, log = root / "killed", root / "killed.log"
    with FakeOpenAI(behaviour={PROMPT_CLASSES[killed_at]: "hang"}) as server:
        process = start("generate_prompts.py", prompt_args(server.base_url), cwd, log)
        wait_until(server.hung.is_set, process, log, point)
        sigkill(process, log, point)
        server.release()
        kept = list(read_prompt_csv(cwd / PROMPTS_CSV))
        plant_interrupted_write(cwd / PROMPTS_CSV)
        asked_before = len(server.requests)
        finish("generate_prompts.py", prompt_args(server.base_url), cwd, root / "rerun.log")
        asked_again = [name for name, _ in server.requests[asked_before:]]
    return SimpleNamespace(reference=root / "reference", cwd=cwd, killed_at=killed_at, point=point, kept=kept,
                           asked_again=asked_again)


def test_prompt_generation_killed_mid_request_keeps_finished_classes_and_resumes(killed_prompts):
    run = killed_prompts
    assert run.kept == list(PROMPT_CLASSES[:run.killed_at]), run.point
    assert run.asked_again == list(PROMPT_CLASSES[run.killed_at:]), "finished classes must not be asked for again"
    assert (run.cwd / PROMPTS_CSV).read_bytes() == (run.reference / PROMPTS_CSV).read_bytes(), run.point
    assert files_under(run.cwd) == files_under(run.reference)


def test_prompt_generation_rerun_removes_interrupted_writes(killed_prompts):
    assert temporaries(killed_prompts.cwd) == []


# ----------------------------------------------------------------------------------------------------------
# synthetic generation and classifier training (train_classifier.py)


RESULTS = Path("RESULTS/focus_1epc/baseline")
SYNTHETIC_DIR = RESULTS / "synthetics_seed_0"
NUM_SYNTHETIC = 2
CLASSIFIER_OUTPUTS = (RESULTS / "logs/results_focus_0_1.csv", RESULTS / "test/test_results_focus_0_1.csv",
                      RESULTS / "models/classifier_focus_0_1_[0.5]_[7.5].pth")


def classifier_args(focus) -> list:
    return ["--dataset", "focus", "--data-dir", focus.data, "--seeds", "0", "--examples-per-class", "1",
            "--num-synthetic", str(NUM_SYNTHETIC), "--model-path", "tiny", "--embed-path", focus.tokens,
            "--num-inference-steps", "4", "--strength", "0.5", "--guidance-scale", "7.5",
            "--generation-batch-size", "1", "--classifier-backbone", "efficientnet_lite0", "--image-size", "32",
            "--iterations-per-epoch", TRAINING_ITERATIONS[0], "--num-epochs", TRAINING_ITERATIONS[1],
            "--batch-size", "8", "--num-workers", "1", "--eval_on_test_set", "test", "--device", "cpu"]


@pytest.fixture(scope="module")
def classifier_reference(tmp_path_factory, focus, tiny_model_path) -> Path:
    """The working folder of an uninterrupted train_classifier.py run with synthetic images."""
    root = tmp_path_factory.mktemp("classifier_reference")
    finish("train_classifier.py", classifier_args(focus), root / "run", root / "run.log")
    return root / "run"


def assert_same_classifier_outputs(cwd: Path, reference: Path, point: str) -> None:
    assert files_under(cwd / "RESULTS") == files_under(reference / "RESULTS"), point
    results, test, model = CLASSIFIER_OUTPUTS
    assert_same_table(cwd / results, reference / results)
    assert_same_table(cwd / test, reference / test)
    assert_same_classifier(cwd / model, reference / model)


def test_synthetic_generation_killed_between_images_resumes_to_the_same_images(tmp_path, focus, classifier_reference):
    total = len(FOCUS_CLASSES) * NUM_SYNTHETIC
    made = int(stage_rng("synthetic").integers(1, total - WORK_LEFT_AFTER_KILL))
    point = f"{made} of {total} synthetic images written"
    cwd, log = tmp_path / "killed", tmp_path / "killed.log"
    process = start("train_classifier.py", classifier_args(focus), cwd, log)
    wait_until(lambda: len(list((cwd / SYNTHETIC_DIR).glob("*.png"))) >= made, process, log, point)
    sigkill(process, log, point)
    assert not (cwd / SYNTHETIC_DIR / "manifest.csv").exists(), point
    plant_interrupted_write(cwd / SYNTHETIC_DIR / "label_9-9-1.png")

    rerun = finish("train_classifier.py", classifier_args(focus), cwd, tmp_path / "rerun.log")
    cached = int(rerun.split(" cached, ")[0].rsplit(";", 1)[-1])
    assert made <= cached < total, f"the rerun should reuse the images made before the kill ({point})"
    reference = classifier_reference
    for name in ("manifest.csv", "settings.json"):
        assert (cwd / SYNTHETIC_DIR / name).read_text() == (reference / SYNTHETIC_DIR / name).read_text(), name
    for path in (reference / SYNTHETIC_DIR).glob("*.png"):
        resumed = np.asarray(Image.open(cwd / SYNTHETIC_DIR / path.name).convert("RGB"), dtype=np.int16)
        difference = np.abs(resumed - np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)).max()
        assert difference <= PIXEL_TOLERANCE, f"{path.name} differs by {difference} levels after a kill at {point}"
    assert temporaries(cwd) == [], point
    assert_same_classifier_outputs(cwd, reference, point)


@pytest.fixture(scope="module")
def killed_classifier(tmp_path_factory, focus, classifier_reference) -> SimpleNamespace:
    """train_classifier.py killed during the classifier's epochs (synthetic images cached), then rerun."""
    root = tmp_path_factory.mktemp("classifier_killed")
    cwd = root / "run"
    shutil.copytree(classifier_reference / SYNTHETIC_DIR, cwd / SYNTHETIC_DIR)
    point = kill_during_training("train_classifier.py", classifier_args(focus), cwd, root / "killed.log", "classifier")
    left = [path.as_posix() for path in CLASSIFIER_OUTPUTS if (cwd / path).exists()]
    plant_interrupted_write(cwd / CLASSIFIER_OUTPUTS[2])
    rerun = finish("train_classifier.py", classifier_args(focus), cwd, root / "rerun.log")
    return SimpleNamespace(cwd=cwd, point=point, left=left, rerun=rerun, leftover=temporaries(cwd))


def test_classifier_killed_mid_training_restarts_to_the_uninterrupted_result(killed_classifier, classifier_reference):
    point = killed_classifier.point
    assert killed_classifier.left == [], f"a kill during training ({point}) must leave no output of the run"
    assert f"{len(FOCUS_CLASSES) * NUM_SYNTHETIC} cached, 0 to make" in killed_classifier.rerun
    assert_same_classifier_outputs(killed_classifier.cwd, classifier_reference, point)


def test_classifier_rerun_says_it_restarts_the_killed_run(killed_classifier):
    assert any(word in killed_classifier.rerun.lower() for word in ("restart", "from scratch", "from the start"))


def test_classifier_rerun_removes_interrupted_writes(killed_classifier):
    assert killed_classifier.leftover == []


# ----------------------------------------------------------------------------------------------------------
# filter training (train_filter.py)


FILTER = Path("models/filter_focus_0_1.pth")


def filter_args(focus) -> list:
    return ["--dataset", "focus", "--data-dir", focus.data, "--seeds", "0", "--examples-per-class", "1",
            "--classifier-backbone", "efficientnet_lite0", "--image-size", "32", "--iterations-per-epoch",
            TRAINING_ITERATIONS[0], "--max-epochs", TRAINING_ITERATIONS[1], "--batch-size", "8",
            "--early-stopping-patience", "0", "--models-root", "models", "--logdir", "logs", "--device", "cpu"]


@pytest.fixture(scope="module")
def killed_filter(tmp_path_factory, focus) -> SimpleNamespace:
    """An uninterrupted train_filter.py run, and one killed during its epochs and rerun."""
    root = tmp_path_factory.mktemp("filter")
    finish("train_filter.py", filter_args(focus), root / "reference", root / "reference.log")
    cwd = root / "killed"
    point = kill_during_training("train_filter.py", filter_args(focus), cwd, root / "killed.log", "filter")
    left = files_under(cwd)
    plant_interrupted_write(cwd / FILTER)
    rerun = finish("train_filter.py", filter_args(focus), cwd, root / "rerun.log")
    return SimpleNamespace(reference=root / "reference", cwd=cwd, point=point, left=left, rerun=rerun)


def test_filter_killed_mid_training_restarts_to_the_uninterrupted_filter(killed_filter):
    cwd, reference, point = killed_filter.cwd, killed_filter.reference, killed_filter.point
    assert killed_filter.left == set(), f"a kill during training ({point}) must leave no file"
    assert files_under(cwd) == files_under(reference), point
    for log in ("logs/train_filter_focus_0_1.csv", "logs/calibration_filter_focus_0_1.csv"):
        assert_same_table(cwd / log, reference / log)
    resumed, uninterrupted = (torch.load(root / FILTER, weights_only=True) for root in (cwd, reference))
    assert resumed["metadata"] == uninterrupted["metadata"], point
    assert resumed["log_temperature"] == uninterrupted["log_temperature"], point
    for name, value in uninterrupted["head_state_dict"].items():
        torch.testing.assert_close(resumed["head_state_dict"][name], value)
    assert load_filter(cwd / FILTER, "cpu").class_names == list(FOCUS_CLASSES)


def test_filter_rerun_says_it_restarts_the_killed_run(killed_filter):
    assert any(word in killed_filter.rerun.lower() for word in ("restart", "from scratch", "from the start"))


def test_filter_rerun_removes_interrupted_writes(killed_filter):
    assert temporaries(killed_filter.cwd) == []

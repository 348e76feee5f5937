"""Bad inputs across the pipeline, at the command line (issue #9): each must end the script with a non-zero exit and
one error line that names the problem, without a traceback, and must leave no partial output behind. The API key
set for every run here must never show up in anything a script prints or writes.

Inputs already checked at the command line elsewhere are not repeated (the README's Troubleshooting table lists them all):
a missing --data-dir of train_classifier.py (test_train_classifier.py), a missing API key and a rejected key
(test_prompts.py), a fine-tuned folder without a class (test_aggregate_embeddings.py), an unknown token in
test_image_generation.py's prompt (test_image_generation_script.py); a language model that answers without
captions is checked through generate_prompts.main in test_prompts.py.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from fault_kit import TINY_TEXT_WIDTH, FakeOpenAI, write_focus_layout, write_focus_tokens
from semantic_aug.datasets import dataset_key
from semantic_aug.datasets.custom_coco import CUSTOM_COCO_CLASSES
from semantic_aug.datasets.focus import FOCUS_CLASSES
from semantic_aug.core.embeddings import LEARNED_EMBEDS_NAME, save_learned_embeds, token_name
from semantic_aug.stages.prompts import read_prompt_csv, write_prompt_csv

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_API_KEY = "sk-test-SECRET-bad-inputs-9f3kq2"
RUN_TIMEOUT_S = 180  # per subprocess; each fails within seconds
WHOLE_POOL = "8"  # examples per class that select every train-val image (the pool to train, the rest to val)
FULL_DISK_BYTES = 1 << 20  # RLIMIT_FSIZE of the full-disk run: the results CSVs fit, a classifier checkpoint does not
# run_cli's `error: ...` or argparse's `prog: error: ...`, at the start of a line or glued to a progress bar
ERROR_LINE = re.compile(r"(?:^|(?<=\]))(?:[\w.\-]+: )?error: ")
PROGRESS_BAR = re.compile(r"\d+%\|.*\|")  # a tqdm redraw
TI_PROGRESS = "textual inversion, "  # the label of fine_tune.py's training progress bar
SCRIPTS = ("fine_tune.py", "aggregate_embeddings.py", "generate_prompts.py", "train_classifier.py", "train_filter.py",
           "eval_on_testset.py", "test_image_generation.py", "report.py")


def run(script: str, *args, cwd: Path, env: dict | None = None, preexec_fn=None) -> subprocess.CompletedProcess:
    """Run a top-level script with the test API key in its environment, one CPU thread."""
    full_env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                    NO_PROXY="127.0.0.1,localhost", OPENAI_API_KEY=TEST_API_KEY)
    full_env.update(env or {})
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, str(REPO_ROOT / script), *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S, preexec_fn=preexec_fn)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """A non-zero exit with exactly one error line holding `fragments`, and after it at most progress-bar redraws;
    no traceback, no API key. Returns the error line."""
    stderr = result.stderr
    assert TEST_API_KEY not in result.stdout + stderr
    assert result.returncode != 0, f"exit 0, expected an error:\n{stderr[-2000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [i for i, line in enumerate(lines) if ERROR_LINE.search(line)]
    assert len(errors) == 1, f"expected one error line in stderr:\n{stderr[-2000:]}"
    after = lines[errors[0] + 1:]
    assert all(PROGRESS_BAR.search(line) for line in after), f"output after the error:\n{stderr[-2000:]}"
    line = lines[errors[0]][ERROR_LINE.search(lines[errors[0]]).start():]  # without a progress bar glued in front
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    print(f"[observed] {line}")  # shown with `pytest -rP`: the messages of the README's Troubleshooting table
    return line


def temporaries(root: Path) -> list[str]:
    """Hidden files of unfinished writes, and training restart markers (`.{output}.running.tmp`), under `root`: a
    failure that a script reports must leave neither."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.tmp"))


# ----------------------------------------------------------------------------------------------------------
# inputs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> SimpleNamespace:
    """Good and broken datasets, token files, prompt CSVs and output paths (built once, read-only afterwards)."""
    root = tmp_path_factory.mktemp("inputs")
    good = write_focus_layout(root / "focus")
    corrupt = shutil.copytree(good, root / "corrupt")
    (corrupt / "train-val" / "bird" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    zero_byte = shutil.copytree(good, root / "zero_byte")
    (zero_byte / "train-val" / "cat" / "empty.jpg").write_bytes(b"")
    small_class = shutil.copytree(good, root / "small_class")
    for extra in sorted((small_class / "train-val" / "bird").iterdir())[2:]:
        extra.unlink()
    (root / "empty").mkdir()
    for name in FOCUS_CLASSES:
        (root / "empty_classes" / "train-val" / name).mkdir(parents=True)

    tokens = write_focus_tokens(root / "tokens.pt")
    missing_token = write_focus_tokens(root / "missing_token.pt", classes=FOCUS_CLASSES[:-1])
    narrow = write_focus_tokens(root / "narrow.pt", width=16)
    (root / "not_tokens.pt").write_text("these are not tokens\n")

    prompts = {name: ["a photo of a {name}", "a photo of a {name} in the snow"] for name in FOCUS_CLASSES}
    write_prompt_csv(prompts, root / "prompts.csv")
    (root / "comma.csv").write_text((root / "prompts.csv").read_text().replace(";", ","))
    write_prompt_csv({name: values for name, values in prompts.items() if name != "truck"}, root / "no_truck.csv")
    (root / "empty_prompt.csv").write_text((root / "prompts.csv").read_text() + "bird;3;\n")
    run_dir = root / "fine-tuned" / "custom_coco-0-2"
    for i, name in enumerate(CUSTOM_COCO_CLASSES):
        save_learned_embeds(run_dir / name, token_name(name), torch.full((TINY_TEXT_WIDTH,), float(i)))
    (root / "a_file").write_text("a regular file: nothing can be created below it, not even by root\n")
    return SimpleNamespace(root=root, good=good, corrupt=corrupt, zero_byte=zero_byte, small_class=small_class,
                           empty=root / "empty", empty_classes=root / "empty_classes", tokens=tokens,
                           missing_token=missing_token, narrow=narrow, not_tokens=root / "not_tokens.pt",
                           prompts=root / "prompts.csv", comma=root / "comma.csv", no_truck=root / "no_truck.csv",
                           empty_prompt=root / "empty_prompt.csv", fine_tuned=root / "fine-tuned",
                           unwritable=root / "a_file" / "sub")


@pytest.fixture(scope="module")
def server():
    with FakeOpenAI() as fake:
        yield fake


def quick_classifier(data: Path) -> list:
    """train_classifier.py on a FOCUS layout, as small as it gets (seconds on a CPU)."""
    return ["--dataset", "focus", "--data-dir", data, "--seeds", "0", "--examples-per-class", "1",
            "--classifier-backbone", "efficientnet_lite0", "--image-size", "32", "--iterations-per-epoch", "1",
            "--num-epochs", "1", "--batch-size", "8", "--num-workers", "1", "--device", "cpu"]


def with_synthetic(inputs, tokens: Path | None = None, *extra) -> list:
    return [*quick_classifier(inputs.good), "--num-synthetic", "1", "--model-path", "tiny", "--embed-path",
            tokens or inputs.tokens, "--num-inference-steps", "2", *extra]


def quick_filter(data: Path, *extra) -> list:
    return ["--dataset", "focus", "--data-dir", data, "--seeds", "0", "--examples-per-class", "1",
            "--classifier-backbone", "efficientnet_lite0", "--image-size", "32", "--iterations-per-epoch", "1",
            "--max-epochs", "1", "--batch-size", "8", "--temperature-iterations", "1", "--device", "cpu", *extra]


def quick_fine_tune(*extra) -> list:
    return ["--dataset", "custom_coco", "--pretrained_model_name_or_path", "tiny", "--examples-per-class", "1",
            "--seeds", "0", "--classes", "bench", "--max_train_steps", "2", "--train_batch_size", "1",
            "--resolution", "32", "--checkpointing_steps", "0", "--save_steps", "0", *extra]


def prompt_args(server, *extra) -> list:
    return ["--dataset", "custom_coco", "--classes", "bench", "--prompts-per-class", "2", "--model", "fake-chat",
            "--base-url", server.base_url, "--max-retries", "0", *extra]


# one row per bad input: (id, script, arguments built from `inputs` and the fake server, fragments of the error[,
# the reason it is a known gap, expected to fail])
ROWS = [
    # datasets
    ("empty dataset folder", "train_filter.py", lambda i, s: quick_filter(i.empty), ["split folder not found"]),
    ("dataset folder with empty class folders", "train_filter.py", lambda i, s: quick_filter(i.empty_classes),
     ["no images for class 'bird'"]),
    ("missing dataset folder", "train_filter.py", lambda i, s: quick_filter(i.root / "no_such_folder"),
     ["dataset directory does not exist"]),
    ("corrupt JPEG", "train_classifier.py",
     lambda i, s: [*quick_classifier(i.corrupt), "--num-synthetic", "0", "--examples-per-class", WHOLE_POOL],
     ["corrupt image file", "broken.jpg", "--bad-images skip"]),
    ("0-byte image", "train_filter.py", lambda i, s: quick_filter(i.zero_byte, "--examples-per-class", WHOLE_POOL),
     ["empty (0-byte) image file", "empty.jpg"]),
    ("unknown dataset", "aggregate_embeddings.py", lambda i, s: ["--dataset", "pascal"],
     ["argument --dataset: invalid choice: 'pascal'"]),
    ("unknown split", "eval_on_testset.py", lambda i, s: ["--split", "validation", "--model", i.root / "m.pth"],
     ["argument --split: invalid choice: 'validation'"]),
    ("test split folder missing", "train_classifier.py",
     lambda i, s: [*quick_classifier(i.good), "--num-synthetic", "0", "--eval_on_test_set", "test_uncommon"],
     ["--eval_on_test_set test_uncommon_context", "not found"]),
    ("examples per class beyond the training pool", "fine_tune.py",
     lambda i, s: quick_fine_tune("--examples-per-class", "9"),
     ["examples_per_class=9 is larger than the training pool"]),
    ("examples per class beyond a class", "train_filter.py",
     lambda i, s: [*quick_filter(i.small_class), "--examples-per-class", "3"],
     ["examples_per_class=3 but class 'bird' has only 2"]),
    # token files
    ("tokens file missing a class", "train_classifier.py", lambda i, s: with_synthetic(i, i.missing_token),
     ["no token <truck>", "truck"]),
    ("tokens of the wrong width", "train_classifier.py", lambda i, s: with_synthetic(i, i.narrow),
     ["16 wide", "expects 32"]),
    ("tokens file that is not a tensor file", "train_classifier.py", lambda i, s: with_synthetic(i, i.not_tokens),
     ["malformed token file", "not_tokens.pt", "not a torch file"]),
    # prompt CSVs
    ("prompt CSV with ',' delimiters", "train_classifier.py",
     lambda i, s: with_synthetic(i, None, "--use-generated-prompts", "1", "--prompt-path", i.comma),
     ["comma.csv", "','-delimited"]),
    ("prompt CSV missing a class", "train_classifier.py",
     lambda i, s: with_synthetic(i, None, "--use-generated-prompts", "1", "--prompt-path", i.no_truck),
     ["no prompts for class(es) truck"]),
    ("prompt CSV with an empty prompt", "train_classifier.py",
     lambda i, s: with_synthetic(i, None, "--use-generated-prompts", "1", "--prompt-path", i.empty_prompt),
     ["empty prompt", "line 22"]),
    # generation settings
    ("strength out of range", "train_classifier.py", lambda i, s: with_synthetic(i, None, "--strength", "1.5"),
     ["--strength must lie in (0, 1], got 1.5"]),
    ("guidance scale out of range", "train_classifier.py",
     lambda i, s: with_synthetic(i, None, "--guidance-scale", "0.5"), ["--guidance-scale must be at least 1"]),
    ("guidance scale out of range (test_image_generation.py)", "test_image_generation.py",
     lambda i, s: ["--model-path", "tiny", "--guidance-scale", "0.5"],
     ["--guidance-scale must be at least 1, got 0.5"]),
    # models
    ("model path that does not exist", "fine_tune.py",
     lambda i, s: quick_fine_tune("--pretrained_model_name_or_path", i.root / "no_such_model"),
     ["model path does not exist"]),
    ("model path that does not exist (train_classifier.py)", "train_classifier.py",
     lambda i, s: [*with_synthetic(i), "--model-path", i.root / "no_such_model"], ["model path does not exist"]),
    # unwritable output folders: a path below a regular file fails for root too
    ("unwritable output folder (aggregate_embeddings.py)", "aggregate_embeddings.py",
     lambda i, s: ["--dataset", "custom_coco", "--seeds", "0", "--examples-per-class", "2", "--input-path",
                   i.fine_tuned, "--output-dir", i.unwritable], ["a_file/sub"]),
    ("unwritable output folder (generate_prompts.py)", "generate_prompts.py",
     lambda i, s: prompt_args(s, "--outdir", i.unwritable), ["a_file/sub"]),
    ("unwritable output folder (train_classifier.py)", "train_classifier.py",
     lambda i, s: [*quick_classifier(i.good), "--num-synthetic", "0", "--logdir", i.unwritable / "logs"],
     ["a_file/sub"]),
    ("unwritable output folder (train_filter.py)", "train_filter.py",
     lambda i, s: quick_filter(i.good, "--models-root", i.unwritable), ["a_file/sub"]),
]


def as_param(name: str, script: str, arguments, fragments: list[str]):
    return pytest.param(script, arguments, fragments, id=name)


@pytest.mark.parametrize("script, arguments, fragments", [as_param(*row) for row in ROWS])
def test_bad_input_is_a_one_line_error(script, arguments, fragments, inputs, server, tmp_path, tiny_model_path):
    result = run(script, *arguments(inputs, server), cwd=tmp_path)
    assert_one_line_error(result, *fragments)
    assert temporaries(tmp_path) == [] and temporaries(inputs.root) == []


def test_bad_images_skip_leaves_a_corrupt_file_out_with_a_warning(inputs, tmp_path):
    result = run("train_filter.py", *quick_filter(inputs.corrupt, "--examples-per-class", WHOLE_POOL, "--bad-images",
                                                  "skip"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "skipping corrupt image file" in result.stderr and "broken.jpg" in result.stderr
    key = dataset_key("focus", inputs.corrupt)  # data other than $FOCUS_DIR: the names carry its fingerprint
    assert (tmp_path / "models" / f"filter_{key}_0_{WHOLE_POOL}.pth").is_file()


@pytest.fixture(scope="module")
def unwritable_fine_tune(inputs, tmp_path_factory) -> subprocess.CompletedProcess:
    """fine_tune.py with an --output_dir that cannot be created."""
    return run("fine_tune.py", *quick_fine_tune("--output_dir", inputs.unwritable),
               cwd=tmp_path_factory.mktemp("unwritable_fine_tune"))


def test_unwritable_output_folder_of_fine_tune_is_a_one_line_error(unwritable_fine_tune):
    assert_one_line_error(unwritable_fine_tune, "cannot create output directory", "a_file/sub")


def test_unwritable_output_folder_of_fine_tune_fails_before_training(unwritable_fine_tune):
    assert TI_PROGRESS not in unwritable_fine_tune.stderr


def test_unwritable_output_folder_of_fine_tune_error_is_the_last_line(unwritable_fine_tune):
    assert unwritable_fine_tune.stderr.rstrip().splitlines()[-1].startswith("error: cannot create output directory")


# ----------------------------------------------------------------------------------------------------------
# the language model API


def test_api_failing_three_times_gives_up_keeps_finished_classes_and_hides_the_key(tmp_path):
    classes = ("bench", "bicycle", "book")
    with FakeOpenAI(behaviour={"book": "error500"}) as failing:
        result = run("generate_prompts.py", "--dataset", "custom_coco", "--classes", *classes, "--prompts-per-class",
                     "2", "--model", "fake-chat", "--base-url", failing.base_url, "--max-retries", "2", cwd=tmp_path)
        line = assert_one_line_error(result, "HTTP 500 after 2 retries", "Bearer ***")
        assert failing.requests_for("book") == 3, "one request and two retries"
        assert all(authorization == f"Bearer {TEST_API_KEY}" for _, authorization in failing.requests)
    assert list(read_prompt_csv(tmp_path / "prompts" / "prompts.csv")) == ["bench", "bicycle"], line
    assert TEST_API_KEY not in (tmp_path / "prompts" / "prompts.csv").read_text()


def test_api_key_never_appears_in_output_files_or_logs(tmp_path, server):
    result = run("generate_prompts.py", *prompt_args(server), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert server.requests and server.requests[-1][1] == f"Bearer {TEST_API_KEY}"  # the key was really used
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert TEST_API_KEY not in path.read_text(errors="replace"), path
    assert TEST_API_KEY not in result.stdout + result.stderr


HELP_DRIVER = """
import runpy, sys
for script in sys.argv[1:]:
    sys.argv = [script, "--help"]
    print(f"=== {script}", flush=True)
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as stop:
        assert stop.code in (0, None), (script, stop.code)
"""


def test_help_of_every_script_never_shows_the_api_key(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OPENAI_API_KEY=TEST_API_KEY, api_key=TEST_API_KEY)
    (tmp_path / ".env").write_text(f"OPENAI_API_KEY={TEST_API_KEY}\n")
    result = subprocess.run([sys.executable, "-c", HELP_DRIVER, *(str(REPO_ROOT / s) for s in SCRIPTS)], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("usage: ") == len(SCRIPTS)
    assert TEST_API_KEY not in result.stdout + result.stderr


# ----------------------------------------------------------------------------------------------------------
# Textual Inversion: non-finite losses and low precision on a CPU


@pytest.fixture(scope="module")
def nan_unet(tmp_path_factory, tiny_model_path) -> Path:
    """A UNet state dict of the tiny SD whose output layer is NaN: every loss is NaN, as after an fp16 overflow."""
    from semantic_aug.core.stable_diffusion import load_sd_components

    unet = load_sd_components(tiny_model_path)[3]
    state = {name: value.clone() for name, value in unet.state_dict().items()}
    state["conv_out.weight"].fill_(float("nan"))
    path = tmp_path_factory.mktemp("nan_unet") / "unet.pt"
    torch.save(state, path)
    return path


def test_textual_inversion_stops_on_nan_losses_and_saves_no_nan_token(nan_unet, tmp_path):
    result = run("fine_tune.py", *quick_fine_tune("--unet-ckpt", nan_unet, "--output_dir", "out"), cwd=tmp_path)
    saved = tmp_path / "out" / "fine-tuned" / "custom_coco-0-1" / "bench" / LEARNED_EMBEDS_NAME
    assert not saved.exists() or torch.isfinite(torch.load(saved, weights_only=True)["<bench>"]).all()
    line = assert_one_line_error(result)
    assert re.search(r"nan|non-finite|not finite", line, re.IGNORECASE), line


def test_fp16_textual_inversion_on_a_cpu_is_refused_in_one_line(tmp_path):
    arguments = quick_fine_tune("--mixed_precision", "fp16", "--device", "cpu", "--output_dir", "out")
    result = run("fine_tune.py", *arguments, cwd=tmp_path)
    assert_one_line_error(result, "fp16")


# ----------------------------------------------------------------------------------------------------------
# a full disk


def limit_file_size() -> None:
    """In the child: writes beyond FULL_DISK_BYTES fail with EFBIG, as a full disk fails them with ENOSPC."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # deliver EFBIG instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (FULL_DISK_BYTES, FULL_DISK_BYTES))


def test_a_full_disk_is_a_one_line_error_and_leaves_no_partial_file(inputs, tmp_path):
    result = run("train_classifier.py", *quick_classifier(inputs.good), "--num-synthetic", "0", cwd=tmp_path,
                 preexec_fn=limit_file_size)
    assert_one_line_error(result, f"classifier_{dataset_key('focus', inputs.good)}_0_1.pth", "File too large")
    assert temporaries(tmp_path) == []
    assert not list(tmp_path.rglob("*.pth")), "a partial checkpoint was left behind"
    written = list(tmp_path.rglob("*.csv"))
    assert written and all(len(pd.read_csv(path)) for path in written)  # what was written is complete


def test_setup_on_a_disk_too_small_stops_before_pip_with_one_error_line(tmp_path):
    """`make setup` where the venv's disk has less free space than the set-up needs: one `error:` line naming the
    space needed, the space free and the `VENV=` way out, and no venv begun (pip would fail half-way instead)."""
    venv = tmp_path / "not" / "yet" / "venv"
    process = subprocess.run(["make", "--no-print-directory", "setup", f"VENV={venv}", "SETUP_MIN_FREE_GB=1000000"],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert process.returncode != 0
    errors = [line for line in process.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, process.stderr
    assert "needs about 1000000 GB of free disk" in errors[0] and f"{tmp_path} has " in errors[0]
    assert "make VENV=" in errors[0] and "Traceback" not in process.stderr
    assert not (tmp_path / "not").exists()

"""Shared fixtures: an isolated model cache, the tiny SD path, and a runner for the top-level scripts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DIAGEN_CACHE", str(REPO_ROOT / ".cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread, here and in every script the tests start: the models are tiny, and on a small shared CPU
# OpenMP threads that spin-wait for each other make them 10-30x slower (one thread is as fast on an idle machine).
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    """Folder of the embedded tiny Stable Diffusion (built once per cache)."""
    from semantic_aug.core.stable_diffusion import resolve_model_path

    return resolve_model_path("tiny")


def run_script(script: str, *args: str, cwd: Path | str | None = None, env: dict | None = None,
               timeout: float = 600, check: bool = False) -> subprocess.CompletedProcess:
    """Run a top-level script (`fine_tune.py`, ...) in a subprocess with this interpreter; returns the result."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    result = subprocess.run([sys.executable, str(REPO_ROOT / script), *map(str, args)], cwd=cwd or REPO_ROOT,
                            env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def script_runner():
    return run_script


def accelerate_launch(num_processes: int = 2) -> list[str]:
    """`accelerate launch` on the CPU with `num_processes` processes, on a free port of its own: tests that run at
    the same time (pytest-xdist workers) must not meet on torch.distributed's default port."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no",
            "--dynamo_backend", "no"]


def import_script(name: str):
    """Import a top-level script (`fine_tune`, ...) as a module, to call its `parse_args`/`main` in-process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO_ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def script_module():
    return import_script


def write_class_folders(root: Path, class_names, counts=(("train-val", 9), ("test", 1)), seed: int = 0) -> Path:
    """A folder-per-class dataset of small random 32x24 JPEGs: `root/{split}/{class}/{i}.jpg`, `count` per class and
    split (the default: 8 training-pool images and 1 validation image per class, and 1 test image)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in counts:
        for name in class_names:
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(root / split / name / f"{i}.jpg")
    return root

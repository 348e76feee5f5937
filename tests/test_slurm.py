"""The runner's Slurm executor on a real single-node Slurm cluster (started by the test from Debian's `slurm-wlm` and
`munge`; skipped where they are missing).

The grid is a reduced copy of experiments/demo.yaml, written by the test so the three runs fit a CI budget on 2
cores (about 4 minutes): seed 0 with 1 and 2 examples per class, the methods baseline and DIAGen (noise, prompts
from a written CSV, filter), 4 Textual Inversion steps, 1 synthetic image per real one at 4 denoising steps, and
1 epoch of 2 iterations for the filter and the classifiers. It runs once with `--executor local` and once with
`--executor slurm` (each job asks for 1 CPU of the node's 2); the two must leave identical tokens, filters,
classifier checkpoints and result tables. Then one classifier run is removed, the grid resubmitted, its Slurm job
cancelled with scancel as soon as it starts, and the resubmission must finish it with the same result.
"""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from semantic_aug.datasets.custom_coco import CUSTOM_COCO_CLASSES
from semantic_aug.stages.prompts import write_prompt_csv
from slurm_cluster import SlurmCluster, missing_reason

pytestmark = [pytest.mark.slow, pytest.mark.slurm,
              pytest.mark.skipif(missing_reason() is not None, reason=f"no Slurm: {missing_reason()}")]

RUN_SECONDS = 900  # the longest a runner may take here before the test fails (a grid takes about a minute)
START_LINE = re.compile(r"^=== .* on Slurm job (\S+) on ", re.MULTILINE)
COMPARED = ("*.csv", "*.pt", "*.pth", "*.png")  # every result, token, model and image file


def write_grid(folder: Path, repo_root: Path) -> Path:
    config = yaml.safe_load((repo_root / "experiments/demo.yaml").read_text())
    config.update(seeds=[0], examples_per_class=[1, 2], report=False, prompts={"path": "prompts.csv"})
    config["fine_tune"]["max_train_steps"] = 4
    config["filter"].update({"iterations-per-epoch": 2, "max-epochs": 1})
    config["train_classifier"].update({"num-inference-steps": 4, "num-synthetic": 1, "iterations-per-epoch": 2,
                                       "num-epochs": 1})
    config["methods"] = {name: config["methods"][name] for name in ("baseline", "diagen")}
    folder.mkdir(parents=True)
    write_prompt_csv({name: ["a photo of a {name}"] for name in CUSTOM_COCO_CLASSES}, folder / "prompts.csv")
    path = folder / "grid.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def runner(folder: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "semantic_aug.runner", "--config", str(folder / "grid.yaml"), "--gpus", "none",
            *extra]


SLURM_FLAGS = ("--executor", "slurm", "--slurm-gpus-per-job", "0", "--slurm-cpus-per-job", "1",
               "--slurm-poll-seconds", "1", "--max-retries", "1")


def outputs(folder: Path) -> dict[str, bytes]:
    files = {}
    for pattern in COMPARED:
        for path in folder.rglob(pattern):
            relative = path.relative_to(folder)
            if relative.parts[0] in ("RESULTS", "tokens", "models") and "slurm" not in relative.parts:
                files[str(relative)] = path.read_bytes()
    return files


def test_slurm_grid_equals_local_and_survives_scancel(tmp_path, repo_root):
    env = dict(os.environ, PYTHONPATH=str(repo_root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    local, on_slurm = tmp_path / "local", tmp_path / "slurm"
    write_grid(local, repo_root)
    write_grid(on_slurm, repo_root)
    result = subprocess.run(runner(local), cwd=local, env=env, capture_output=True, text=True,
                            timeout=RUN_SECONDS)
    assert result.returncode == 0, result.stderr
    expected = outputs(local)
    assert len([name for name in expected if name.endswith(".pth")]) == 6  # 2 filters, 4 classifiers

    with SlurmCluster(tmp_path / "cluster") as cluster:
        env = dict(env, SLURM_CONF=cluster.env["SLURM_CONF"])
        result = subprocess.run(runner(on_slurm, *SLURM_FLAGS), cwd=on_slurm, env=env, capture_output=True,
                                text=True, timeout=RUN_SECONDS)
        assert result.returncode == 0, result.stderr
        assert "finished: 10 run, 0 skipped, 0 failed, 0 blocked" in result.stderr
        # same-shape jobs went as arrays (fine-tuning, filters, baselines of both epc), each later job after its
        # prerequisites through Slurm dependencies
        assert re.search(r"submitted: fine_tune custom_coco seed 0 2epc as Slurm job \d+_1\b", result.stderr)
        aggregate = re.search(r"submitted: aggregate_embeddings custom_coco seed 0 1epc as Slurm job \d+ "
                              r"\(after (\d+_0)\)", result.stderr)
        fine_tune_id = re.search(r"fine_tune custom_coco seed 0 1epc as Slurm job (\S+)", result.stderr).group(1)
        assert aggregate and aggregate.group(1) == fine_tune_id
        assert outputs(on_slurm) == expected
        log = on_slurm / "RESULTS/custom_coco_1epc/diagen/logs/train_classifier_custom_coco_0_1.log"
        assert len(START_LINE.findall(log.read_text())) == 1 and "=== exit code 0" in log.read_text()

        # one run again, its Slurm job cancelled as soon as it starts: the runner resubmits it and it finishes
        run = on_slurm / "RESULTS/custom_coco_1epc/diagen"
        for path in [*run.glob("logs/results_*.csv"), *run.glob("test/*.csv"), *run.glob("models/*.pth")]:
            path.unlink()
        process = subprocess.Popen(runner(on_slurm, *SLURM_FLAGS), cwd=on_slurm, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + RUN_SECONDS
            while len(START_LINE.findall(log.read_text())) < 2 and process.poll() is None \
                    and time.monotonic() < deadline:
                time.sleep(0.2)
            cancelled = START_LINE.findall(log.read_text())[-1]
            subprocess.run(["scancel", cancelled], env=env, check=True)
            stdout, stderr = process.communicate(timeout=RUN_SECONDS)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        assert process.returncode == 0, stderr
        assert "10 jobs (9 already done)" in stderr
        assert f"failed: train_classifier diagen custom_coco seed 0 1epc (Slurm job {cancelled}" in stderr
        assert "resubmission 1 of 1" in stderr
        starts = START_LINE.findall(log.read_text())
        assert len(starts) == 3 and starts[1] == cancelled and starts[2] != cancelled
        assert outputs(on_slurm) == expected

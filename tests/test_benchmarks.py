"""The benchmarks are a tidy part: each script runs as `python -m benchmarks.<name>` with the package as installed
(no `sys.path` edits, no PYTHONPATH), and every log in `benchmarks/results/` belongs to a script of the tree and
starts with the commit that recorded it, the GPU, the software versions and the command."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
MODULES = sorted(path for path in BENCHMARKS.glob("*.py") if path.name != "__init__.py")
SCRIPTS = sorted(path.stem for path in MODULES if 'if __name__ == "__main__":' in path.read_text())
LOGS = sorted((BENCHMARKS / "results").glob("*.log"))

# What the `#` lines at the top of a log must say, wherever they say it: `# commit: <sha> ...` (bench_run.py writes
# `# bench_run: commit <sha>, <GPU>, torch ...` on one line), the card, the torch version and the command.
HEADER_FIELDS = {
    "commit": re.compile(r"\bcommit:? ([0-9a-f]{7,40})\b"),
    "GPU": re.compile(r"\b(NVIDIA|H100|H200|A100|L40S|RTX)\b"),
    "versions": re.compile(r"\btorch \d+\.\d+"),
    "command": re.compile(r"^# command: (\S.*)$", re.MULTILINE),
}


def header_of(log: Path) -> str:
    lines = log.read_text().splitlines()
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line)
    return "\n".join(header)


def test_the_benchmarks_are_found():
    assert {"bench_generation", "bench_attention", "bench_classifier", "bench_group_norm", "bench_textual_inversion",
            "check_fused_kernels", "profile_generation"} <= set(SCRIPTS)
    assert "cuda_timing" not in SCRIPTS  # a shared helper, no CLI
    assert LOGS, "benchmarks/results holds no log"


@pytest.mark.parametrize("module", MODULES, ids=lambda path: path.name)
def test_no_sys_path_edits(module):
    """Scripts import the package as installed; a `sys.path` edit would hide a broken install or layout."""
    assert "sys.path" not in module.read_text(), f"{module.name} edits sys.path"


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_runs_as_a_module(name):
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--help"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage:"), result.stdout[:200]


@pytest.mark.parametrize("log", LOGS, ids=lambda path: path.name)
def test_log_header(log):
    header = header_of(log)
    for field, pattern in HEADER_FIELDS.items():
        assert pattern.search(header), f"{log.name}: its leading # lines give no {field}:\n{header}"
    command = HEADER_FIELDS["command"].search(header).group(1)
    script = log.name.split(".")[0]  # `<script>.log`, or `<script>.<model>.log` for another model family's run
    assert script in command, f"{log.name}: the command does not run {script}: {command}"
    # logs are named after a benchmark of the tree: logs of removed code have no script here
    assert script in SCRIPTS, f"{log.name} belongs to no script in benchmarks/"


@pytest.mark.parametrize("log", LOGS, ids=lambda path: path.name)
def test_log_commit_is_in_the_history(log):
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    sha = HEADER_FIELDS["commit"].search(header_of(log)).group(1)
    result = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{sha}^{{commit}}"], capture_output=True)
    assert result.returncode == 0, f"{log.name}: commit {sha} is not in this repository's history"


def test_bench_generation_runs_on_the_tiny_sdxl_on_the_cpu():
    """The benchmark's SDXL path: the stock SDXL img2img pipeline one image per call, the stock pipeline with a
    compiled UNet at our batch size, then ours, with tokens in both text encoders (speeds meaningless here)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-m", "benchmarks.bench_generation", "--model", "tiny-sdxl", "--device",
                             "cpu", "--dtype", "fp32", "--ref-images", "1", "--batch-size", "2", "--timed-batches", "1",
                             "--num-synthetic", "1", "--num-inference-steps", "4", "--configs", "eager:auto",
                             "--stock-compile"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "reference pattern (1 image/call, float32, eager)" in result.stdout
    assert "stock pipeline (2 images/call, bf16, torch.compile default)" in result.stdout
    assert "config eager:auto" in result.stdout and "speed-up" in result.stdout
    assert re.search(r"stock diffusers \+ torch.compile [\d.]+ img/s; ours [\d.]+x that", result.stdout), result.stdout


def test_random_sdxl_has_sdxl_base_sizes():
    """`build_random_sdxl` (built on the meta device: shapes only) has SDXL base's parameter counts."""
    from semantic_aug.core.stable_diffusion import build_random_sdxl

    _, _, text_encoder, text_encoder_2, vae, unet, _ = build_random_sdxl("meta")
    millions = [round(sum(p.numel() for p in model.parameters()) / 1e6) for model in (unet, text_encoder_2)]
    assert millions == [2567, 695]  # SDXL base: UNet 2.567 B, OpenCLIP bigG text encoder with projection 695 M
    assert unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1) == 1024


def test_bench_textual_inversion_runs_on_the_tiny_sdxl_on_the_cpu(tmp_path):
    """The Textual Inversion benchmark's SDXL path: the reference pattern with the token in both text encoders and
    SDXL's added conditioning, then `fine_tune.py`'s trainer; the JSON names the family (speeds meaningless here)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    figures = tmp_path / "ti.json"
    result = subprocess.run([sys.executable, "-m", "benchmarks.bench_textual_inversion", "--model", "tiny-sdxl",
                             "--device", "cpu", "--steps", "1", "--warmup", "1", "--classes", "1", "--variants",
                             "reference,fast", "--json", str(figures)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(figures.read_text())
    assert report["family"] == "sdxl" and report["prediction_type"] == "epsilon"
    rates = {entry["variant"]: entry["samples_per_second"] for entry in report["results"]}
    assert set(rates) == {"reference", "fast"} and all(rate > 0 for rate in rates.values()), rates
    assert "family: sdxl; 2 text encoder(s)" in result.stdout


def test_bench_textual_inversion_rejects_an_unknown_variant():
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-m", "benchmarks.bench_textual_inversion", "--variants",
                             "reference,fastest"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "unknown --variants fastest" in result.stderr, result.stderr[-500:]


def test_random_sd2_has_sd21_sizes():
    """`build_random_sd2` (built on the meta device: shapes only) has SD 2.1's parameter counts, native size,
    v-prediction and OpenCLIP traits."""
    from semantic_aug.core.stable_diffusion import build_random_sd2

    tokenizer, text_encoder, vae, unet, scheduler = build_random_sd2("meta")
    millions = [round(sum(p.numel() for p in model.parameters()) / 1e6) for model in (unet, text_encoder)]
    assert millions == [866, 340]  # SD 2.1: UNet 865.9 M, OpenCLIP ViT-H/14 text encoder 340.4 M
    assert scheduler.config.prediction_type == "v_prediction"
    assert unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1) == 768
    assert text_encoder.config.hidden_act == "gelu" and tokenizer.pad_token == "!"

"""The experiment runner: the command grid of --dry-run, skipping finished runs, and the job scheduler."""

import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from semantic_aug.datasets.custom_coco import CUSTOM_COCO_CLASSES
from semantic_aug.runner import experiments
from semantic_aug.runner.experiments import Job, Scheduler, flag_arguments, load_config, plan_jobs
from semantic_aug.runner.executors import worker_slots
from semantic_aug.runner.grid_cost import STAGE_RATES, STAGES, grid_cost, simulate_wall_time
from semantic_aug.stages.prompts import write_prompt_csv
from semantic_aug.core.utils import UserError

SEEDS, EXAMPLES = (0, 1), (2, 4)

CONFIG = {
    "dataset": "custom_coco",
    "model_path": "tiny",
    "results_dir": "RESULTS",
    "seeds": list(SEEDS),
    "examples_per_class": list(EXAMPLES),
    "eval_splits": ["test"],
    "fine_tune": {"max_train_steps": 20, "scale_lr": True},
    "aggregate_embeddings": {"std-deviation": [0.005, 0.01, 0.025]},
    "prompts": {"path": "prompts/custom_coco_test.csv"},
    "filter": {"classifier-backbone": "efficientnet_lite0"},
    "train_classifier": {"classifier-backbone": "efficientnet_lite0", "num-synthetic": 2, "strength": 0.7,
                         "guidance-scale": 15},
    "methods": {
        "baseline": {"num-synthetic": 0},
        "da_fusion": {"aug": "textual-inversion"},
        "diagen": {"aug": "textual-inversion", "use-embedding-noise": 1, "use-generated-prompts": 1,
                   "synthetic_filter": "use"},
    },
}


def write_config(folder: Path, **changes) -> Path:
    config = {**CONFIG, **changes}
    path = folder / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    prompts = folder / CONFIG["prompts"]["path"]
    prompts.parent.mkdir(parents=True, exist_ok=True)
    prompts.write_text("class_name;class_idx;prompt\nbench;1;a photo of a {name}\n")
    return path


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("done\n")


def dry_run(module_runner, folder: Path, *extra: str) -> list[str]:
    result = module_runner("-m", "semantic_aug.runner", "--config", folder / "experiment.yaml", "--dry-run",
                           "--gpus", "none", *extra, cwd=folder, check=True)
    return result.stdout.splitlines()


@pytest.fixture(scope="module")
def module_runner(repo_root):
    """Runs `python -m ...` in a folder (conftest's runner runs script files)."""
    import os
    import subprocess

    def run(*args, cwd, check=False):
        # one OpenMP thread: test runs share the CPU, and oversubscribed OpenMP threads stall each other
        env = dict(os.environ, PYTHONPATH=str(repo_root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   OMP_NUM_THREADS="1")
        result = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                                timeout=300)
        if check and result.returncode != 0:
            raise AssertionError(f"failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    return run


def test_dry_run_prints_the_grid_and_skips_finished_runs(tmp_path, module_runner):
    write_config(tmp_path)
    # seed 0 / 2 epc: tokens aggregated (so no fine-tuning), the baseline finished, DA-Fusion half done (no test CSV)
    touch(tmp_path / "tokens/custom_coco-tokens/custom_coco-0-2.pt")
    touch(tmp_path / "tokens/custom_coco-tokens/noise/custom_coco-0-2.pt")
    touch(tmp_path / "RESULTS/custom_coco_2epc/baseline/logs/results_custom_coco_0_2.csv")
    touch(tmp_path / "RESULTS/custom_coco_2epc/baseline/test/test_results_custom_coco_0_2.csv")
    touch(tmp_path / "RESULTS/custom_coco_2epc/da_fusion/logs/results_custom_coco_0_2.csv")

    lines = dry_run(module_runner, tmp_path)
    jobs = [line for line in lines if line.startswith("[")]
    per_run = 1 + 1 + 1 + 3  # fine_tune, aggregate_embeddings, train_filter, three methods
    assert len(jobs) == per_run * len(SEEDS) * len(EXAMPLES)
    assert lines[-1] == "# 24 jobs: 21 to run, 3 already done (skipped); would run on the CPU (one job at a time)"

    skipped = [line for line in jobs if line.startswith("[skip]")]
    assert len(skipped) == 3
    assert all("--seeds 0 --examples-per-class 2" in line for line in skipped)
    assert any("fine_tune.py" in line for line in skipped)
    assert any("aggregate_embeddings.py" in line for line in skipped)
    assert any("train_classifier.py" in line and "--method baseline" in line for line in skipped)
    assert not any("--method da_fusion" in line for line in skipped)  # its test CSV is missing

    # every (method, seed, epc) appears exactly once, with the grid's flags and the runner's paths
    for seed in SEEDS:
        for epc in EXAMPLES:
            for method in CONFIG["methods"]:
                matches = [line for line in jobs if "train_classifier.py" in line and f"--method {method} " in line
                           and f"--seeds {seed} --examples-per-class {epc} " in line]
                assert len(matches) == 1, (method, seed, epc)
                assert f"--logdir RESULTS/custom_coco_{epc}epc/{method}/logs" in matches[0]
                assert f"--synthetic-dir RESULTS/custom_coco_{epc}epc/{method}/synthetics_seed_{seed}" in matches[0]
                assert "--eval_on_test_set test" in matches[0] and "--model-path tiny" in matches[0]
    diagen = next(line for line in jobs if "--method diagen " in line)
    for flag in ("--use-embedding-noise 1", "--use-generated-prompts 1", "--synthetic_filter use",
                 "--prompt-path prompts/custom_coco_test.csv", "--models-root models", "--num-synthetic 2"):
        assert flag in diagen
    baseline = next(line for line in jobs if "--method baseline " in line)
    assert "--num-synthetic 0" in baseline and "--prompt-path" not in baseline
    fine_tune = next(line for line in jobs if "fine_tune.py" in line)
    assert "--pretrained_model_name_or_path tiny" in fine_tune and "--scale_lr" in fine_tune
    aggregate = [line for line in jobs if "aggregate_embeddings.py" in line]
    assert len(aggregate) == len(SEEDS) * len(EXAMPLES) and all("--augment-embeddings True" in line for line in aggregate)


def run_main(folder: Path, monkeypatch, *args: str) -> None:
    """The runner's command line, in this process (saves the imports' seconds of a subprocess)."""
    monkeypatch.chdir(folder)
    monkeypatch.setattr(sys, "argv", ["experiments", "--config", str(folder / "experiment.yaml"), *args])
    experiments.main(experiments.parse_args())


def test_dry_run_narrowed_to_a_method_plans_only_its_prerequisites(tmp_path, monkeypatch, capsys):
    write_config(tmp_path)
    run_main(tmp_path, monkeypatch, "--dry-run", "--gpus", "none", "--methods", "baseline", "--seeds", "1")
    jobs = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert len(jobs) == len(EXAMPLES)  # the baseline needs no tokens, prompts or filter
    assert all("train_classifier.py" in line and "--seeds 1 " in line for line in jobs)

    run_main(tmp_path, monkeypatch, "--dry-run", "--gpus", "none", "--methods", "da_fusion", "--seeds", "1")
    jobs = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert len(jobs) == 3 * len(EXAMPLES)  # fine_tune, aggregate_embeddings (no noise: plain tokens only), run
    assert sum("--augment-embeddings False" in line for line in jobs) == len(EXAMPLES)
    assert not any("train_filter.py" in line or "--prompt-path" in line for line in jobs)


def test_config_errors(tmp_path, monkeypatch, module_runner):
    write_config(tmp_path, methods={"bad": {"logdir": "somewhere"}})
    result = module_runner("-m", "semantic_aug.runner", "--config", tmp_path / "experiment.yaml", "--dry-run",
                           cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error: logdir in the train_classifier flags")
    assert "Traceback" not in result.stderr

    write_config(tmp_path, eval_splits=["test_uncommon_context"])  # the shipped Custom COCO copy lacks this split
    with pytest.raises(UserError, match="eval split 'test_uncommon_context' needs .* set data_dir"):
        run_main(tmp_path, monkeypatch, "--dry-run")
    write_config(tmp_path, eval_splits=["val"])
    with pytest.raises(UserError, match="eval_splits takes test and test_uncommon_context"):
        run_main(tmp_path, monkeypatch, "--dry-run")
    monkeypatch.delenv("FOCUS_DIR", raising=False)
    write_config(tmp_path, dataset="focus")
    with pytest.raises(UserError, match="focus needs its data folder"):
        run_main(tmp_path, monkeypatch, "--dry-run")

    (tmp_path / "experiment.yaml").write_text("dataset: custom_coco\nmethod: {}\n")
    with pytest.raises(UserError, match="unknown key"):
        load_config(tmp_path / "experiment.yaml")


def test_flag_arguments():
    assert flag_arguments({"scale_lr": True, "center_crop": False, "revision": None, "strength": 0.7,
                           "std-deviation": [0.005, 0.01], "use-embedding-noise": 1}) == [
        "--scale_lr", "--strength", "0.7", "--std-deviation", "0.005", "0.01", "--use-embedding-noise", "1"]


def test_plan_requires_prompts_for_llm_methods(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(write_config(tmp_path))
    (tmp_path / CONFIG["prompts"]["path"]).unlink()
    with pytest.raises(UserError, match="prompt file .* not found"):
        plan_jobs(config)
    config["prompts"]["generate"] = {"model": "smollm2", "prompts-per-class": 2}
    jobs = plan_jobs(config, ["diagen"])
    assert jobs[0].script == "generate_prompts.py" and not jobs[0].done()
    assert all(jobs[0].name in job.needs for job in jobs if job.script == "train_classifier.py")

    # a CSV that a killed generate_prompts.py left with some classes only is not done; one with all classes is
    prompts = tmp_path / CONFIG["prompts"]["path"]
    write_prompt_csv({"bench": ["a photo of a {name}"]}, prompts)
    assert not jobs[0].done()
    write_prompt_csv({name: ["a photo of a {name}"] for name in CUSTOM_COCO_CLASSES}, prompts)
    assert jobs[0].done()


def script(folder: Path, name: str, body: str) -> str:
    path = folder / name
    path.write_text(textwrap.dedent(body))
    return str(path)  # absolute: Job runs it as it is


def test_scheduler_order_failures_logs_and_gpus(tmp_path):
    write = script(tmp_path, "write.py", """
        import os, sys, time
        from pathlib import Path
        for needed in sys.argv[2:]:
            assert Path(needed).exists(), f"ran before {needed}"
        time.sleep(0.3)
        Path(sys.argv[1]).write_text(os.environ.get("CUDA_VISIBLE_DEVICES", "none"))
        print("wrote", sys.argv[1])
    """)
    fail = script(tmp_path, "fail.py", "import sys\nprint('something broke')\nsys.exit(3)\n")
    out, logs = tmp_path / "out", tmp_path / "logs"
    out.mkdir()
    (out / "e").write_text("earlier run")
    jobs = [
        Job("a", write, [str(out / "a")], [out / "a"], logs / "a.log"),
        Job("b", write, [str(out / "b"), str(out / "a")], [out / "b"], logs / "b.log", needs=["a"]),
        Job("c", fail, [], [out / "c"], logs / "c.log"),
        Job("d", write, [str(out / "d")], [out / "d"], logs / "d.log", needs=["c"]),
        Job("e", fail, [], [out / "e"], logs / "e.log"),
        Job("f", write, [str(out / "f")], [out / "f"], logs / "f.log"),
    ]
    status = Scheduler(jobs, ["7", "8"]).run()
    assert status == {"a": "done", "b": "done", "c": "failed", "d": "blocked", "e": "skipped", "f": "done"}
    assert not (out / "d").exists() and (out / "e").read_text() == "earlier run"
    assert {(out / name).read_text() for name in "abf"} <= {"7", "8"}  # each job on one of the GPUs
    assert "wrote" in (logs / "a.log").read_text() and "something broke" in (logs / "c.log").read_text()
    assert "exit code 3" in (logs / "c.log").read_text()
    assert not (logs / "e.log").exists()  # skipped jobs do not run

    # a rerun retries only what is not done
    (tmp_path / "fail.py").write_text(Path(write).read_text())
    jobs[2].arguments = [str(out / "c")]
    status = Scheduler(jobs, [None]).run()
    assert status == {"a": "skipped", "b": "skipped", "c": "done", "d": "done", "e": "skipped", "f": "skipped"}
    assert (out / "d").read_text() == "none"
    assert (logs / "c.log").read_text().count("===") == 4  # two attempts appended, each with a start and an end line


def test_a_real_grid_runs_logs_reports_and_resumes(tmp_path, module_runner):
    """The runner driving the real train_classifier.py (baseline, tiny settings), then the report."""
    write_config(tmp_path, seeds=[0], examples_per_class=[1], methods={"baseline": {"num-synthetic": 0}},
                 train_classifier={"classifier-backbone": "efficientnet_lite0", "image-size": 32,
                                   "iterations-per-epoch": 2, "num-epochs": 1, "batch-size": 8})
    cpu_only = ("--gpus", "none")
    result = module_runner("-m", "semantic_aug.runner", "--config", tmp_path / "experiment.yaml", *cpu_only,
                           cwd=tmp_path, check=True)
    run = tmp_path / "RESULTS/custom_coco_1epc/baseline"
    assert (run / "logs/results_custom_coco_0_1.csv").is_file() and (run / "test/test_results_custom_coco_0_1.csv").is_file()
    log = run / "logs/train_classifier_custom_coco_0_1.log"
    assert "=== exit code 0" in log.read_text()
    assert "table: RESULTS/report.md" in result.stdout and "plot: RESULTS/plots/accuracy_vs_epc_custom_coco_test.png" \
        in result.stdout
    assert (tmp_path / "RESULTS/report.md").is_file()

    # a rerun finds the run done: nothing is started, the log is not appended to
    before = log.read_text()
    result = module_runner("-m", "semantic_aug.runner", "--config", tmp_path / "experiment.yaml", *cpu_only,
                           "--no-report", cwd=tmp_path, check=True)
    assert "1 jobs (1 already done)" in result.stderr and log.read_text() == before


def test_jobs_per_gpu_packs_jobs_on_one_gpu_and_failed_jobs_are_retried(tmp_path):
    """Two jobs on one (fake) GPU with --jobs-per-gpu 2 run at the same time: each waits for the other to start."""
    meet = script(tmp_path, "meet.py", """
        import os, sys, time
        from pathlib import Path
        mine, other = Path(sys.argv[1] + ".started"), Path(sys.argv[2] + ".started")
        mine.write_text("")
        for _ in range(600):  # at most a minute: a lone job gives up and fails
            if other.exists():
                break
            time.sleep(0.1)
        Path(sys.argv[1]).write_text(os.environ["CUDA_VISIBLE_DEVICES"] if other.exists() else "alone")
    """)
    out, logs = tmp_path / "out", tmp_path / "logs"
    out.mkdir()
    jobs = [Job("a", meet, [str(out / "a"), str(out / "b")], [out / "a"], logs / "a.log"),
            Job("b", meet, [str(out / "b"), str(out / "a")], [out / "b"], logs / "b.log")]
    assert worker_slots(["3"], 2) == ["3", "3"] and worker_slots([], 4) == [None]
    status = Scheduler(jobs, worker_slots(["3"], 2)).run()
    assert status == {"a": "done", "b": "done"}
    assert (out / "a").read_text() == (out / "b").read_text() == "3"

    # a job that fails once and then succeeds is done with one retry (and failed without one)
    flaky = script(tmp_path, "flaky.py", """
        import sys
        from pathlib import Path
        tries = Path(sys.argv[1] + ".tries")
        tries.write_text(tries.read_text() + "x" if tries.exists() else "x")
        if len(tries.read_text()) < 2:
            sys.exit(1)
        Path(sys.argv[1]).write_text("ok")
    """)
    assert Scheduler([Job("f", flaky, [str(out / "f")], [out / "f"], logs / "f.log")], [None]).run() == {"f": "failed"}
    (out / "f.tries").unlink()
    status = Scheduler([Job("f", flaky, [str(out / "f")], [out / "f"], logs / "f.log")], [None], max_retries=1).run()
    assert status == {"f": "done"} and (logs / "f.log").read_text().count("=== exit code") == 3


def test_dry_run_cost_table_follows_the_measured_rates(tmp_path, monkeypatch, capsys):
    write_config(tmp_path, fine_tune={"max_train_steps": 100, "train_batch_size": 4},
                 train_classifier={"classifier-backbone": "efficientnet_lite0", "num-synthetic": 2,
                                   "iterations-per-epoch": 10, "num-epochs": 3, "batch-size": 16,
                                   "compile-generation": True})
    run_main(tmp_path, monkeypatch, "--dry-run", "--gpus", "0,1", "--seeds", "0", "--examples-per-class", "2")
    out = capsys.readouterr().out.splitlines()
    rows = {line[2:20].strip(): line[20:].split() for line in out if line.startswith("# ") and line[2:20].strip()
            in STAGES}
    classes = len(CUSTOM_COCO_CLASSES)
    assert rows["Textual Inversion"][:4] == ["1", "100", "0", "0"]
    assert rows["generation"][:3] == ["2", "0", str(2 * 2 * 2 * classes)]  # da_fusion, diagen: 2 per real image
    assert rows["classifier"][:4] == ["3", "0", "0", str(3 * 30)]
    # the estimate: Textual Inversion set-up + samples at the measured rate, as the table in grid_cost says
    config = load_config(tmp_path / "experiment.yaml")
    config.update(seeds=[0], examples_per_class=[2])
    cost = grid_cost(plan_jobs(config), config)
    seconds = STAGE_RATES["textual_inversion_setup_s"] + 100 * 4 * classes / STAGE_RATES["textual_inversion_samples_per_s"]
    assert cost.job_seconds["fine_tune custom_coco seed 0 2epc"] == pytest.approx(seconds)
    # the first generating run compiles; the second loads the compiled code from the cache
    generation = 2 * 2 * classes / STAGE_RATES["generation_images_per_s"]
    assert cost.stages["generation"].seconds == pytest.approx(
        2 * generation + STAGE_RATES["generation_compile_s"] + STAGE_RATES["generation_cached_compile_s"])
    assert any(line.startswith("# estimated wall time on 2 GPU(s):") for line in out)

    run_main(tmp_path, monkeypatch, "--dry-run", "--gpus", "none", "--seeds", "0")
    assert any(line.startswith("# no GPU visible: no wall-time estimate") for line in capsys.readouterr().out.splitlines())


def test_cost_counts_a_synthetic_set_once_when_methods_share_it(tmp_path):
    """DA-Fusion + filter links DA-Fusion's images (the filter only weights them): one set to generate, not two."""
    write_config(tmp_path, train_classifier={"num-synthetic": 2},
                 methods={"da_fusion": {"aug": "textual-inversion"},
                          "da_fusion_filter": {"aug": "textual-inversion", "synthetic_filter": "use"},
                          "other_guidance": {"aug": "textual-inversion", "guidance-scale": 5}})
    config = load_config(tmp_path / "experiment.yaml")
    config.update(seeds=[0], examples_per_class=[2])
    cost = grid_cost(plan_jobs(config), config)
    classes = len(CUSTOM_COCO_CLASSES)
    assert cost.stages["generation"].jobs == 2 and cost.stages["generation"].images == 2 * 2 * 2 * classes
    assert cost.stages["classifier"].jobs == 3


def test_wall_time_simulation_respects_dependencies_and_gpus():
    jobs = [Job("ti", "fine_tune.py", [], [], Path("l")), Job("agg", "aggregate_embeddings.py", [], [], Path("l"),
                                                                needs=["ti"]),
            Job("base", "train_classifier.py", [], [], Path("l")),
            Job("run", "train_classifier.py", [], [], Path("l"), needs=["agg"])]
    seconds = {"ti": 100.0, "agg": 10.0, "base": 50.0, "run": 30.0}
    assert simulate_wall_time(jobs, seconds, 1) == (190.0, 140.0)  # one GPU: the sum; the chain ti -> agg -> run
    assert simulate_wall_time(jobs, seconds, 2) == (140.0, 140.0)  # two GPUs: the baseline beside the chain


def test_slurm_dry_run_prints_sbatch_settings_and_arrays(tmp_path, monkeypatch, capsys):
    write_config(tmp_path, slurm={"partition": "gpu", "account": "lab", "mem": "32G", "time": 600,
                                  "sbatch": {"constraint": "h100"}})
    run_main(tmp_path, monkeypatch, "--dry-run", "--gpus", "none", "--executor", "slurm", "--slurm-qos", "high",
             "--slurm-option", "exclude=node3")
    out = capsys.readouterr().out.splitlines()
    sbatch = [line for line in out if line.startswith("#SBATCH")]
    assert sbatch == ["#SBATCH --partition=gpu", "#SBATCH --account=lab", "#SBATCH --qos=high",
                      "#SBATCH --gpus-per-node=1", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32G",
                      "#SBATCH --time=600", "#SBATCH --constraint=h100", "#SBATCH --exclude=node3",
                      "#SBATCH --kill-on-invalid-dep=yes"]
    # per (seed, epc): fine_tune, filter and baseline share no prerequisites -> 3 arrays of 4 tasks; aggregation
    # (after its fine_tune), da_fusion (after aggregation), diagen (after aggregation and filter): one each
    assert out[-1] == ("# 24 jobs: 24 to run, 0 already done (skipped); would run on Slurm as 24 Slurm jobs in 15 "
                       "submissions (job arrays of 1 to 4 tasks), 3 level(s) of dependencies, up to 1 "
                       "resubmission(s) each")
    with pytest.raises(UserError, match="--slurm-option 'exclude' must be KEY=VALUE"):
        run_main(tmp_path, monkeypatch, "--dry-run", "--executor", "slurm", "--slurm-option", "exclude")
    write_config(tmp_path, slurm={"partitions": "gpu"})
    with pytest.raises(UserError, match="unknown slurm setting"):
        load_config(tmp_path / "experiment.yaml")

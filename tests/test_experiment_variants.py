"""The experiment runner's token folders: `pipeline_dir` (where fine-tuned/ and tokens/ go) and the token variants of
methods with `fine_tune:` flags of their own; every shipped config plans, and the default plan is the scripts' plain
commands."""

from pathlib import Path

import pytest
import yaml

from semantic_aug.runner import experiments
from semantic_aug.runner.experiments import (flag_arguments, load_config, plan_jobs, script_flags, split_method,
                                             token_variant_name)
from semantic_aug.runner.reporting import METHOD_LABELS, _method_sort_key, method_label
from semantic_aug.core.utils import UserError
from test_experiments import CONFIG, write_config

RUNNER_PATH_FLAGS = ("--output_dir", "--output-dir", "--embed-path")  # what a pipeline_dir or a variant adds
VARIANT = "max_train_steps-2000_num_vectors-4"
MULTI_VECTOR = {"num_vectors": 4, "max_train_steps": 2000}


def planned(tmp_path, monkeypatch, **changes) -> list:
    """The plan of the test config with `changes`, for seed 0 and 2 examples per class."""
    monkeypatch.chdir(tmp_path)
    config = load_config(write_config(tmp_path, **changes))
    config.update(seeds=[0], examples_per_class=[2])
    return plan_jobs(config)


def by_script(jobs, script: str) -> list:
    return [job for job in jobs if job.script == script]


def classifier(jobs, method: str):
    return next(job for job in by_script(jobs, "train_classifier.py") if value_of(job, "--method") == method)


def value_of(job, flag: str) -> str:
    """The value after `flag`, which the job passes once."""
    assert job.arguments.count(flag) == 1, (flag, job.arguments)
    return job.arguments[job.arguments.index(flag) + 1]


def test_default_pipeline_dir_plans_the_scripts_plain_commands(tmp_path, monkeypatch):
    """pipeline_dir "." (the default) passes no folder flag: each command is the one the scripts' defaults pair up."""
    jobs = planned(tmp_path, monkeypatch)
    config = load_config(tmp_path / "experiment.yaml")  # the flags in the order the file lists them
    selection = ["--seeds", "0", "--examples-per-class", "2"]
    fine_tune, = by_script(jobs, "fine_tune.py")
    assert fine_tune.arguments == ["--pretrained_model_name_or_path", "tiny", "--dataset", "custom_coco", *selection,
                                   *flag_arguments(config["fine_tune"])]
    aggregate, = by_script(jobs, "aggregate_embeddings.py")
    assert aggregate.arguments == ["--dataset", "custom_coco", *selection, "--input-path", "fine-tuned",
                                   "--augment-embeddings", "True", *flag_arguments(config["aggregate_embeddings"])]
    assert aggregate.outputs == [Path("tokens/custom_coco-tokens/custom_coco-0-2.pt"),
                                 Path("tokens/custom_coco-tokens/noise/custom_coco-0-2.pt")]
    assert fine_tune.skip_when == aggregate.outputs
    da_fusion = classifier(jobs, "da_fusion")
    assert da_fusion.arguments == [
        "--dataset", "custom_coco", *selection, "--method", "da_fusion",
        "--logdir", "RESULTS/custom_coco_2epc/da_fusion/logs",
        "--synthetic-dir", "RESULTS/custom_coco_2epc/da_fusion/synthetics_seed_0", "--model-path", "tiny",
        "--eval_on_test_set", "test", *flag_arguments({**config["train_classifier"], "aug": "textual-inversion"})]
    assert da_fusion.needs == [aggregate.name]
    assert not any(flag in job.arguments for job in jobs for flag in RUNNER_PATH_FLAGS)


@pytest.mark.parametrize("config_path", sorted(Path(experiments.REPO_ROOT / "experiments").glob("*.yaml")),
                         ids=lambda path: path.name)
def test_every_shipped_config_plans_with_its_tokens_under_pipeline_dir(config_path, tmp_path, monkeypatch):
    """Each experiments/*.yaml loads and plans; its token files lie under its pipeline_dir (variants under
    variants/), every classifier run reads tokens made by a job it waits for, and pipeline_dir "." adds no flag."""
    monkeypatch.chdir(tmp_path)
    config = load_config(config_path)
    jobs = plan_jobs(config)
    names = {job.name: job for job in jobs}
    pipeline_dir = Path(config["pipeline_dir"])
    for job in by_script(jobs, "aggregate_embeddings.py"):
        assert job.outputs and all(pipeline_dir in path.parents for path in job.outputs)
    for job in by_script(jobs, "train_classifier.py"):
        assert all(need in names for need in job.needs)
        if "--embed-path" in job.arguments:
            tokens = Path(value_of(job, "--embed-path"))
            assert any(tokens in names[need].outputs for need in job.needs)
    if pipeline_dir == Path("."):
        variants = [job for job in jobs if job.script == "fine_tune.py" and "--output_dir" in job.arguments]
        assert all(value_of(job, "--output_dir").startswith("variants/") for job in variants)
        common = [job for job in by_script(jobs, "train_classifier.py")
                  if not split_method(config["methods"][value_of(job, "--method")])[1]]
        assert common and not any("--embed-path" in job.arguments for job in common)


def test_pipeline_dir_holds_fine_tuned_tokens_and_the_classifiers_embed_path(tmp_path, monkeypatch):
    jobs = planned(tmp_path, monkeypatch, pipeline_dir="RESULTS_sd21")
    fine_tune, = by_script(jobs, "fine_tune.py")
    aggregate, = by_script(jobs, "aggregate_embeddings.py")
    assert value_of(fine_tune, "--output_dir") == "RESULTS_sd21"  # fine_tune.py writes {output_dir}/fine-tuned
    assert value_of(aggregate, "--input-path") == "RESULTS_sd21/fine-tuned"
    assert value_of(aggregate, "--output-dir") == "RESULTS_sd21/tokens"
    plain = Path("RESULTS_sd21/tokens/custom_coco-tokens/custom_coco-0-2.pt")
    noisy = Path("RESULTS_sd21/tokens/custom_coco-tokens/noise/custom_coco-0-2.pt")
    assert aggregate.outputs == [plain, noisy] and fine_tune.skip_when == [plain, noisy]
    assert value_of(classifier(jobs, "da_fusion"), "--embed-path") == str(plain)
    assert value_of(classifier(jobs, "diagen"), "--embed-path") == str(noisy)  # use-embedding-noise 1
    assert "--embed-path" not in classifier(jobs, "baseline").arguments  # no tokens
    # tokens made for the default folders do not count as done here
    for path in (tmp_path / "tokens/custom_coco-tokens/custom_coco-0-2.pt",
                 tmp_path / "tokens/custom_coco-tokens/noise/custom_coco-0-2.pt"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("tokens of another model")
    assert not fine_tune.done() and not aggregate.done()


def test_methods_with_the_same_fine_tune_flags_share_one_token_variant(tmp_path, monkeypatch):
    methods = {"baseline": {"num-synthetic": 0},
               "da_fusion": {"aug": "textual-inversion"},
               "da_fusion_4x2000": {"aug": "textual-inversion", "fine_tune": MULTI_VECTOR},
               "diagen_4x2000": {"aug": "textual-inversion", "use-embedding-noise": 1,
                                 "fine_tune": {"max_train_steps": 2000, "num_vectors": 4}}}  # same, other order
    jobs = planned(tmp_path, monkeypatch, methods=methods)
    fine_tunes = by_script(jobs, "fine_tune.py")
    assert len(fine_tunes) == 2 and len(by_script(jobs, "aggregate_embeddings.py")) == 2  # common + one variant
    common, variant = fine_tunes
    assert "--num_vectors" not in common.arguments and value_of(common, "--max_train_steps") == "20"
    assert value_of(variant, "--num_vectors") == "4" and value_of(variant, "--max_train_steps") == "2000"
    assert "--scale_lr" in variant.arguments  # the common flags stay unless overridden
    assert value_of(variant, "--output_dir") == f"variants/{VARIANT}"

    common_tokens, variant_tokens = by_script(jobs, "aggregate_embeddings.py")
    assert value_of(common_tokens, "--augment-embeddings") == "False"  # da_fusion only: plain tokens
    assert value_of(variant_tokens, "--augment-embeddings") == "True"  # diagen_4x2000 uses the noisy copies
    assert value_of(variant_tokens, "--input-path") == f"variants/{VARIANT}/fine-tuned"
    assert value_of(variant_tokens, "--output-dir") == f"variants/{VARIANT}/tokens"
    assert variant_tokens.needs == [variant.name]
    plain = Path(f"variants/{VARIANT}/tokens/custom_coco-tokens/custom_coco-0-2.pt")
    noisy = Path(f"variants/{VARIANT}/tokens/custom_coco-tokens/noise/custom_coco-0-2.pt")
    assert variant_tokens.outputs == [plain, noisy]

    four_vectors = classifier(jobs, "da_fusion_4x2000")
    assert value_of(four_vectors, "--embed-path") == str(plain) and four_vectors.needs == [variant_tokens.name]
    assert value_of(classifier(jobs, "diagen_4x2000"), "--embed-path") == str(noisy)
    assert "--embed-path" not in classifier(jobs, "da_fusion").arguments
    assert classifier(jobs, "da_fusion").needs == [common_tokens.name]
    assert not any("--fine_tune" in job.arguments for job in jobs)  # not a train_classifier.py flag

    # the variant's tokens on disk finish its jobs only
    for path in (plain, noisy):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("tokens")
    assert variant.done() and variant_tokens.done() and not common.done() and not common_tokens.done()


def test_token_variant_names_are_readable_and_never_shared_by_other_flags():
    assert token_variant_name(MULTI_VECTOR) == VARIANT
    assert token_variant_name({"max_train_steps": 2000, "num_vectors": 4}) == VARIANT
    assert token_variant_name({"scale_lr": False, "learning_rate": 1e-4}) == "learning_rate-0.0001_scale_lr-false"
    # a value with `_` could read as another flag: the readable name gets a digest of the flags
    tricky = token_variant_name({"lr_scheduler": "constant_num_vectors-4"})
    assert tricky.startswith("lr_scheduler-constant_num_vectors-4-") and tricky != "lr_scheduler-constant_num_vectors-4"
    assert tricky != token_variant_name({"lr_scheduler": "constant", "num_vectors": 4})
    unsafe = token_variant_name({"unet-ckpt": "/models/erased unet.ckpt"})
    assert "/" not in unsafe and " " not in unsafe
    assert unsafe != token_variant_name({"unet-ckpt": "/models/erased-unet.ckpt"})


@pytest.mark.parametrize("changes, message", [
    ({"methods": {"m": {"fine_tune": {"num_vector": 4}}}},
     "num_vector in the fine_tune flags of method m in .* is not a fine_tune.py flag a method can set "
     "\\(did you mean num_vectors\\?\\)"),
    ({"methods": {"m": {"fine_tune": {"output_dir": "elsewhere"}}}},
     "output_dir in the fine_tune flags of .* is set by the runner per job; .* pipeline_dir"),
    ({"methods": {"m": {"fine_tune": {"dataset": "coco"}}}}, "dataset in the fine_tune flags .* is set by the runner"),
    ({"methods": {"m": {"fine_tune": {"bad-images": "skip"}}}}, "bad-images in .* not a fine_tune.py flag"),
    ({"methods": {"m": {"fine_tune": 4}}}, "fine_tune of method m in .* must map fine_tune.py flags to values"),
    ({"methods": {"m": {"fine_tune": {"num_vectors": {"a": 1}}}}},
     "num_vectors in the fine_tune flags .* not a mapping"),
    ({"methods": {"m": {"num-synthetic": 0, "fine_tune": MULTI_VECTOR}}}, "method m in .* learns no tokens"),
    ({"methods": {"m": {"aug": "real-guidance", "fine_tune": MULTI_VECTOR}}}, "method m in .* learns no tokens"),
    ({"methods": {"m": {"embed-path": "my.pt", "fine_tune": MULTI_VECTOR}}},
     "method m in .* learns no tokens"),
    ({"fine_tune": {"output_dir": "elsewhere"}}, "output_dir in the fine_tune flags .* set by the runner"),
    ({"aggregate_embeddings": {"output-dir": "elsewhere"}}, "output-dir in the aggregate_embeddings flags"),
    ({"aggregate_embeddings": {"embed-path": "x.pt"}}, "embed-path in the aggregate_embeddings flags"),
])
def test_bad_fine_tune_flags_fail_in_one_line(tmp_path, changes, message):
    with pytest.raises(UserError, match=message) as error:
        load_config(write_config(tmp_path, **changes))
    assert "\n" not in str(error.value)


def test_script_flags_are_the_flags_fine_tune_py_parses():
    from test_cli import real_parser

    parsed = {option[2:] for action in real_parser("fine_tune")._actions for option in action.option_strings
              if option.startswith("--")} - {"help"}
    grid_flags = {"dataset", "data-dir", "train-pool-size", "dataset-module", "bad-images"}  # the data's
    assert script_flags("fine_tune.py") == parsed - grid_flags
    assert {"num_vectors", "max_train_steps", "output_dir", "joint", "no-joint"} <= script_flags("fine_tune.py")


def test_the_report_labels_and_orders_the_ablation_methods():
    assert method_label("da_fusion_4x2000") == "DA-Fusion, 4 vectors × 2000 steps"
    assert method_label("diagen_4x2000") == "DIAGen, 4 vectors × 2000 steps"
    config = yaml.safe_load((experiments.REPO_ROOT / "experiments/custom_coco_multivector.yaml").read_text())
    assert set(config["methods"]) <= set(METHOD_LABELS)  # every row of the ablation has a label
    assert sorted(["diagen_4x2000", "diagen", "da_fusion_4x2000", "baseline", "da_fusion"], key=_method_sort_key) == [
        "baseline", "da_fusion", "da_fusion_4x2000", "diagen", "diagen_4x2000"]

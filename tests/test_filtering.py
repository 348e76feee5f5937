"""The filter (contribution c): calibration, the weight rule, sibling probabilities, the manifest cache, the
filter modes, the CLI, and an honest offline check that a trained filter down-weights noise images."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from semantic_aug.core.classifiers import FewShotClassifier
from semantic_aug.datasets.custom_coco import CustomCOCO
from semantic_aug.stages.filtering import (FILTER_CONFIDENCE_THRESHOLD, FilterModel, calibration_metrics,
                                           expected_calibration_error, filter_mode_weights, filter_scores,
                                           filter_weights, fit_temperature, load_filter, normalise_sibling_weights,
                                           save_filter, score_synthetic_images, scoring_transform)
from semantic_aug.stages.filter_training import FilterTrainingOptions, train_filter
from semantic_aug.stages.synthetic import SyntheticSet
from semantic_aug.core.layout import RunLayout
from semantic_aug.datasets import dataset_key
from semantic_aug.core.utils import UserError
from conftest import import_script, write_class_folders




# -- calibration -----------------------------------------------------------------------------------------------


def overconfident_logits(scale: float, n: int = 2000, num_classes: int = 10, seed: int = 0):
    """Labels drawn from softmax(z); the model reports `scale` × z, so the true temperature is `scale`."""
    generator = torch.Generator().manual_seed(seed)
    true_logits = 2.0 * torch.randn(n, num_classes, generator=generator)
    labels = torch.multinomial(true_logits.softmax(dim=1), 1, generator=generator).squeeze(1)
    return scale * true_logits, labels


def test_temperature_scaling_lowers_nll_of_overconfident_logits():
    logits, labels = overconfident_logits(scale=3.0)
    log_temperature = fit_temperature(logits, labels)
    before = calibration_metrics(logits, labels)
    after = calibration_metrics(logits, labels, float(np.exp(log_temperature)))
    print(f"T = {np.exp(log_temperature):.3f}; NLL {before['nll']:.4f} -> {after['nll']:.4f}; "
          f"ECE {before['ece']:.4f} -> {after['ece']:.4f}")
    assert after["nll"] < before["nll"] - 0.3
    assert after["ece"] < before["ece"] / 3
    assert np.exp(log_temperature) == pytest.approx(3.0, rel=0.1)  # recovers the known over-confidence
    # the reference's plain LBFGS stops near the optimum: nudging T either way lowers the NLL by less than 1e-3
    for factor in (0.95, 1.05):
        nudged = calibration_metrics(logits, labels, float(np.exp(log_temperature)) * factor)
        assert nudged["nll"] >= after["nll"] - 1e-3


def reference_temperature(logits, labels, lr=1e-2, max_iter=500):
    """The reference's calibration written out: an nn.Parameter T = 1, LBFGS(lr, max_iter) on NLL(logits / T)."""
    temperature = torch.nn.Parameter(torch.ones(1) * 1.0)
    optimizer = torch.optim.LBFGS([temperature], lr=lr, max_iter=max_iter)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.CrossEntropyLoss()(logits / temperature.unsqueeze(1).expand(*logits.shape), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return temperature.item()


@pytest.mark.parametrize("scale, seed", [(3.0, 0), (0.25, 2), (1.5, 3)])
def test_temperature_scaling_equals_the_reference_lbfgs(scale, seed):
    logits, labels = overconfident_logits(scale=scale, seed=seed)
    assert np.exp(fit_temperature(logits, labels)) == pytest.approx(reference_temperature(logits, labels), rel=1e-6)


def test_temperature_scaling_leaves_calibrated_logits_alone_and_fixes_underconfidence():
    logits, labels = overconfident_logits(scale=1.0, seed=1)
    assert np.exp(fit_temperature(logits, labels)) == pytest.approx(1.0, abs=0.1)
    logits, labels = overconfident_logits(scale=0.25, seed=2)
    assert np.exp(fit_temperature(logits, labels)) == pytest.approx(0.25, rel=0.1)


def test_expected_calibration_error():
    labels = torch.tensor([0, 1, 2, 0])
    perfect = torch.nn.functional.one_hot(labels, 3).float()
    assert expected_calibration_error(perfect, labels) == pytest.approx(0.0)
    wrong_but_sure = torch.nn.functional.one_hot((labels + 1) % 3, 3).float()
    assert expected_calibration_error(wrong_but_sure, labels) == pytest.approx(1.0)
    # 0.6-confident everywhere, right half the time: a gap of 0.1
    probabilities = torch.tensor([[0.6, 0.4, 0.0]] * 4)
    assert expected_calibration_error(probabilities, torch.tensor([0, 1, 0, 1])) == pytest.approx(0.1, abs=1e-6)


# -- weights -------------------------------------------------------------------------------------------------


def test_filter_weight_rule_on_hand_made_confidences():
    confidences = [0.0, 0.1, 0.25, 0.4999, 0.5, 0.7, 1.0]
    np.testing.assert_allclose(filter_weights(confidences), [0.0, 0.2, 0.5, 0.9998, 1.0, 1.0, 1.0])
    assert FILTER_CONFIDENCE_THRESHOLD == 0.5
    for bad in ([-0.1], [1.5], [np.nan]):
        with pytest.raises(ValueError):
            filter_weights(bad)


def test_sibling_weights_are_normalised_per_real_image():
    weights = [1.0, 0.5, 0.5, 0.2, 0.6]
    groups = [7, 7, 7, 3, 3]
    probabilities = normalise_sibling_weights(weights, groups)
    np.testing.assert_allclose(probabilities, [0.5, 0.25, 0.25, 0.25, 0.75])
    for group in (7, 3):
        assert probabilities[np.asarray(groups) == group].sum() == pytest.approx(1.0)


def test_all_bad_siblings_keep_a_valid_distribution():
    weights = filter_weights([0.0, 0.0, 0.0, 0.9])
    probabilities = normalise_sibling_weights(weights, [0, 0, 0, 1])
    np.testing.assert_allclose(probabilities, [1 / 3, 1 / 3, 1 / 3, 1.0])
    # and the dataset's sibling sampler accepts it and can reach every sibling
    dataset = CustomCOCO(split="train", examples_per_class=1, seed=0)
    scores = pd.DataFrame({"confidence": [0.0, 0.0, 0.0], "filter_weight": filter_weights([0.0, 0.0, 0.0])})
    dataset.set_synthetic_images(SyntheticSet.from_siblings({0: ["a.png", "b.png", "c.png"]}).with_filter_weights(
        filter_mode_weights(scores, [0, 0, 0], "sampling")))
    np.testing.assert_allclose(dataset.synthetic_images[0].probabilities, [1 / 3, 1 / 3, 1 / 3])
    chosen = {dataset.choose_synthetic(0, u) for u in np.linspace(0, 0.999, 30)}
    assert chosen == {"a.png", "b.png", "c.png"}


# -- the filter file -------------------------------------------------------------------------------------------


def test_load_filter_without_a_saved_filter_names_the_expected_path(tmp_path):
    expected = RunLayout("custom_coco", 3, 4, models_root=tmp_path / "models").filter
    assert expected == tmp_path / "models" / "filter_custom_coco_3_4.pth"
    with pytest.raises(UserError) as error:
        load_filter(expected, "cpu")
    message = str(error.value)
    assert str(expected) in message and "train_filter.py" in message and "\n" not in message


def random_filter(num_classes: int = 3, temperature: float = 1.0, seed: int = 0) -> FilterModel:
    """A random linear head on the (offline) pretrained backbone, whose features do depend on the image."""
    torch.manual_seed(seed)
    classifier = FewShotClassifier("efficientnet_lite0", num_classes)
    return FilterModel(classifier, float(np.log(temperature)), [f"class{i}" for i in range(num_classes)],
                       image_size=64, filter_id=f"random-{seed}").eval()


def test_save_and_load_filter_round_trip(tmp_path):
    model = random_filter(temperature=2.5)
    path = tmp_path / "filter.pth"
    save_filter(model, path, metadata={"seed": 0})
    loaded = load_filter(path, "cpu")
    assert loaded.temperature == pytest.approx(2.5)
    assert loaded.class_names == model.class_names and loaded.image_size == 64
    images = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(loaded(images), model(images))
    path.write_bytes(b"not a filter")
    with pytest.raises(UserError, match="cannot read filter file"):
        load_filter(path, "cpu")


# -- scoring and the manifest cache ----------------------------------------------------------------------------


def write_images(folder: Path, count: int, size=(48, 40)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        paths.append(folder / f"label_{i % 3}-{i // 2}-{i % 2}.png")
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(paths[-1])
    return paths


def small_dataset():
    return CustomCOCO(split="train", examples_per_class=1, seed=0, image_size=64)


def test_scores_repeat_whatever_the_order_and_batch_size(tmp_path):
    paths = write_images(tmp_path, 5)
    labels = [0, 1, 2, 0, 1]
    model = random_filter()
    transform = scoring_transform(small_dataset())
    scores = score_synthetic_images(model, paths, labels, transform, num_views=3, seed=4, batch_size=64)
    assert scores.shape == (5,) and ((0 <= scores) & (scores <= 1)).all()
    batched = score_synthetic_images(model, paths, labels, transform, num_views=3, seed=4, batch_size=2)
    reversed_scores = score_synthetic_images(model, paths[::-1], labels[::-1], transform, num_views=3, seed=4)
    np.testing.assert_allclose(batched, scores, rtol=1e-5)
    np.testing.assert_allclose(reversed_scores[::-1], scores, rtol=1e-5)
    other_seed = score_synthetic_images(model, paths, labels, transform, num_views=3, seed=5)
    assert not np.allclose(other_seed, scores)  # the views are random, and seeded


def test_scores_are_stored_in_the_manifest_and_not_recomputed(tmp_path):
    paths = write_images(tmp_path / "synthetic", 6)
    manifest = pd.DataFrame({"real_idx": [0, 0, 1, 1, 2, 2], "synthetic_idx": [0, 1] * 3, "label": [0, 0, 1, 1, 2, 2],
                             "path": [str(p) for p in paths]})
    synthetic_set = SyntheticSet(tmp_path / "synthetic", manifest)
    model = random_filter(temperature=0.05)  # a sharp filter, so the weights spread over [0, 1]
    scores = filter_scores(model, manifest, small_dataset(), num_views=2, progress=False)
    assert list(scores.columns) == ["confidence", "filter_weight", "filter_id"] and len(scores) == len(manifest)
    np.testing.assert_allclose(scores["filter_weight"], filter_weights(scores["confidence"]))
    assert np.ptp(scores["filter_weight"]) > 0 and set(scores["filter_id"]) == {model.filter_id}
    scored = synthetic_set.with_filter_scores(scores)
    on_disk = SyntheticSet.load(tmp_path / "synthetic").manifest  # the set writes its manifest: the scores' cache
    assert list(on_disk.columns) == [*manifest.columns, "confidence", "filter_weight", "filter_id"]
    np.testing.assert_allclose(on_disk["confidence"], scores["confidence"])
    assert on_disk.astype(str).equals(scored.manifest.astype(str))
    # with the images gone, a rerun on the stored manifest must not try to read them
    for path in paths:
        path.unlink()
    again = filter_scores(model, on_disk, small_dataset(), progress=False)
    np.testing.assert_allclose(again["confidence"], scores["confidence"])
    # a different filter's scores are not reused
    with pytest.raises(UserError, match="image file not found"):
        filter_scores(random_filter(seed=1), on_disk, small_dataset(), progress=False)


def scored_manifest():
    return pd.DataFrame({
        "real_idx": [0, 0, 0, 1, 1],
        "synthetic_idx": [1, 0, 2, 0, 1],
        "path": ["a1.png", "a0.png", "a2.png", "b0.png", "b1.png"],
        "confidence": [0.1, 0.9, 0.0, 0.2, 0.3],
    }).assign(filter_weight=lambda frame: filter_weights(frame["confidence"]))


def weighted_siblings(manifest, mode, **options):
    """The siblings training sees after the filter's weights for `mode` went into the synthetic set."""
    weights = filter_mode_weights(manifest, manifest["real_idx"], mode, **options)
    return SyntheticSet(Path("."), manifest).with_filter_weights(weights).siblings()


def test_filter_mode_sampling_is_the_paper():
    siblings = weighted_siblings(scored_manifest(), "sampling")
    assert {idx: s.paths for idx, s in siblings.items()} == {0: ["a0.png", "a1.png", "a2.png"],
                                                            1: ["b0.png", "b1.png"]}  # ordered by synthetic_idx
    np.testing.assert_allclose(siblings[0].probabilities, [1.0 / 1.2, 0.2 / 1.2, 0.0])
    np.testing.assert_allclose(siblings[1].probabilities, [0.4, 0.6])
    assert all((s.loss_weights == 1).all() for s in siblings.values())


def test_filter_mode_loss_weights_the_loss_and_samples_uniformly():
    siblings = weighted_siblings(scored_manifest(), "loss")
    assert {idx: s.paths for idx, s in siblings.items()} == {0: ["a0.png", "a1.png", "a2.png"], 1: ["b0.png", "b1.png"]}
    assert all(s.probabilities is None for s in siblings.values())
    np.testing.assert_allclose(siblings[0].loss_weights, [1.0, 0.2, 0.0])
    np.testing.assert_allclose(siblings[1].loss_weights, [0.4, 0.6])


def test_filter_mode_threshold_drops_low_confidence_images():
    siblings = weighted_siblings(scored_manifest(), "threshold", threshold=0.25)
    assert {idx: s.paths for idx, s in siblings.items()} == {0: ["a0.png"], 1: ["b1.png"]}
    assert all(s.probabilities is None and (s.loss_weights == 1).all() for s in siblings.values())
    assert weighted_siblings(scored_manifest(), "threshold", threshold=0.95) == {}  # each real image shown as itself


def test_filter_modes_reach_the_training_draws(tmp_path):
    """The modes' weights reach the shared training loop through the set: sampling never picks a zero-weight
    sibling, loss mode hands each synthetic draw its weight."""
    from semantic_aug.stages.training import TrainingData

    paths = write_images(tmp_path, 5)
    manifest = scored_manifest().assign(path=[str(p) for p in paths])
    dataset = CustomCOCO(split="train", examples_per_class=1, seed=0, image_size=32, synthetic_probability=1.0)
    generator = torch.Generator().manual_seed(0)

    def attach(mode):
        weights = filter_mode_weights(manifest, manifest["real_idx"], mode)
        dataset.set_synthetic_images(SyntheticSet(tmp_path, manifest).with_filter_weights(weights))
        return dataset.synthetic_images[0].paths + dataset.synthetic_images[1].paths

    ordered = attach("sampling")
    data = TrainingData(dataset, "cpu")
    draws = data.draw_epoch(dataset.num_classes * 200, 16, generator)
    picked = [str(p) for p in np.asarray(ordered)[draws.cache_index[draws.synthetic] - len(dataset)]]
    a0, a1, a2 = ordered[:3]  # confidences 0.9, 0.1 and 0.0: weights 1, 0.2 and 0
    counts = {path: picked.count(path) for path in (a0, a1, a2)}
    assert counts[a2] == 0 and counts[a0] > 2 * counts[a1] > 0

    ordered = attach("loss")
    draws = TrainingData(dataset, "cpu").draw_epoch(dataset.num_classes * 50, 16, generator)
    rows = draws.cache_index[draws.synthetic] - len(dataset)
    weight_of = dict(zip(manifest["path"], manifest["filter_weight"]))
    expected = [weight_of[p] for p in np.asarray(ordered)[rows]]
    assert len(set(expected)) > 2
    np.testing.assert_allclose(draws.loss_weights[draws.synthetic].numpy(), expected)
    assert (draws.loss_weights[~draws.synthetic] == 1).all()


def test_filter_mode_rejects_unscored_sets_and_unknown_modes():
    with pytest.raises(UserError, match="not been scored"):
        filter_mode_weights(scored_manifest().drop(columns=["confidence"]), [0, 0, 0, 1, 1])
    with pytest.raises(UserError, match="unknown filter mode"):
        filter_mode_weights(scored_manifest(), [0, 0, 0, 1, 1], "soft")


def test_synthetic_filter_use_without_a_saved_filter_is_a_one_line_error(script_runner, tmp_path):
    from semantic_aug.datasets.custom_coco import CUSTOM_COCO_CLASSES

    # Custom COCO's layout, 9 small train-val images per class (8 train + 1 val)
    write_class_folders(tmp_path / "data", CUSTOM_COCO_CLASSES, counts=(("train-val", 9),))
    result = script_runner(
        "train_classifier.py", "--data-dir", tmp_path / "data", "--seeds", "0", "--examples-per-class", "1",
        "--num-synthetic", "1", "--aug", "real-guidance", "--model-path", "tiny", "--strength", "0.7",
        "--guidance-scale", "7.5", "--num-inference-steps", "2", "--synthetic_filter", "use", "--models-root",
        tmp_path / "models", "--classifier-backbone", "efficientnet_lite0", "--image-size", "32", "--device", "cpu",
        cwd=tmp_path, env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    key = dataset_key("custom_coco", tmp_path / "data")  # not the default data: the key carries its fingerprint
    expected = RunLayout(key, 0, 1, models_root=tmp_path / "models").filter
    last_line = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and last_line.startswith(f"error: no trained filter at {expected}:")
    assert "Traceback" not in result.stderr


# -- the script, and a filter it trains on a 4-class Custom COCO, shared by the tests below ---------------------------

CHECK_CLASSES = ("bicycle", "clock", "keyboard", "potted_plant")  # visually distinct Custom COCO classes
CHECK_DATASET = "custom_coco_filter_check"
CHECK_EPC = 4
CHECK_IMAGE_SIZE = 128
CHECK_REAL_PER_CLASS = 8  # held-out real images scored per class
NOISE_STRENGTH = 0.7  # img2img strength of DIAGen's generation
NOISE_STEPS = 4  # scheduler steps before strength (2 executed): the tiny SD makes noise at any step count
NOISE_GUIDANCE_SCALE = 7.5


def load_train_filter_script():
    return import_script("train_filter")


def test_train_filter_cli_rejects_bad_flags(capsys):
    script = load_train_filter_script()
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(["--max-epochs", "0"])
    assert exit_info.value.code == 2 and "--max-epochs must be at least 1" in capsys.readouterr().err


def test_train_filter_flag_defaults_are_the_options_defaults():
    script = load_train_filter_script()
    assert script.filter_options(script.parse_args([])) == FilterTrainingOptions()


def test_train_filter_checks_its_options_before_reading_images(tmp_path):
    with pytest.raises(UserError, match="batch_size must be at least 1, got 50, 200, 0"):
        train_filter(RunLayout("custom_coco", 0, 1, models_root=tmp_path / "models"),
                     FilterTrainingOptions(batch_size=0), data_dir=tmp_path / "missing", logdir=tmp_path / "logs",
                     device="cpu")
    assert not (tmp_path / "models").exists() and not (tmp_path / "logs").exists()


def check_layout(work) -> RunLayout:
    """The files of the subset's run: its data is no default data, so the key carries the data fingerprint."""
    return RunLayout(dataset_key(CHECK_DATASET, work / "data"), 0, CHECK_EPC, models_root=work / "models")


@pytest.fixture(scope="module")
def trained_filter(tmp_path_factory):
    """Run train_filter.py's main on a registered 4-class Custom COCO (links to the shipped images).

    Yields (the script module, its argv, the work dir with data/, models/ and logs/); the dataset is unregistered
    afterwards.
    """
    from semantic_aug.datasets import DATASETS, register_dataset
    from semantic_aug.datasets.few_shot_dataset import FolderFewShotDataset

    work = tmp_path_factory.mktemp("filter")
    shipped = Path(CustomCOCO.default_data_dir) / "train-val"
    (work / "data" / "train-val").mkdir(parents=True)
    for class_name in CHECK_CLASSES:
        (work / "data" / "train-val" / class_name).symlink_to(shipped / class_name, target_is_directory=True)

    @register_dataset(CHECK_DATASET)
    class Subset(FolderFewShotDataset):
        class_names = CHECK_CLASSES

    script = load_train_filter_script()
    argv = ["--dataset", CHECK_DATASET, "--data-dir", str(work / "data"), "--seed", "0", "--examples-per-class",
            str(CHECK_EPC), "--classifier-backbone", "efficientnet_lite0", "--iterations-per-epoch", "5",
            "--max-epochs", "3", "--lr", "1e-3", "--image-size", str(CHECK_IMAGE_SIZE), "--models-root",
            str(work / "models"), "--logdir", str(work / "logs"), "--device", "cpu"]
    script.main(script.parse_args(argv))
    yield script, argv, work
    DATASETS.pop(CHECK_DATASET)


def test_train_filter_script_saves_a_calibrated_filter_and_its_logs(trained_filter):
    _, _, work = trained_filter
    path = check_layout(work).filter
    filter_model = load_filter(path, "cpu")
    assert filter_model.class_names == list(CHECK_CLASSES) and filter_model.temperature > 0
    calibration = pd.read_csv(check_layout(work).filter_logs(work / "logs")[1])
    print(calibration.to_dict("records"))
    assert calibration.loc[0, "nll_after"] <= calibration.loc[0, "nll_before"]
    assert calibration.loc[0, "temperature"] == pytest.approx(filter_model.temperature)
    history = pd.read_csv(check_layout(work).filter_logs(work / "logs")[0])
    assert list(history.columns) == ["idx", "seed", "examples_per_class", "epoch", "value", "metric", "split"]
    assert set(history["split"]) == {"Training", "Validation"} and history["epoch"].max() == 2


def test_train_filter_script_keeps_an_existing_filter(trained_filter, caplog):
    script, argv, work = trained_filter
    path = check_layout(work).filter
    modified = path.stat().st_mtime_ns
    with caplog.at_level("INFO"):
        script.main(script.parse_args(argv))
    assert "exists; keeping it" in caplog.text
    assert path.stat().st_mtime_ns == modified


# -- the honest offline check ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def noise_generator(trained_filter):
    """(make, train split): `make()` runs DIAGen's generation (img2img from every real training image of the
    filter's split, the real code path) with the tiny SD, whose outputs are noise, and returns the manifest."""
    from semantic_aug.datasets import create_dataset
    from semantic_aug.stages.synthetic import (AugmentationOptions, GenerationOptions, build_augmentation,
                                               generate_synthetic_images)

    _, _, work = trained_filter
    train = create_dataset(CHECK_DATASET, split="train", examples_per_class=CHECK_EPC, seed=0, data_dir=work / "data",
                           image_size=CHECK_IMAGE_SIZE)
    options = AugmentationOptions(model_path="tiny", embed_path=None, dataset_name=CHECK_DATASET,
                                  class_names=train.class_names, prompt="a photo of a {name}",
                                  strength=NOISE_STRENGTH, guidance_scale=NOISE_GUIDANCE_SCALE,
                                  num_inference_steps=NOISE_STEPS)
    augmentation = build_augmentation(["real-guidance"], options)
    def make():
        return generate_synthetic_images(train, augmentation, 1, work / "synthetic", seed=0,
                                         options=GenerationOptions(progress=False))

    return make, train


def test_filter_gives_tiny_sd_noise_lower_weights_than_held_out_real_images(trained_filter, noise_generator):
    from semantic_aug.datasets import create_dataset

    _, _, work = trained_filter
    make_noise, train = noise_generator
    filter_model = load_filter(check_layout(work).filter, "cpu")
    val = create_dataset(CHECK_DATASET, split="val", seed=0, data_dir=work / "data", image_size=CHECK_IMAGE_SIZE)

    noise = make_noise()
    noise_weights = filter_scores(filter_model, noise.manifest, train, seed=0, progress=False)["filter_weight"].to_numpy()
    # held-out real images of the same classes, scored the same way: the first few validation images of each class
    held_out = [i for i, label in enumerate(val.labels) if (val.labels[:i] == label).sum() < CHECK_REAL_PER_CLASS]
    real_weights = filter_weights(score_synthetic_images(filter_model, [val.image_paths[i] for i in held_out],
                                                         val.labels[held_out].tolist(),
                                                         scoring_transform(train, filter_model.image_size)))
    print(f"\nnoise weights {np.round(noise_weights, 3).tolist()}")
    print(f"mean filter weight: tiny-SD noise {noise_weights.mean():.3f} (n={len(noise_weights)}), "
          f"held-out real {real_weights.mean():.3f} (n={len(real_weights)})")
    assert len(noise_weights) == len(train) and len(held_out) == CHECK_REAL_PER_CLASS * len(CHECK_CLASSES)
    assert np.ptp(np.concatenate([noise_weights, real_weights])) > 0.1  # not a constant
    assert noise_weights.mean() < real_weights.mean() - 0.25  # clearly lower, and not inverted


def test_a_rerun_reuses_the_scores_in_the_manifest(trained_filter, noise_generator, caplog):
    _, _, work = trained_filter
    make_noise, train = noise_generator
    filter_model = load_filter(check_layout(work).filter, "cpu")
    noise = make_noise()
    first = filter_scores(filter_model, noise.manifest, train, seed=0, progress=False)
    noise.with_filter_scores(first)
    with caplog.at_level("INFO", logger="semantic_aug.stages.filtering"):  # a rerun: the generator reuses its images
        again = make_noise()  # and returns the stored manifest, scores included
        rescored = filter_scores(filter_model, again.manifest, train, seed=0, progress=False)
    np.testing.assert_allclose(rescored["confidence"], first["confidence"])
    assert "scoring" not in caplog.text

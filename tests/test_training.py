"""The training loop of semantic_aug.stages.training on toy colour datasets: the batched transform against torchvision's,
synthetic replacement and filter weights, best-epoch selection, results tables and checkpoint files."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from semantic_aug.core.layout import RunLayout
from semantic_aug.core.classifiers import BACKBONES, Backbone, FewShotClassifier, register_backbone
from semantic_aug.datasets.few_shot_dataset import FolderFewShotDataset, build_transform
from semantic_aug.stages.training import (CACHE_SCALE, RESULTS_COLUMNS, TEST_COLUMNS, FitOptions, TrainingData,
                                   build_image_cache, cache_dataset, evaluate, fit, load_classifier, make_optimizer,
                                   sample_crop_boxes, save_classifier, warp_images)
from semantic_aug.core.utils import UserError
from semantic_aug.stages.synthetic import SyntheticSet

IMAGE_SIZE = 16
COLOURS = {"red": (230, 20, 20), "blue": (20, 20, 230), "green": (20, 230, 20)}
MEAN_COLOUR = "test_mean_colour"




@pytest.fixture(autouse=True, scope="module")
def mean_colour_backbone():
    """A backbone whose features are the image's mean colour, normalised to [-1, 1] (so tests can set the head)."""
    register_backbone(MEAN_COLOUR)(lambda pretrained: Backbone(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
                                                               3, (0.5,) * 3, (0.5,) * 3))
    yield
    BACKBONES.pop(MEAN_COLOUR)


class Colours(FolderFewShotDataset):
    """Solid-colour images (with noise) in `train-val/{red,blue[,green]}`; two images per class in the training pool."""

    class_names = ("red", "blue")
    train_pool_size = 2


class ThreeColours(Colours):
    class_names = ("red", "blue", "green")


def write_images(folder, colour, count, seed, size=(24, 20)):
    """`count` noisy solid-colour PNGs in `folder`; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        pixels = np.clip(np.array(colour) + rng.integers(-15, 16, size=(size[1], size[0], 3)), 0, 255)
        paths.append(folder / f"{i}.png")
        Image.fromarray(pixels.astype(np.uint8)).save(paths[-1])
    return paths


def make_data(root, names=("red", "blue"), per_class=None, swap=False):
    """A `train-val` folder per class; `swap` stores each colour under the other class's name."""
    per_class = per_class or {}
    for i, name in enumerate(names):
        colour = COLOURS[names[1 - i] if swap else name]
        write_images(root / "train-val" / name, colour, per_class.get(name, 6), seed=i)
    return root


@pytest.fixture
def colours(tmp_path):
    return make_data(tmp_path / "colours")


def mean_colour_model(correct_margin: float = 1.0) -> FewShotClassifier:
    """Mean-colour features, head right for red vs blue with the given logit weight."""
    model = FewShotClassifier(MEAN_COLOUR, 2, pretrained=False)
    with torch.no_grad():
        model.head.weight.copy_(torch.tensor([[correct_margin, 0.0, -correct_margin],
                                              [-correct_margin, 0.0, correct_margin]]))
        model.head.bias.zero_()
    return model


def short_fit(model, train, val, **kwargs):
    """`fit` on the CPU for 2 epochs of 3 batches of 8, seed 0; `kwargs` override `FitOptions` fields."""
    options = FitOptions(**{**dict(num_epochs=2, iterations_per_epoch=3, batch_size=8, progress=False), **kwargs})
    return fit(model, train, val, options, device="cpu", generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------------------------------------
# the cache and the batched transform


def test_cache_is_exactly_the_eval_transform(colours):
    dataset = Colours(split="val", data_dir=colours, image_size=IMAGE_SIZE)
    cache = cache_dataset(dataset, "cpu", num_workers=2)
    transform = build_transform("val", IMAGE_SIZE)
    reference = torch.stack([transform(dataset.get_image_by_idx(i)) for i in range(len(dataset))])
    assert cache.images.dtype == torch.uint8 and cache.images.shape == (len(dataset), 3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.equal(cache.images, (reference * 255).round().to(torch.uint8))
    assert cache.sizes[0].tolist() == [20, 24]  # (height, width) of the original file


def test_warp_identity_flip_and_black_rotation_corners():
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    whole = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2)
    same = warp_images(images, whole, torch.ones(2), torch.zeros(2), 8)
    assert torch.allclose(same, images.float() / 255, atol=1e-5)
    mirrored = warp_images(images, whole, -torch.ones(2), torch.zeros(2), 8)
    assert torch.allclose(mirrored, images.flip(-1).float() / 255, atol=1e-5)
    white = torch.full((1, 3, 32, 32), 255, dtype=torch.uint8)
    rotated = warp_images(white, whole[:1], torch.ones(1), torch.tensor([math.radians(15)]), 32)
    assert rotated[0, :, 0, 0].max() == 0 and rotated[0, :, 16, 16].min() == 1  # black corner, untouched centre


def test_crop_boxes_follow_random_resized_crop():
    sizes = torch.tensor([[20.0, 24.0], [300.0, 100.0], [100.0, 1000.0]]).repeat_interleave(200, dim=0)
    boxes = sample_crop_boxes(sizes, torch.Generator().manual_seed(0))
    centre, half = boxes[:, :2], boxes[:, 2:]
    assert ((centre - half) >= -1 - 1e-6).all() and ((centre + half) <= 1 + 1e-6).all()
    area = half[:, 0] * half[:, 1]
    aspect = (half[:, 0] * sizes[:, 1]) / (half[:, 1] * sizes[:, 0])
    found = area >= 0.7 - 1e-6
    assert found[:200].all() and (area <= 1 + 1e-6).all()
    assert ((aspect >= 0.75 - 1e-4) & (aspect <= 4 / 3 + 1e-4)).all()
    # a 10:1 panorama admits no crop of 70% area within the ratio range: torchvision's centred fallback
    assert torch.allclose(boxes[400:, 0], torch.zeros(200)) and torch.allclose(aspect[400:], torch.tensor(4 / 3))
    assert torch.equal(sample_crop_boxes(sizes, torch.Generator().manual_seed(0)), boxes)  # seeded
    assert torch.equal(sample_crop_boxes(sizes, torch.Generator(), random_crop=False)[:, 2:], torch.ones(600, 2))


def sharpness(images: torch.Tensor) -> float:
    """Mean absolute difference of neighbouring pixels (both directions): lower means blurrier."""
    return float((images[..., 1:, :] - images[..., :-1, :]).abs().mean()
                 + (images[..., :, 1:] - images[..., :, :-1]).abs().mean())


@pytest.mark.parametrize("rotate", [False, True])
def test_cached_crops_match_torchvision_on_custom_coco(rotate):
    """The training transform from the cache against the reference's torchvision chain on the decoded image,
    with the same crop boxes, flips and angles, on 24 Custom COCO images at 256 px."""
    import glob
    import random
    from pathlib import Path

    import torchvision.transforms as T
    import torchvision.transforms.functional as TF

    import semantic_aug.datasets.custom_coco as custom_coco

    size = 256
    folder = Path(custom_coco.__file__).parent / "custom_coco" / "train-val"
    files = sorted(glob.glob(str(folder / "*" / "*.jpg")))[::26][:24]
    images = [Image.open(f).convert("RGB") for f in files]
    rng = random.Random(0)
    reference, boxes, flips, angles = [], [], [], []
    for image in images:
        torch.manual_seed(rng.randrange(10**6))
        top, left, height, width = T.RandomResizedCrop.get_params(image, (0.7, 1.0), (3 / 4, 4 / 3))
        flip, degrees = rng.random() < 0.5, rng.uniform(-15, 15) if rotate else 0.0
        view = TF.resized_crop(image, top, left, height, width, [size, size], antialias=True)
        view = TF.rotate(TF.hflip(view) if flip else view, degrees)  # RandomRotation's default: nearest, black
        reference.append(torch.from_numpy(np.array(view)).permute(2, 0, 1).float())
        boxes.append([2 * (left + width / 2) / image.width - 1, 2 * (top + height / 2) / image.height - 1,
                      width / image.width, height / image.height])
        flips.append(-1.0 if flip else 1.0)
        angles.append(math.radians(degrees))
    reference = torch.stack(reference)
    cache = build_image_cache([lambda image=image: image for image in images], size * CACHE_SCALE, "cpu",
                              square=False)
    ours = warp_images(cache.images, torch.tensor(boxes), torch.tensor(flips), torch.tensor(angles), size,
                       cache.stored) * 255
    # measured: 0.16 uint8 levels and 0.997 (a 256² square cache gave 1.8 / 0.81 without and 3.0 / 0.78 with rotation)
    assert (ours - reference).abs().mean() < 0.5
    assert sharpness(ours) / sharpness(reference) == pytest.approx(1.0, abs=0.02)


def test_optimizer_is_adam_with_coupled_l2_weight_decay():
    """The reference's filter optimiser: Adam(lr, weight_decay), which adds weight_decay · w to the gradient."""
    weights = torch.tensor([0.5, -2.0, 3.0], requires_grad=True)
    optimizer = make_optimizer([weights], lr=0.1, weight_decay=0.5, device="cpu")
    gradient = torch.tensor([0.2, 0.1, -0.3])
    expected = weights.detach().clone()
    m = v = torch.zeros(3)
    for step in (1, 2):
        weights.grad = gradient.clone()
        optimizer.step()
        g = gradient + 0.5 * expected  # coupled: the decay enters the moments
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        expected = expected - 0.1 * (m / (1 - 0.9 ** step)) / ((v / (1 - 0.999 ** step)).sqrt() + 1e-8)
    assert type(optimizer) is torch.optim.Adam
    assert torch.allclose(weights.detach(), expected, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------
# synthetic replacement and the filter's modes


def attach_siblings(tmp_path, dataset, colour="green", per_image=2, exist=True):
    """Synthetic siblings for every real image: solid `colour` files (or paths that do not exist)."""
    siblings = {}
    for idx in range(len(dataset)):
        folder = tmp_path / "synthetic" / str(idx)
        siblings[idx] = (write_images(folder, COLOURS[colour], per_image, seed=100 + idx) if exist
                         else [folder / f"missing{i}.png" for i in range(per_image)])
    dataset.set_synthetic_images(SyntheticSet.from_siblings(siblings))
    return siblings


def test_probability_zero_never_reads_a_synthetic_image(colours, tmp_path):
    train = Colours(data_dir=colours, examples_per_class=2, image_size=IMAGE_SIZE, synthetic_probability=0.0)
    attach_siblings(tmp_path, train, exist=False)  # reading one would fail
    data = TrainingData(train, "cpu")
    assert data.num_synthetic_images == 0
    draws = data.draw_epoch(64, 8, torch.Generator().manual_seed(0))
    assert not draws.synthetic.any() and (draws.cache_index < len(train)).all()
    short_fit(FewShotClassifier(MEAN_COLOUR, 2, pretrained=False), train, None)


def test_probability_one_always_shows_a_synthetic_image(colours, tmp_path):
    train = Colours(data_dir=colours, examples_per_class=2, image_size=IMAGE_SIZE, synthetic_probability=1.0)
    siblings = attach_siblings(tmp_path, train)
    data = TrainingData(train, "cpu")
    draws = data.draw_epoch(64, 8, torch.Generator().manual_seed(0))
    assert draws.synthetic.all() and (draws.cache_index >= len(train)).all()
    assert set(draws.cache_index.tolist()) == set(range(len(train), len(train) + 2 * len(siblings)))
    images, labels, _, _ = data.batch(draws.rows(0, 8))
    centre = images[:, :, IMAGE_SIZE // 2, IMAGE_SIZE // 2] * 255
    assert (centre[:, 1] > 150).all() and (centre[:, 0] < 80).all()  # green pixels, whatever the label
    real_of_sibling = torch.div(draws.cache_index[:8] - len(train), 2, rounding_mode="floor")  # 2 siblings each
    assert torch.equal(labels, data.real_labels[real_of_sibling])


def test_half_probability_and_filter_sibling_probabilities(colours, tmp_path):
    train = Colours(data_dir=colours, examples_per_class=2, image_size=IMAGE_SIZE, synthetic_probability=0.5)
    siblings = attach_siblings(tmp_path, train)
    weights = pd.DataFrame({"kept": True, "probability": [0.25, 0.75] * len(siblings), "loss_weight": 1.0})
    train.set_synthetic_images(SyntheticSet.from_siblings(siblings).with_filter_weights(weights))  # the filter's
    data = TrainingData(train, "cpu")
    draws = data.draw_epoch(4000, 8, torch.Generator().manual_seed(0))
    assert draws.synthetic.float().mean() == pytest.approx(0.5, abs=0.03)
    second = (draws.cache_index[draws.synthetic] - len(train)) % 2 == 1
    assert second.float().mean() == pytest.approx(0.75, abs=0.03)
    train.set_synthetic_images(SyntheticSet.from_siblings({0: siblings[0]}))  # threshold mode: the others lost all
    draws = TrainingData(train, "cpu").draw_epoch(400, 8, torch.Generator().manual_seed(0))
    assert (draws.real_index[draws.synthetic] == 0).all()
    assert draws.synthetic[draws.real_index == 0].float().mean() == pytest.approx(0.5, abs=0.15)


def test_loss_weights_scale_the_synthetic_loss(colours, tmp_path):
    train = Colours(data_dir=colours, examples_per_class=2, image_size=IMAGE_SIZE, synthetic_probability=1.0)
    synthetic_set = SyntheticSet.from_siblings(attach_siblings(tmp_path, train))

    def weigh(loss_weight):
        train.set_synthetic_images(synthetic_set.with_filter_weights(
            pd.DataFrame({"kept": True, "probability": np.nan, "loss_weight": [loss_weight] * len(synthetic_set)})))

    model = mean_colour_model()
    before = model.head.weight.detach().clone()
    weigh(0.0)
    short_fit(model, train, None, lr=0.1)
    assert torch.equal(model.head.weight, before)  # every draw synthetic with weight 0: nothing to learn
    weigh(1.0)
    short_fit(model, train, None, lr=0.1)
    assert not torch.equal(model.head.weight, before)


# ----------------------------------------------------------------------------------------------------------
# fit: history, selection, determinism


def test_fit_trains_the_head_and_writes_the_history(colours):
    train = Colours(data_dir=colours, examples_per_class=2, image_size=IMAGE_SIZE)
    val = Colours(split="val", data_dir=colours, image_size=IMAGE_SIZE)
    torch.manual_seed(0)
    model = FewShotClassifier(MEAN_COLOUR, 2, pretrained=False)
    before = model.head.weight.detach().clone()
    result = short_fit(model, train, val, num_epochs=3, lr=0.05)
    assert not torch.equal(model.head.weight.cpu(), before)
    history = result.history
    assert list(history.columns) == RESULTS_COLUMNS and history["idx"].tolist() == list(range(len(history)))
    assert set(history["split"]) == {"Training", "Validation"} and sorted(set(history["epoch"])) == [0, 1, 2]
    assert set(history["metric"]) == {"Loss", "Accuracy", "Loss Red", "Loss Blue", "Accuracy Red", "Accuracy Blue"}
    assert (history["seed"] == 0).all() and (history["examples_per_class"] == 2).all()
    assert len(history) == 3 * 2 * 6 and history["value"].notna().all()
    last_val = history[(history.split == "Validation") & (history.epoch == 2) & (history.metric == "Accuracy")]
    assert last_val["value"].item() == 1.0  # colours are easy
    assert result.timings["train_images"] == 3 * 3 * 8
    torch.manual_seed(0)
    again = short_fit(FewShotClassifier(MEAN_COLOUR, 2, pretrained=False), train, val, num_epochs=3, lr=0.05)
    pd.testing.assert_frame_equal(again.history, history)  # seeded: a rerun repeats exactly


def test_fit_keeps_the_best_epoch_not_the_last(tmp_path):
    # training labels are swapped against validation's, and the head starts right for validation:
    # validation accuracy stays 1 for the first epochs (ties: the first is kept), then collapses
    train = Colours(data_dir=make_data(tmp_path / "swapped", swap=True), examples_per_class=2, image_size=IMAGE_SIZE)
    val = Colours(split="val", data_dir=make_data(tmp_path / "right"), image_size=IMAGE_SIZE)
    model = mean_colour_model(correct_margin=1.0)
    result = short_fit(model, train, val, num_epochs=8, iterations_per_epoch=5, lr=0.05)
    accuracy = result.history.query("split == 'Validation' and metric == 'Accuracy'").set_index("epoch")["value"]
    assert accuracy[0] == accuracy[1] == 1.0 and accuracy[7] == 0.0
    assert result.best_epoch == 0 and result.best_value == 1.0
    assert evaluate(model, val, "cpu").set_index("metric").loc["Mean Accuracy", "value"] == 1.0
    assert torch.equal(result.best_state_dict["head.weight"], model.head.weight)
    assert result.best_state_dict["head.weight"].data_ptr() != model.head.weight.data_ptr()  # a copy


def test_fit_options_reject_impossible_values():
    with pytest.raises(UserError, match="must be at least 1, got 0, 3, 8"):
        FitOptions(num_epochs=0, iterations_per_epoch=3, batch_size=8)
    with pytest.raises(ValueError, match="select_by must be one of"):
        FitOptions(num_epochs=1, iterations_per_epoch=3, batch_size=8, select_by="f1")


@pytest.mark.parametrize("select_by", ["accuracy", "loss"])
def test_ties_keep_the_first_epoch_and_patience_stops(colours, select_by):
    train = Colours(data_dir=colours, examples_per_class=2, image_size=IMAGE_SIZE)
    val = Colours(split="val", data_dir=colours, image_size=IMAGE_SIZE)
    result = short_fit(mean_colour_model(), train, val, num_epochs=10, lr=0.0, select_by=select_by,
                       early_stopping_patience=2)
    assert result.best_epoch == 0 and sorted(set(result.history["epoch"])) == [0, 1, 2]


def test_absent_classes_are_left_out_of_the_mean(tmp_path):
    root = make_data(tmp_path / "three", names=("red", "blue", "green"), per_class={"green": 2})
    train = ThreeColours(data_dir=root, examples_per_class=2, image_size=IMAGE_SIZE)
    val = ThreeColours(split="val", data_dir=root, image_size=IMAGE_SIZE)  # green has no validation image
    model = FewShotClassifier(MEAN_COLOUR, 3, pretrained=False)
    result = short_fit(model, train, val, lr=0.05)
    rows = result.history.query("split == 'Validation' and epoch == 1").set_index("metric")["value"]
    assert np.isnan(rows["Accuracy Green"]) and np.isnan(rows["Loss Green"])
    assert rows["Accuracy"] == pytest.approx((rows["Accuracy Red"] + rows["Accuracy Blue"]) / 2)
    table = evaluate(model, val, "cpu").set_index("metric")["value"]
    assert table["Mean Loss"] == pytest.approx((table["Loss Red"] + table["Loss Blue"]) / 2)


def test_randaugment_and_cutmix_train(colours):
    train = Colours(data_dir=colours, examples_per_class=2, image_size=IMAGE_SIZE, use_randaugment=True)
    data = TrainingData(train, "cpu", use_cutmix=True)
    draws = data.draw_epoch(64, 8, torch.Generator().manual_seed(0))
    # the reference's RandAugment chain is Resize + RandAugment: no crop, flip or rotation
    assert torch.equal(draws.boxes, torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(64, 4))
    assert (draws.flips == 1).all() and (draws.angles == 0).all()
    steps = [type(step).__name__ for step in build_transform("train", IMAGE_SIZE, use_randaugment=True).transforms]
    assert steps == ["Resize", "RandAugment", "ToTensor"]
    images, labels, partner_labels, kept = data.batch(draws.rows(0, 64))
    assert images.shape == (64, 3, IMAGE_SIZE, IMAGE_SIZE) and 0 <= images.min() and images.max() <= 1
    assert (kept == 1).float().mean() == pytest.approx(0.5, abs=0.2) and (kept >= 0).all()
    assert ((kept < 1) & (partner_labels != labels)).any()
    result = short_fit(FewShotClassifier(MEAN_COLOUR, 2, pretrained=False), train, None, use_cutmix=True)
    assert result.history["value"].notna().all()


# ----------------------------------------------------------------------------------------------------------
# evaluate, files


def test_evaluate_table_and_batch_independence(colours):
    val = Colours(split="val", data_dir=colours, image_size=IMAGE_SIZE)
    model = mean_colour_model()
    table = evaluate(model, val, "cpu")
    assert list(table.columns) == TEST_COLUMNS
    assert table["metric"].tolist() == ["Mean Loss", "Mean Accuracy", "Loss Red", "Loss Blue", "Accuracy Red",
                                        "Accuracy Blue"]
    assert table.set_index("metric").loc["Mean Accuracy", "value"] == 1.0
    pd.testing.assert_frame_equal(evaluate(model, val, "cpu", batch_size=1), table, atol=1e-5)


def test_classifier_checkpoint_round_trip(tmp_path):
    model = mean_colour_model(correct_margin=0.3)
    path = tmp_path / "models" / "classifier.pth"
    save_classifier(model, path, {"class_names": ["red", "blue"], "image_size": IMAGE_SIZE})
    loaded = load_classifier(path, "cpu")
    assert loaded.backbone_name == MEAN_COLOUR and not loaded.finetune_backbone and not loaded.training
    assert loaded.class_names == ["red", "blue"] and loaded.metadata["image_size"] == IMAGE_SIZE
    assert torch.equal(loaded.head.weight, model.head.weight)
    with pytest.raises(UserError, match="not found"):
        load_classifier(tmp_path / "missing.pth")
    (tmp_path / "corrupt.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="corrupt"):
        load_classifier(tmp_path / "corrupt.pth")


def test_classifier_file_names_follow_the_reference():
    assert RunLayout("custom_coco", 0, 2).classifier().name == "classifier_custom_coco_0_2.pth"
    name = RunLayout("custom_coco", 1, 4).classifier(strength=[0.7], guidance_scale=[15.0], use_filter=True,
                                                     use_llm=True, use_noise=True).name
    assert name == "classifier_custom_coco_1_4_[0.7]_[15.0]_filter_llm_noise.pth"

"""Datasets: Custom COCO splits and counts, seeded selection, user folders, COCO's largest-object rule, bad inputs."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from semantic_aug.datasets import DATASETS, create_dataset, list_datasets
from semantic_aug.datasets.coco import COCODataset
from semantic_aug.datasets.custom_coco import CUSTOM_COCO_CLASSES, CustomCOCO
from semantic_aug.datasets.focus import FOCUS
from semantic_aug.datasets.few_shot_dataset import FolderFewShotDataset, class_balanced_sampler
from semantic_aug.core.utils import UserError
from semantic_aug.stages.synthetic import SyntheticSet


def write_folder_dataset(root: Path, classes, per_class: int, split="train-val", ext=".jpg", size=(40, 30)):
    rng = np.random.default_rng(0)
    for class_name in classes:
        folder = root / split / class_name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"img {i}{ext}")
    return root


def test_registry_lists_the_three_datasets():
    assert {"custom_coco", "coco", "focus"} <= set(list_datasets())
    assert DATASETS["custom_coco"] is CustomCOCO
    with pytest.raises(UserError, match="unknown dataset 'imagenet'.*custom_coco"):
        create_dataset("imagenet")


def test_custom_coco_splits_and_counts():
    train = CustomCOCO(split="train", examples_per_class=2, seed=0)
    assert train.num_classes == 23 and list(train.class_names) == list(CUSTOM_COCO_CLASSES)
    assert len(train) == 46 and (train.class_counts == 2).all()
    val = CustomCOCO(split="val", seed=0)
    test = CustomCOCO(split="test", seed=0)
    assert len(val) == 618 - 23 * 8  # the shipped copy: train-val minus the 8-image training pools
    assert len(test) == 366 and test.class_counts.min() >= 15
    image, label = train[0]
    assert image.shape == (3, 256, 256) and 0.0 <= image.min() and image.max() <= 1.0
    assert label == train.get_label_by_idx(0) == 0
    assert train.get_metadata_by_idx(0)["name"] == "bench"
    # train and val never share an image
    assert not set(map(str, train.image_paths)) & set(map(str, val.image_paths))


def test_custom_coco_selection_is_seeded():
    first = CustomCOCO(split="train", examples_per_class=4, seed=0).image_paths
    again = CustomCOCO(split="train", examples_per_class=4, seed=0).image_paths
    other = CustomCOCO(split="train", examples_per_class=4, seed=1).image_paths
    assert first == again
    assert first != other
    # smaller epc is a prefix of the larger selection within each class (same permutation)
    two = CustomCOCO(split="train", examples_per_class=2, seed=0).image_paths
    assert set(two) <= set(first)


def test_test_uncommon_context_loads_from_any_folder(tmp_path):
    root = write_folder_dataset(tmp_path, CUSTOM_COCO_CLASSES, per_class=2, split="test_uncommon_context", ext=".png")
    # mixed extensions load too
    Image.new("RGB", (20, 20)).save(root / "test_uncommon_context" / "bench" / "extra.jpeg")
    dataset = CustomCOCO(split="test_uncommon_context", data_dir=root)
    assert dataset.num_classes == 23 and len(dataset) == 47
    assert dataset.class_counts[0] == 3


def test_data_dir_from_environment(tmp_path, monkeypatch):
    write_folder_dataset(tmp_path, FOCUS.class_names, per_class=10)
    monkeypatch.setenv("FOCUS_DIR", str(tmp_path))
    dataset = FOCUS(split="val", seed=0)
    assert len(dataset) == 10 * 2  # 10 classes x (10 - 8)


def test_subclass_for_a_new_dataset_is_short(tmp_path):
    write_folder_dataset(tmp_path, ["cat", "dog"], per_class=9)

    class Pets(FolderFewShotDataset):
        class_names = ("cat", "dog")

    train = Pets(split="train", examples_per_class=3, seed=0, data_dir=tmp_path)
    assert len(train) == 6 and train.class_counts.tolist() == [3, 3]
    assert len(Pets(split="val", data_dir=tmp_path)) == 2


@pytest.mark.parametrize("kwargs, message", [
    ({"data_dir": "/nonexistent/custom_coco"}, "dataset directory does not exist: /nonexistent/custom_coco"),
    ({"split": "validation"}, "unknown split 'validation'"),
    ({"examples_per_class": 9}, "examples_per_class=9 is larger than the training pool of 8"),
    ({"examples_per_class": 0}, "examples_per_class must be at least 1"),
])
def test_bad_arguments_are_one_line_errors(kwargs, message):
    with pytest.raises(UserError, match=message) as error:
        CustomCOCO(**kwargs)
    assert "\n" not in str(error.value)


def test_empty_dataset_folder_and_unknown_class(tmp_path):
    (tmp_path / "train-val").mkdir()
    with pytest.raises(UserError, match="no images for class 'bird'"):
        FOCUS(split="train", data_dir=tmp_path)
    write_folder_dataset(tmp_path, list(FOCUS.class_names) + ["unicorn"], per_class=8)
    with pytest.raises(UserError, match="unknown class folder.*unicorn"):
        FOCUS(split="train", data_dir=tmp_path)


def test_class_smaller_than_examples_per_class(tmp_path):
    write_folder_dataset(tmp_path, ["cat", "dog"], per_class=3)

    class Pets(FolderFewShotDataset):
        class_names = ("cat", "dog")

    with pytest.raises(UserError, match="examples_per_class=4 but class 'cat' has only 3"):
        Pets(split="train", examples_per_class=4, data_dir=tmp_path)


def test_corrupt_and_empty_images_error_or_skip(tmp_path):
    write_folder_dataset(tmp_path, ["cat", "dog"], per_class=4)
    (tmp_path / "train-val" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "train-val" / "dog" / "empty.jpg").write_bytes(b"")

    class Pets(FolderFewShotDataset):
        class_names = ("cat", "dog")

    with pytest.raises(UserError, match=r"(corrupt|empty).*(broken|empty)\.jpg.*--bad-images skip"):
        Pets(split="train", data_dir=tmp_path)
    skipped = Pets(split="train", data_dir=tmp_path, bad_images="skip")
    assert len(skipped) == 8 and not any(p.name in ("broken.jpg", "empty.jpg") for p in skipped.image_paths)


def test_synthetic_probability_mixes_siblings(tmp_path):
    dataset = CustomCOCO(split="train", examples_per_class=1, seed=0, synthetic_probability=1.0, image_size=32)
    red = tmp_path / "red.png"
    Image.new("RGB", (50, 50), (255, 0, 0)).save(red)
    blue = tmp_path / "blue.png"
    Image.new("RGB", (50, 50), (0, 0, 255)).save(blue)
    siblings = SyntheticSet.from_siblings({0: [str(red), str(blue)]})
    dataset.set_synthetic_images(siblings.with_filter_weights(
        pd.DataFrame({"kept": [True, True], "probability": [1.0, 0.0], "loss_weight": [1.0, 1.0]})))
    torch.manual_seed(0)
    for _ in range(5):  # weight 0 for blue: always red
        image, label = dataset[0]
        assert image[0].mean() > 0.9 and image[2].mean() < 0.1 and label == 0
    dataset.synthetic_probability = 0.0
    real, _ = dataset[0]
    assert not (real[0].mean() > 0.9 and real[2].mean() < 0.1)
    # without weights the choice is uniform: both siblings appear
    dataset.synthetic_probability = 1.0
    dataset.set_synthetic_images(siblings)
    assert {dataset.choose_synthetic(0, u) for u in (0.1, 0.9)} == {str(red), str(blue)}
    dataset.set_synthetic_images(None)
    assert dataset.choose_synthetic(0, 0.5) is None


def test_class_balanced_sampler_balances_classes():
    labels = [0] * 90 + [1] * 10
    sampler = class_balanced_sampler(labels, num_samples=4000, generator=torch.Generator().manual_seed(0))
    drawn = np.bincount(np.asarray(labels)[list(sampler)], minlength=2)
    assert abs(drawn[0] / drawn.sum() - 0.5) < 0.05


def write_coco(root: Path):
    """A 3-image COCO tree: image 1 has a large dog and a small cat, image 2 a cat, image 3 no annotation."""
    categories = [{"id": 17, "name": "cat"}, {"id": 18, "name": "dog"}]
    for source in ("train2017", "val2017"):
        (root / source).mkdir(parents=True)
        images, annotations = [], []
        for image_id in (1, 2, 3):
            name = f"{image_id:012d}.jpg"
            Image.new("RGB", (64, 48), (image_id * 40, 0, 0)).save(root / source / name)
            images.append({"id": image_id, "file_name": name, "width": 64, "height": 48})

        def box(annotation_id, image_id, category, w, h):
            return {"id": annotation_id, "image_id": image_id, "category_id": category, "area": float(w * h),
                    "bbox": [0, 0, w, h], "iscrowd": 0, "segmentation": [[0, 0, w, 0, w, h, 0, h]]}

        annotations = [box(10, 1, 17, 8, 8), box(11, 1, 18, 40, 30), box(12, 2, 17, 20, 20)]
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{source}.json").write_text(
            json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return root


def test_coco_label_is_the_largest_object(tmp_path):
    root = write_coco(tmp_path)
    test = COCODataset(split="test", data_dir=root)
    assert test.class_names == ["cat", "dog"]
    assert len(test) == 2  # the unannotated image 3 is skipped
    by_file = {Path(test.get_metadata_by_idx(i)["path"]).name: test.get_label_by_idx(i) for i in range(len(test))}
    assert by_file == {"000000000001.jpg": 1, "000000000002.jpg": 0}  # image 1: the dog (largest area) wins
    mask = test.get_metadata_by_idx([i for i in range(len(test)) if test.get_label_by_idx(i) == 1][0])["mask"]
    assert mask.shape == (48, 64) and mask.sum() > 0
    train = COCODataset(split="train", examples_per_class=1, seed=0, data_dir=root)
    assert train.class_counts.tolist() == [1, 1]


def test_coco_selection_advances_one_generator_class_by_class(tmp_path):
    """The reference drew every class's permutation from one default_rng(seed), in class order."""
    categories = [{"id": 17, "name": "cat"}, {"id": 18, "name": "dog"}]
    (tmp_path / "train2017").mkdir()
    (tmp_path / "annotations").mkdir()
    images, annotations = [], []
    for image_id in range(1, 13):  # odd ids: cats, even ids: dogs
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": 8, "height": 8})
        annotations.append({"id": 100 + image_id, "image_id": image_id, "category_id": 17 if image_id % 2 else 18,
                            "area": 4.0, "bbox": [0, 0, 2, 2], "iscrowd": 0,
                            "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2]]})
    (tmp_path / "annotations" / "instances_train2017.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    per_class = [[1, 3, 5, 7, 9, 11], [2, 4, 6, 8, 10, 12]]
    fresh_differs = False
    for seed in range(4):
        rng = np.random.default_rng(seed)
        expected = [[ids[i] for i in rng.permutation(len(ids))][:2] for ids in per_class]
        fresh = [[ids[i] for i in np.random.default_rng(seed).permutation(len(ids))][:2] for ids in per_class]
        fresh_differs |= fresh[1] != expected[1]
        train = COCODataset(split="train", examples_per_class=2, seed=seed, data_dir=tmp_path)
        assert train.image_ids == expected[0] + expected[1]
    assert fresh_differs  # a generator per class would pick other dogs


def test_coco_missing_folder_is_an_error(tmp_path, monkeypatch):
    monkeypatch.delenv("COCO_DIR", raising=False)
    with pytest.raises(UserError, match="COCO needs its data folder"):
        COCODataset(split="train")
    with pytest.raises(UserError, match="COCO file or folder not found"):
        COCODataset(split="train", data_dir=tmp_path)


def test_shipped_copy_is_inside_the_package(repo_root):
    assert Path(CustomCOCO.default_data_dir).resolve().is_relative_to(repo_root)
    assert shutil.disk_usage(CustomCOCO.default_data_dir)  # exists


def test_focus_create_splits_is_seeded_and_loads(tmp_path):
    from semantic_aug.datasets.focus_create_splits import main, parse_args

    raw = tmp_path / "raw"
    rng = np.random.default_rng(0)
    for class_name in FOCUS.class_names:
        for setting, count in (("day", 12), ("snow", 3)):
            folder = raw / f"{class_name}-{setting}"
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.jpeg")
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        main(parse_args(["--source", str(raw), "--output", str(tmp_path / name), "--seed", str(seed),
                         "--train-val-per-class", "10", "--uncommon-settings", "snow"]))
    listing = {name: sorted(p.name for p in (tmp_path / name / "test" / "bird").iterdir()) for name in "abc"}
    assert listing["a"] == listing["b"] != listing["c"]
    assert len(listing["a"]) == 2
    uncommon = FOCUS(split="test_uncommon_context", data_dir=tmp_path / "a")
    assert len(uncommon) == 30 and set(uncommon.class_counts) == {3}
    assert len(FOCUS(split="train", examples_per_class=8, data_dir=tmp_path / "a")) == 80

"""Synthetic image generation on the tiny SD: the set and its manifest, the cache (reuse, resume, invalidation),
batch-size independence, one-line errors, and the split of the work under `accelerate launch`."""

import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import accelerate_launch
from semantic_aug.core.embeddings import embedding_noise, save_tokens, token_name
from semantic_aug.datasets.few_shot_dataset import FolderFewShotDataset
from semantic_aug.stages.prompts import write_prompt_csv
from semantic_aug.stages.synthetic import (MANIFEST_COLUMNS, AugmentationOptions, GenerationOptions, SyntheticSet,
                                           build_augmentation, cache_settings, generate_synthetic_images,
                                           plan_synthetic_images)
from semantic_aug.core.utils import UserError

CLASSES = ("car", "carrot", "cell_phone")  # `car` is a prefix of `carrot`: token names must match exactly
REAL_SIZES = ((40, 30), (33, 57))  # (width, height) of each class's two real images
NUM_SYNTHETIC = 3
STEPS = 4  # scheduler steps; strength 0.5 runs 2 of them
STDS = (0.005, 0.01, 0.025)
PROMPTS = ("a photo of a {name}", "a {name} in the snow")
PIXEL_TOLERANCE = 2  # uint8 levels: float rounding of different batch compositions
QUIET = GenerationOptions(progress=False)
BATCH_4 = GenerationOptions(batch_size=4, progress=False)


class ToyDataset(FolderFewShotDataset):
    class_names = CLASSES
    train_pool_size = 2




@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    rng = np.random.default_rng(0)
    for name in CLASSES:
        folder = root / "data" / "train-val" / name
        folder.mkdir(parents=True)
        for i, (width, height) in enumerate(REAL_SIZES):
            Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    generator = torch.Generator().manual_seed(0)
    tokens = {token_name(name): torch.randn(32, generator=generator) for name in CLASSES}  # tiny text width 32
    save_tokens(embedding_noise(tokens, STDS, seed=0), root / "tokens.pt")
    write_prompt_csv({name: list(PROMPTS) for name in CLASSES}, root / "prompts.csv")
    return SimpleNamespace(root=root, data=root / "data", tokens=root / "tokens.pt", prompts=root / "prompts.csv")


def build(toy, aug=("textual-inversion",), **overrides):
    options = dict(model_path="tiny", embed_path=toy.tokens, dataset_name="toy", class_names=CLASSES,
                   prompt="a photo of a {name}", strength=0.5, guidance_scale=7.5, mask=[0], inverted=[0], probs=None,
                   compose="parallel", use_embedding_noise=True, use_generated_prompts=True, prompt_path=toy.prompts,
                   device="cpu", dtype=torch.float32, num_inference_steps=STEPS)
    options.update(overrides)
    run = {key: options.pop(key) for key in ("device", "acceleration", "load_weights") if key in options}
    return build_augmentation(list(aug), AugmentationOptions(**options), **run)


@pytest.fixture(scope="module")
def augmentation(toy, tiny_model_path):
    return build(toy)


@pytest.fixture(scope="module")
def dataset(toy):
    return ToyDataset(split="train", examples_per_class=2, seed=0, data_dir=toy.data)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, dataset, augmentation):
    folder = tmp_path_factory.mktemp("run") / "synthetics"
    synthetic_set = generate_synthetic_images(dataset, augmentation, NUM_SYNTHETIC, folder, seed=0, options=BATCH_4)
    return folder, synthetic_set.manifest


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def mtimes(folder: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")}


def copy_run(first_run, tmp_path) -> Path:
    folder = tmp_path / "synthetics"
    shutil.copytree(first_run[0], folder)
    return folder


def test_num_synthetic_images_per_real_image_with_a_complete_manifest(first_run, dataset):
    folder, manifest = first_run
    expected = {f"label_{dataset.labels[i]}-{i}-{n}.png" for i in range(len(dataset)) for n in range(NUM_SYNTHETIC)}
    assert {p.name for p in folder.glob("*.png")} == expected
    assert list(manifest.columns) == MANIFEST_COLUMNS and len(manifest) == len(expected)
    on_disk = pd.read_csv(folder / "manifest.csv", keep_default_na=False)
    assert on_disk.astype(str).equals(manifest.astype(str))
    siblings = SyntheticSet.load(folder).siblings()
    assert sorted(siblings) == list(range(len(dataset)))
    for idx, images in siblings.items():
        paths = images.paths
        assert images.probabilities is None and images.loss_weights is None  # no filter: uniform, unweighted
        label = dataset.labels[idx]
        assert [Path(p).name for p in paths] == [f"label_{label}-{idx}-{n}.png" for n in range(NUM_SYNTHETIC)]
        real_size = dataset.get_image_by_idx(idx).size
        assert all(Image.open(p).size == real_size for p in paths)  # back at the real image's size
    for name in CLASSES:  # DIAGen (a) + (b): each class visits every noisy token and every prompt
        rows = manifest[manifest.class_name == name]
        assert set(rows.token) == {token_name(name)} | {f"<{name}_{std}>" for std in STDS}
        assert {p.replace(t, "{name}") for p, t in zip(rows.prompt, rows.token)} == set(PROMPTS)
    assert manifest.seed.nunique() == len(manifest)
    assert json.loads((folder / "settings.json").read_text())["settings"]["augmentation"]["strength"] == 0.5


def test_rerun_reuses_the_cache(first_run, dataset, augmentation, monkeypatch):
    folder, manifest = first_run
    before = mtimes(folder) | {"manifest.csv": (folder / "manifest.csv").stat().st_mtime_ns}

    def no_generation(*args, **kwargs):
        raise AssertionError("a cached image was generated again")

    monkeypatch.setattr(augmentation.sampler, "img2img", no_generation)
    again = generate_synthetic_images(dataset, augmentation, NUM_SYNTHETIC, folder, seed=0, options=BATCH_4)
    assert again.manifest.equals(manifest)
    assert mtimes(folder) | {"manifest.csv": (folder / "manifest.csv").stat().st_mtime_ns} == before


def test_interrupted_run_resumes_to_the_same_images(first_run, dataset, augmentation, tmp_path):
    folder = copy_run(first_run, tmp_path)
    lost = sorted(folder.glob("*.png"))[::5]
    originals = {p.name: pixels(p) for p in lost}
    for path in lost:
        path.unlink()
    (folder / "manifest.csv").unlink()  # killed before the manifest was written
    (folder / ".label_0-0-0.png.x1y2.png.tmp").write_bytes(b"half a png")  # an atomic write cut short
    kept = {name: mtime for name, mtime in mtimes(folder).items()}
    manifest = generate_synthetic_images(dataset, augmentation, NUM_SYNTHETIC, folder, seed=0, options=BATCH_4).manifest
    assert not list(folder.glob("*.tmp"))
    assert {p.name for p in folder.glob("*.png")} == {p.name for p in first_run[0].glob("*.png")}
    assert {name: mtime for name, mtime in mtimes(folder).items() if name in kept} == kept  # only the lost were made
    for name, original in originals.items():
        assert np.abs(pixels(folder / name) - original).max() <= PIXEL_TOLERANCE
    assert manifest.drop(columns="path").equals(first_run[1].drop(columns="path"))


def test_changed_strength_invalidates_the_cache(first_run, dataset, augmentation, tmp_path, monkeypatch):
    folder = copy_run(first_run, tmp_path)
    monkeypatch.setattr(augmentation, "strength", 0.75)
    message = r"other settings \(augmentation.strength: 0.5 -> 0.75\).*--overwrite-synthetic"
    with pytest.raises(UserError, match=message):
        generate_synthetic_images(dataset, augmentation, NUM_SYNTHETIC, folder, seed=0, options=QUIET)
    generate_synthetic_images(dataset, augmentation, NUM_SYNTHETIC, folder, seed=0,
                              options=GenerationOptions(batch_size=8, progress=False, overwrite=True))
    old = tmp_path / "synthetics.old-1"
    assert mtimes(old) == mtimes(first_run[0])  # the old images were moved aside, not deleted or mixed in
    assert json.loads((folder / "settings.json").read_text())["settings"]["augmentation"]["strength"] == 0.75
    assert len(list(folder.glob("*.png"))) == len(first_run[1])
    changed = [np.abs(pixels(folder / p.name) - pixels(p)).max() for p in first_run[0].glob("*.png")]
    assert min(changed) > PIXEL_TOLERANCE


def test_a_folder_of_unknown_images_is_refused(dataset, augmentation, tmp_path):
    folder = tmp_path / "reference_output"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "label_0-0-0.png")
    with pytest.raises(UserError, match="not made by this version"):
        generate_synthetic_images(dataset, augmentation, NUM_SYNTHETIC, folder, seed=0, options=QUIET)


def test_same_images_at_batch_sizes_1_and_4(first_run, dataset, augmentation, tmp_path):
    folder = tmp_path / "batch1"
    generate_synthetic_images(dataset, augmentation, NUM_SYNTHETIC, folder, seed=0,
                              options=GenerationOptions(batch_size=1, progress=False))
    for path in first_run[0].glob("*.png"):
        assert np.abs(pixels(folder / path.name) - pixels(path)).max() <= PIXEL_TOLERANCE


def test_no_synthetic_images_makes_nothing(dataset, augmentation, tmp_path):
    manifest = generate_synthetic_images(dataset, augmentation, 0, tmp_path / "none", seed=0, options=QUIET).manifest
    assert len(manifest) == 0 and list(manifest.columns) == MANIFEST_COLUMNS and not (tmp_path / "none").exists()


def test_the_weightless_augmentation_plans_the_same_set(dataset, augmentation, toy):
    """Built from the model's configs alone, the augmentation gives the fingerprint and the plan of the loaded one."""
    planner = build(toy, load_weights=False)
    assert all(p.device.type == "meta" for p in planner.sampler.unet.parameters())  # no weight was read
    assert cache_settings(dataset, planner, NUM_SYNTHETIC, 0) == cache_settings(dataset, augmentation, NUM_SYNTHETIC, 0)
    planned, choices = plan_synthetic_images(dataset, planner, NUM_SYNTHETIC, "folder", 0)
    loaded, loaded_choices = plan_synthetic_images(dataset, augmentation, NUM_SYNTHETIC, "folder", 0)
    assert planned.equals(loaded) and choices == loaded_choices
    for dtype in (torch.bfloat16,):  # the text encoder's config records the dtype, and so does the fingerprint
        assert (build(toy, load_weights=False, dtype=dtype).sampler.settings() ==
                build(toy, dtype=dtype).sampler.settings())


@pytest.mark.parametrize("model", ["tiny-sd2", "tiny-sdxl"])
def test_the_weightless_sampler_has_the_loaded_settings_in_every_family(toy, model):
    """SD 2.x and SDXL (two encoders, the pipeline's flags) give the fingerprint of the loaded model too."""
    loaded = build(toy, aug=("real-guidance",), model_path=model).sampler
    planner = build(toy, aug=("real-guidance",), model_path=model, load_weights=False).sampler
    assert all(p.device.type == "meta" for p in planner.unet.parameters())
    assert planner.settings() == loaded.settings()
    assert (planner.text_encoder_2 is None) == (model != "tiny-sdxl")


def no_model():
    raise AssertionError("the diffusion model was loaded")


def test_a_complete_set_is_reused_without_loading_the_model(first_run, dataset, toy):
    folder, manifest = first_run
    again = generate_synthetic_images(dataset, build(toy, load_weights=False), NUM_SYNTHETIC, folder, seed=0,
                                      options=QUIET, generator=no_model)
    assert again.manifest.equals(manifest)
    assert again.fingerprint == json.loads((folder / "settings.json").read_text())["fingerprint"]


def test_a_set_linked_from_a_folder_of_the_same_settings_loads_no_model(first_run, dataset, toy, tmp_path):
    folder, manifest = first_run
    linked = generate_synthetic_images(dataset, build(toy, load_weights=False), NUM_SYNTHETIC, tmp_path / "other",
                                       seed=0, options=GenerationOptions(progress=False, shared_dirs=[folder]),
                                       generator=no_model)
    assert linked.manifest.drop(columns="path").equals(manifest.drop(columns="path"))
    for path in folder.glob("*.png"):
        assert (tmp_path / "other" / path.name).read_bytes() == path.read_bytes()
    (tmp_path / "other" / path.name).unlink()  # one image that no folder holds: now the model is needed
    with pytest.raises(AssertionError, match="was loaded"):
        generate_synthetic_images(dataset, build(toy, load_weights=False), NUM_SYNTHETIC, tmp_path / "other", seed=0,
                                  options=QUIET, generator=no_model)


@pytest.mark.parametrize("overrides, message", [
    (dict(embed_path="no/such/tokens.pt"), "token file not found: no/such/tokens.pt"),
    (dict(strength=0.0), r"--strength must lie in \(0, 1\], got 0.0"),
    (dict(strength=[1.5]), r"--strength must lie in \(0, 1\], got 1.5"),
    (dict(strength=None), "--strength is required"),
    (dict(guidance_scale=None), "--guidance-scale is required"),
    (dict(guidance_scale=0.5), "--guidance-scale must be at least 1"),
    (dict(mask=[0, 1]), "--mask has 2 values for 1 --aug"),
])
def test_bad_inputs_are_one_line_errors(toy, overrides, message):
    with pytest.raises(UserError, match=message) as error:
        build(toy, **overrides)
    assert "\n" not in str(error.value)


def test_prompt_csv_without_a_class_is_a_one_line_error(toy, tmp_path):
    partial = tmp_path / "partial.csv"
    write_prompt_csv({"car": list(PROMPTS), "carrot": list(PROMPTS)}, partial)
    with pytest.raises(UserError, match="no prompts for class\\(es\\) cell_phone") as error:
        build(toy, prompt_path=partial)
    assert "\n" not in str(error.value)


WORKER = textwrap.dedent("""
    import json, sys
    import torch
    from accelerate import Accelerator
    sys.path.insert(0, sys.argv[1])
    import test_synthetic as t
    from types import SimpleNamespace

    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    root = t.Path(sys.argv[2])
    toy = SimpleNamespace(data=root / "data", tokens=root / "tokens.pt", prompts=root / "prompts.csv")
    augmentation = t.build(toy, device=accelerator.device)
    made = []
    generate = augmentation.generate
    def recording(images, metadata, choices, seeds):
        made.extend(seeds)
        return generate(images, metadata, choices, seeds)
    augmentation.generate = recording
    dataset = t.ToyDataset(split="train", examples_per_class=2, seed=0, data_dir=toy.data)
    t.generate_synthetic_images(dataset, augmentation, t.NUM_SYNTHETIC, sys.argv[3], seed=0, options=t.BATCH_4,
                                accelerator=accelerator)
    (t.Path(sys.argv[3]) / f"made-{accelerator.process_index}.json").write_text(json.dumps(made))
""")


def test_two_processes_split_the_work(first_run, toy, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    folder = tmp_path / "two_processes"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    launch = accelerate_launch(2)
    result = subprocess.run(launch + [str(script), str(Path(__file__).parent), str(toy.root), str(folder)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    made = [json.loads((folder / f"made-{rank}.json").read_text()) for rank in range(2)]
    assert made[0] and made[1] and not set(made[0]) & set(made[1])  # both worked, nothing twice
    assert sorted(made[0] + made[1]) == sorted(first_run[1].seed)  # nothing missing
    assert {p.name for p in folder.glob("*.png")} == {p.name for p in first_run[0].glob("*.png")}
    for path in first_run[0].glob("*.png"):
        assert np.abs(pixels(folder / path.name) - pixels(path)).max() <= PIXEL_TOLERANCE
    manifest = pd.read_csv(folder / "manifest.csv", keep_default_na=False)
    assert manifest.drop(columns="path").astype(str).equals(first_run[1].drop(columns="path").astype(str))

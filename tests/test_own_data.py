"""Your own data: `--dataset folder` on a 3-class folder of mixed formats, the plugin routes, the small-class check,
caches keyed by the data, eval_on_testset from the checkpoint, and README's "Your own data" commands run as written."""

import logging
import re
import shlex
import shutil
import sys
from glob import glob
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import REPO_ROOT, import_script
from semantic_aug.datasets import check_dataset_arguments, create_dataset, dataset_key
from semantic_aug.datasets.folder import FolderDataset
from semantic_aug.stages.synthetic import dataset_settings
from semantic_aug.core.utils import UserError

CLASSES = ("big cat", "dog", "tree")  # sorted, as the folder dataset orders them
EXIF_ORIENTATION = 0x0112
ROTATED_90 = 6  # EXIF: the camera was turned; the stored pixels must be rotated 90° to be upright
STORED_SIZE = (40, 24)  # the rotated JPEG's stored width x height; it loads as 24 x 40


def noise(size, seed, channels=3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (size[1], size[0], channels), dtype=np.uint8)


def write_class(folder: Path, count: int, seed: int) -> None:
    """`count` images in every format the README promises, each a different size (so the fingerprint sees them)."""
    folder.mkdir(parents=True, exist_ok=True)
    writers = [
        lambda i: Image.fromarray(noise((32, 24 + i), seed + i)).save(folder / f"{i}.jpg"),
        lambda i: Image.fromarray(noise((30, 20 + i), seed + i)).save(folder / f"{i}.PNG"),
        lambda i: Image.fromarray(noise((28, 20 + i), seed + i)).save(folder / f"{i}.webp"),
        lambda i: Image.fromarray(noise((26, 20 + i), seed + i)).save(folder / f"{i}.bmp"),
        lambda i: Image.fromarray(noise((24, 20 + i), seed + i)).save(folder / f"{i}.TIFF"),
        lambda i: Image.fromarray(noise((24, 20 + i), seed + i)[..., 0]).save(folder / f"{i}_gray.jpeg"),
        lambda i: Image.fromarray(noise((24, 20 + i), seed + i, 4), "RGBA").save(folder / f"{i}_alpha.png"),
        lambda i: Image.fromarray(noise((24, 20 + i), seed + i, 4), "CMYK").save(folder / f"{i}_cmyk.jpg"),
    ]
    for i in range(count):
        writers[i % len(writers)](i)


def write_own_data(root: Path, per_class: int = 9, seed: int = 0) -> Path:
    for label, name in enumerate(CLASSES):
        write_class(root / "train-val" / name, per_class, seed + 100 * label)
        write_class(root / "test" / name, 2, seed + 100 * label + 50)
    (root / "train-val" / "dog" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "train-val" / "dog" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0 not an image")
    (root / "train-val" / "tree" / "notes.txt").write_text("taken in the park\n")
    rotated = Image.fromarray(noise(STORED_SIZE, seed + 7))
    exif = rotated.getexif()
    exif[EXIF_ORIENTATION] = ROTATED_90
    rotated.save(root / "train-val" / "big cat" / "phone.jpg", exif=exif)
    return root


@pytest.fixture(scope="module")
def own_data(tmp_path_factory) -> Path:
    return write_own_data(tmp_path_factory.mktemp("own") / "my_data")


def test_folder_dataset_reads_every_format_with_exif_and_one_rgb_rule(own_data, caplog):
    with caplog.at_level(logging.INFO):
        val = create_dataset("folder", split="val", seed=0, data_dir=own_data)
    assert list(val.class_names) == list(CLASSES)
    assert val.class_counts.tolist() == [2, 1, 1]  # 10, 9 and 9 images minus the pools of 8
    skipped = [r.getMessage() for r in caplog.records if "not images" in r.getMessage()]
    assert len(skipped) == 1 and "skipped 3 file(s)" in skipped[0]  # .DS_Store, Thumbs.db, notes.txt

    pool = create_dataset("folder", split="train", seed=0, data_dir=own_data)
    every = {p.name: pool.get_image_by_idx(i) for i, p in enumerate(pool.image_paths)}
    every.update({p.name: val.get_image_by_idx(i) for i, p in enumerate(val.image_paths)})
    assert {".jpg", ".png", ".webp", ".bmp", ".tiff", ".jpeg"} <= {Path(n).suffix.lower() for n in every}
    assert all(image.mode == "RGB" for image in every.values())
    assert every["phone.jpg"].size == (STORED_SIZE[1], STORED_SIZE[0])  # EXIF orientation 6 applied
    gray = np.asarray(every["5_gray.jpeg"])
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    # alpha is composited onto white: a fully transparent pixel loads white
    transparent = own_data.parent / "transparent.png"
    Image.new("RGBA", (4, 4), (10, 20, 30, 0)).save(transparent)
    from semantic_aug.core.utils import load_image

    assert load_image(transparent).getpixel((0, 0)) == (255, 255, 255)


def test_folder_classes_must_agree_and_give_distinct_tokens(tmp_path):
    root = write_own_data(tmp_path / "data", per_class=2)
    shutil.rmtree(root / "test" / "tree")
    with pytest.raises(UserError, match=r"test must hold the class folders .* lacks tree") as error:
        FolderDataset(split="test", data_dir=root)
    assert "\n" not in str(error.value)
    (root / "test" / "tree").mkdir()
    (root / "train-val" / "big_cat").mkdir()
    with pytest.raises(UserError, match=r"'big cat' and 'big_cat' .* both give the token <big_cat>"):
        FolderDataset(split="test", data_dir=root)
    only_webp = tmp_path / "webp" / "train-val" / "cat"
    only_webp.mkdir(parents=True)
    (only_webp / "readme.txt").write_text("no images here")
    with pytest.raises(UserError, match=r"no images for class 'cat'.*holds no readable image \(read: .jpg .*.webp"):
        FolderDataset(split="train", data_dir=tmp_path / "webp")


@pytest.mark.parametrize("script, extra", [
    ("train_classifier.py", ["--num-synthetic", "0", "--classifier-backbone", "efficientnet_lite0"]),
    ("train_filter.py", []),
    ("fine_tune.py", ["--pretrained_model_name_or_path", "tiny"]),
])
def test_a_too_small_class_fails_before_any_work(tmp_path, script, extra, script_runner):
    root = write_own_data(tmp_path / "data", per_class=9)
    for extra_image in sorted((root / "train-val" / "dog").glob("[3-8]*")):  # dog keeps 0, 1, 2 (+ Thumbs.db)
        extra_image.unlink()
    result = script_runner(script, "--dataset", "folder", "--data-dir", root, "--seeds", "0",
                           "--examples-per-class", "2", *extra, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: class 'dog' has 3 images in ") and "--train-pool-size 2 or less" in last
    assert not (tmp_path / "RESULTS").exists() and not (tmp_path / "models").exists()
    assert not list((tmp_path / "fine-tuned").glob("*"))  # fine_tune.py made only its (empty) output folder
    # the fix it names works: a pool of 2 leaves dog one validation image
    assert create_dataset("folder", split="val", data_dir=root, train_pool_size=2).class_counts.tolist() == [8, 1, 7]


def test_two_folders_with_the_same_classes_share_no_cache_and_a_copy_shares_all(tmp_path, monkeypatch):
    first = write_own_data(tmp_path / "first", seed=0)
    second = write_own_data(tmp_path / "second", seed=1)
    for image in (second / "train-val" / "dog").glob("0.jpg"):  # same names, other pixels and sizes
        Image.fromarray(noise((50, 50), 3)).save(image)
    copy = tmp_path / "copy"
    shutil.copytree(first, copy)
    keys = [dataset_key("folder", folder) for folder in (first, second, copy)]
    assert re.fullmatch(r"folder-[0-9a-f]{8}", keys[0]) and keys[0] != keys[1] and keys[0] == keys[2]

    import importlib.util

    spec = importlib.util.spec_from_file_location("train_classifier_own_data", REPO_ROOT / "train_classifier.py")
    train_classifier = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, train_classifier)  # dataclasses look their module up there
    spec.loader.exec_module(train_classifier)
    paths = []
    for folder in (first, second, copy):
        args = train_classifier.parse_args(["--dataset", "folder", "--data-dir", str(folder), "--method", "diagen",
                                            "--use-embedding-noise", "1"])
        check_dataset_arguments(args, [2])
        run = train_classifier.plan_run(args, 0, 2)
        paths.append({run.embed_path, run.layout.synthetic_dir, run.model_path, run.layout.logdir})
    assert not paths[0] & paths[1] and paths[0] == paths[2]  # tokens, synthetic images, models: all apart
    assert all(keys[0] in str(path) for path in paths[0])

    # the synthetic set's settings (its cache key) hold the fingerprint too, so even one --synthetic-dir for both
    # folders is refused rather than reused; the copy's settings are the original's
    settings = [dataset_settings(create_dataset("folder", split="train", examples_per_class=2, data_dir=folder))
                for folder in (first, second, copy)]
    assert settings[0]["data_fingerprint"] != settings[1]["data_fingerprint"] and settings[0] == settings[2]

    # the runner's "finished" test looks at the fingerprinted paths
    from semantic_aug.runner.experiments import plan_jobs

    config_path = tmp_path / "own.yaml"
    config_path.write_text(f"dataset: folder\ndata_dir: {first}\nseeds: [0]\nexamples_per_class: [2]\n"
                           f"methods:\n  da-fusion: {{aug: textual-inversion}}\n")
    from semantic_aug.runner.experiments import load_config

    outputs = [{str(p) for job in plan_jobs({**load_config(config_path), "data_dir": str(folder)}) for p in job.outputs}
               for folder in (first, second)]
    assert not outputs[0] & outputs[1] and any(keys[0] in p for p in outputs[0])


def test_plugin_routes_find_a_dataset_module_outside_the_checkout(tmp_path, repo_root, script_runner):
    assert repo_root not in tmp_path.parents
    data = write_own_data(tmp_path / "pets_data")
    (tmp_path / "my_pets.py").write_text(
        "from semantic_aug.datasets import register_dataset\n"
        "from semantic_aug.datasets.few_shot_dataset import FolderFewShotDataset\n\n\n"
        "@register_dataset('pets')\n"
        "class Pets(FolderFewShotDataset):\n"
        f"    class_names = {CLASSES!r}\n")
    # 1. --dataset-module with a file: a real run, end to end
    result = script_runner("train_classifier.py", "--dataset-module", tmp_path / "my_pets.py", "--dataset", "pets",
                           "--data-dir", data, "--seeds", "0", "--examples-per-class", "1", "--num-synthetic", "0",
                           "--classifier-backbone", "efficientnet_lite0", "--image-size", "32",
                           "--iterations-per-epoch", "1", "--num-epochs", "1", "--eval_on_test_set", "test",
                           "--device", "cpu", cwd=tmp_path, check=True)
    # a plugin dataset with no default data: its files carry the data fingerprint
    found = glob(str(tmp_path / "RESULTS/pets-*_1epc/baseline/test/test_results_pets-*_0_1.csv"))
    assert len(found) == 1 and re.search(r"test_results_pets-[0-9a-f]{8}_0_1\.csv$", found[0])
    table = pd.read_csv(found[0])
    assert {f"Accuracy {name.title()}" for name in CLASSES} <= set(table["metric"])
    # 2. $DIAGEN_DATASET_MODULES with a dotted module, imported from the working directory
    result = script_runner("generate_prompts.py", "--help", cwd=tmp_path, env={"DIAGEN_DATASET_MODULES": "my_pets"},
                           check=True)
    assert "pets" in re.search(r"--dataset \{([^}]*)\}", result.stdout)[1].split(",")
    # 3. an installed package's entry point (a dist-info on the path, as pip leaves it)
    site = tmp_path / "site"
    (site / "pets_plugin-1.0.dist-info").mkdir(parents=True)
    (site / "pets_plugin-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: pets-plugin\n"
                                                                  "Version: 1.0\n")
    (site / "pets_plugin-1.0.dist-info" / "entry_points.txt").write_text("[diagen.datasets]\npets = my_pets\n")
    shutil.copy(tmp_path / "my_pets.py", site / "my_pets.py")
    result = script_runner("eval_on_testset.py", "--help", cwd=repo_root, env={"PYTHONPATH": f"{repo_root}:{site}"},
                           check=True)
    assert "pets" in re.search(r"--dataset \{([^}]*)\}", result.stdout)[1].split(",")
    result = script_runner("eval_on_testset.py", "--help", "--dataset-module", tmp_path / "missing.py")
    assert result.returncode == 2 and result.stderr.startswith("error: dataset module not found")


def test_eval_takes_the_run_from_the_checkpoint(own_data, tmp_path, monkeypatch):
    from semantic_aug.core.classifiers import FewShotClassifier
    from semantic_aug.stages.training import save_classifier

    eval_script = import_script("eval_on_testset")
    key = dataset_key("folder", own_data)
    model = tmp_path / "classifier.pth"
    save_classifier(FewShotClassifier("efficientnet_lite0", len(CLASSES), pretrained=False), model,
                    {"class_names": list(CLASSES), "image_size": 32, "dataset": key, "seed": 1,
                     "examples_per_class": 2, "train_pool_size": 8, "data_dir": str(own_data)})

    def run(*flags):
        monkeypatch.setattr(sys, "argv", ["eval_on_testset.py", "--model", str(model), "--logdir", str(tmp_path),
                                          "--device", "cpu", *map(str, flags)])
        eval_script.main(eval_script.parse_args())

    run("--split", "val")  # no --dataset, --data-dir, --seed or --epc: all from the checkpoint
    assert (tmp_path / f"evaluation_on_{key}_val_1_2.csv").is_file()
    assert not list(tmp_path.glob("*_0_0.csv"))
    run("--split", "test", "--dataset", "folder", "--seed", "1", "--epc", "2", "--overwrite")  # flags that confirm
    assert (tmp_path / f"evaluation_on_{key}_test_1_2.csv").is_file()
    with pytest.raises(UserError, match=r"--seed 0 contradicts checkpoint .* seed 1; leave --seed out"):
        run("--split", "val", "--seed", "0")
    with pytest.raises(UserError, match=r"--dataset custom_coco contradicts"):
        run("--split", "val", "--dataset", "custom_coco")


# ----------------------------------------------------------------------------------------------------------
# README's "Your own data": its commands, run as written on the tiny model with fewer steps appended

FEWER_STEPS = {  # flags the test appends (argparse keeps the last value), so the section runs in about a minute
    "fine_tune.py": ["--max_train_steps", "2"],
    "train_filter.py": ["--iterations-per-epoch", "2", "--max-epochs", "1", "--image-size", "32"],
    "train_classifier.py": ["--iterations-per-epoch", "2", "--num-epochs", "1", "--image-size", "32",
                            "--num-inference-steps", "3"],
}


def readme_section_blocks(readme: Path, title: str = "## Your own data") -> list[list[list[str]]]:
    """The commands of each fenced bash block of the README section, as argument lists."""
    text = readme.read_text()
    section = text[text.index(title + "\n"):]
    section = section[:section.index("\n## ", len(title))]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [[shlex.split(line) for line in block.replace("\\\n", " ").splitlines()
             if line.strip() and not line.lstrip().startswith("#")] for block in blocks]


def test_readme_own_data_section_runs_as_written(tmp_path, repo_root, script_runner):
    cpu_block, gpu_block = readme_section_blocks(repo_root / "README.md")
    scripts = [command[1] for command in cpu_block]
    assert scripts == ["fine_tune.py", "aggregate_embeddings.py", "generate_prompts.py", "train_filter.py",
                       "train_classifier.py", "train_classifier.py", "eval_on_testset.py", "report.py"]
    write_own_data(tmp_path / "my_data")
    for command in cpu_block:
        assert command[0] == "python"
        args = [match for arg in command[2:] for match in (sorted(glob(str(tmp_path / arg))) if "*" in arg else [arg])]
        args = [str(Path(a).relative_to(tmp_path)) if a.startswith(str(tmp_path)) else a for a in args]
        script_runner(command[1], *args, *FEWER_STEPS.get(command[1], []), cwd=tmp_path, check=True)
    report = (tmp_path / "RESULTS" / "report.md").read_text()
    assert "baseline" in report.lower() and "diagen" in report.lower()
    assert list((tmp_path / "RESULTS" / "plots").glob("*.png"))
    assert list(tmp_path.glob("logs/evaluation_on_folder-*_val_0_2.csv"))

    # the GPU block names only flags the scripts have
    for command in gpu_block:
        assert command[0] == "python"
        known = script_runner(command[1], "--help", check=True).stdout
        for flag in (arg for arg in command[2:] if arg.startswith("--")):
            assert re.search(rf"{re.escape(flag)}\b", known), f"{command[1]} has no {flag}"

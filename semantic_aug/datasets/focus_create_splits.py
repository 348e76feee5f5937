"""Lay out FOCUS as `train-val/`, `test/` (and optionally `test_uncommon_context/`) folders, seeded.

FOCUS ships images in folders named `{class}-{setting}` (e.g. `bird-snow`, `car-night`). Per class, the
images of all its settings are pooled, shuffled with `--seed`, the first `--train-val-per-class` go to
`train-val/{class}/` and the rest to `test/{class}/`. Settings listed in `--uncommon-settings` are held out
entirely as `test_uncommon_context/{class}/`, the FOCUS counterpart of Custom COCO's third split.
`--label-fixes` takes a CSV `file,label` of corrected labels (FOCUS's annotation database has a few
mislabelled images; export its corrections to such a file).

    python -m semantic_aug.datasets.focus_create_splits --source FOCUS_RAW --output data/focus --seed 0
"""

from __future__ import annotations

import argparse
import csv
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np

from semantic_aug.datasets.focus import FOCUS_CLASSES
from semantic_aug.core.utils import IMAGE_EXTENSIONS, UserError, run_cli

TRAIN_VAL_PER_CLASS = 108  # as in DIAGen's FOCUS split


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="folder with the original `{class}-{setting}` image folders")
    parser.add_argument("--output", required=True, help="folder to create (it will hold train-val/, test/, ...)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-class shuffle (the reference did not seed it)")
    parser.add_argument("--train-val-per-class", type=int, default=TRAIN_VAL_PER_CLASS,
                        help="images per class that go to train-val/; the rest go to test/")
    parser.add_argument("--uncommon-settings", nargs="*", default=[],
                        help="settings (the part after `{class}-`) held out as test_uncommon_context/")
    parser.add_argument("--label-fixes", default=None, help="CSV with columns file,label of corrected labels")
    return parser.parse_args(argv)


def collect_images(source: Path, uncommon_settings, label_fixes: dict[str, str]):
    """Per class: the common-setting images and the uncommon-setting images, sorted."""
    common, uncommon = defaultdict(list), defaultdict(list)
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        class_name, _, setting = folder.name.partition("-")
        if class_name not in FOCUS_CLASSES:
            raise UserError(f"folder {folder} does not start with a FOCUS class ({', '.join(FOCUS_CLASSES)})")
        for image in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS):
            label = label_fixes.get(image.name, class_name)
            (uncommon if setting in uncommon_settings else common)[label].append(image)
    return common, uncommon


def main(args: argparse.Namespace) -> None:
    source, output = Path(args.source), Path(args.output)
    if not source.is_dir():
        raise UserError(f"FOCUS source folder does not exist: {source}")
    if output.exists():
        raise UserError(f"output folder {output} exists already; remove it or choose another --output")
    label_fixes = {}
    if args.label_fixes:
        with open(args.label_fixes, newline="") as handle:
            label_fixes = {row["file"]: row["label"] for row in csv.DictReader(handle)}
    common, uncommon = collect_images(source, set(args.uncommon_settings), label_fixes)

    staging = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    rng = np.random.default_rng(args.seed)
    for class_name in FOCUS_CLASSES:
        images = [common[class_name][i] for i in rng.permutation(len(common[class_name]))]
        splits = {"train-val": images[: args.train_val_per_class], "test": images[args.train_val_per_class:],
                  "test_uncommon_context": uncommon[class_name]}
        for split, files in splits.items():
            for image in files:
                target = staging / split / class_name / f"{image.parent.name}_{image.name}"
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(image, target)
        print(f"{class_name}: " + ", ".join(f"{split} {len(files)}" for split, files in splits.items()))
    staging.rename(output)  # the finished layout appears at once


if __name__ == "__main__":
    run_cli(main, parse_args)

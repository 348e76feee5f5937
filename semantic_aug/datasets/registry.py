"""Dataset registry, in the style of timm's `register_model` / `create_model` / `list_models`.

Datasets outside the package register themselves the same way, from a module found by one of two routes:
  * an installed package's entry point in the group `diagen.datasets` (`pets = my_package.pets`, or a class);
  * `--dataset-module` (every script that takes `--dataset`) or `$DIAGEN_DATASET_MODULES` (`:`-separated), each a
    Python file (`path/to/pets.py`) or a dotted module name importable from the working directory.

A dataset is known in every path by its *key* (`dataset_key`): its name on its default data, else the name plus the
data's fingerprint (`folder-1a2b3c4d`, `custom_coco-1a2b3c4d`), so tokens, synthetic images and models of two data
folders never meet.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Callable

from semantic_aug.core.utils import UserError

DATASETS: dict[str, type] = {}
ENTRY_POINT_GROUP = "diagen.datasets"
DATASET_MODULES_ENV = "DIAGEN_DATASET_MODULES"
DATASET_MODULE_FLAG = "--dataset-module"
FINGERPRINT_CHARS = 8  # hex digits of the data fingerprint in a dataset key (32 bits: collisions need ~65k folders)
_KEY = re.compile(rf"^(?P<name>.+)-(?P<fingerprint>[0-9a-f]{{{FINGERPRINT_CHARS}}})$")
_loaded_modules: set[str] = set()


def register_dataset(name: str) -> Callable[[type], type]:
    """Class decorator: make a `FewShotDataset` subclass available as `--dataset name`."""

    def register(cls: type) -> type:
        DATASETS[name] = cls
        cls.dataset_name = name
        return cls

    return register


def _import_dataset_module(spec: str) -> None:
    """Import a dataset module named by a file path or a dotted name (from the working directory if need be)."""
    path = Path(spec).expanduser()
    if spec.endswith(".py") or path.is_file():
        if not path.is_file():
            raise UserError(f"dataset module not found: {path} (from {DATASET_MODULE_FLAG} or ${DATASET_MODULES_ENV})")
        module_name = f"diagen_dataset_{path.stem}_{abs(hash(str(path.resolve()))) % 10**8}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        module_spec.loader.exec_module(module)
        return
    try:
        importlib.import_module(spec)
    except ModuleNotFoundError as error:
        if os.getcwd() in sys.path or error.name != spec.split(".")[0]:
            raise UserError(f"cannot import dataset module {spec!r}: {error}") from None
        sys.path.append(os.getcwd())  # a script's sys.path[0] is its own folder, not the user's
        try:
            importlib.import_module(spec)
        except ModuleNotFoundError as error:
            raise UserError(f"cannot import dataset module {spec!r}: {error}; pass a file path or install it") from None


def _flag_values(argv: list[str], flag: str) -> list[str]:
    """The values of `flag` in `argv` (`--flag v` and `--flag=v`), read before argparse builds its choices."""
    values = []
    for i, item in enumerate(argv):
        if item == flag and i + 1 < len(argv):
            values.append(argv[i + 1])
        elif item.startswith(flag + "="):
            values.append(item[len(flag) + 1:])
    return values


def load_dataset_plugins(argv: list[str] | None = None) -> None:
    """Import the dataset modules of the entry-point group, `$DIAGEN_DATASET_MODULES` and `--dataset-module` in
    `argv` (default `sys.argv`), each once; their `@register_dataset` classes join `DATASETS`.

    An entry point may also name a `FewShotDataset` class that is not registered: it is registered under the
    entry point's name. A module that fails to load is a `UserError`.
    """
    from importlib.metadata import entry_points

    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        if f"entry point {entry_point.value}" in _loaded_modules:
            continue
        _loaded_modules.add(f"entry point {entry_point.value}")
        try:
            loaded = entry_point.load()
        except Exception as error:  # a broken plugin is the user's to fix, named in one line
            raise UserError(f"dataset entry point {entry_point.name} = {entry_point.value} "
                            f"({ENTRY_POINT_GROUP}) failed to load: {error}") from None
        if isinstance(loaded, type) and loaded not in DATASETS.values():
            register_dataset(entry_point.name)(loaded)
    specs = [s for s in os.environ.get(DATASET_MODULES_ENV, "").split(os.pathsep) if s.strip()]
    specs += _flag_values(sys.argv[1:] if argv is None else list(argv), DATASET_MODULE_FLAG)
    for spec in specs:
        if spec not in _loaded_modules:
            _loaded_modules.add(spec)
            _import_dataset_module(spec)


def list_datasets() -> list[str]:
    """Registered dataset names, sorted (feeds argparse `choices`); dataset plugins are loaded first."""
    load_dataset_plugins()
    return sorted(DATASETS)


class DatasetChoices(list):
    """argparse `choices` that also admit dataset keys (`folder-1a2b3c4d`) of the listed names."""

    def __contains__(self, value) -> bool:
        return list.__contains__(self, split_dataset_key(str(value))[0])


def split_dataset_key(key: str) -> tuple[str, str | None]:
    """(registered name, fingerprint prefix or None) of a dataset name or key (`folder-1a2b3c4d`)."""
    match = _KEY.match(key)
    if key not in DATASETS and match and match["name"] in DATASETS:
        return match["name"], match["fingerprint"]
    return key, None


def get_dataset_class(name: str) -> type:
    """The class of a dataset name or key."""
    if split_dataset_key(name)[0] not in DATASETS:
        load_dataset_plugins()  # a script that never listed the datasets (report.py) finds plugins here
    name = split_dataset_key(name)[0]
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; known datasets: {', '.join(list_datasets())}")
    return DATASETS[name]


def dataset_key(name: str, data_dir: str | os.PathLike | None = None) -> str:
    """The name that stands for a dataset's data in every path (`RunLayout`).

    A dataset read from its default data (no `data_dir`, or a folder holding the same images as the one its
    default resolves to: `$data_dir_env`, then `default_data_dir`) keeps its registered name, the reference's file
    names. Any other `data_dir` adds the data fingerprint's first `FINGERPRINT_CHARS` hex digits
    (`custom_coco-1a2b3c4d`), so that tokens, synthetic images and models made from other data are never reused.
    Datasets whose classes come from their data (`fingerprint_in_name`, i.e. `folder`) always carry it; datasets
    without a fingerprint (COCO) never do. A key that is passed in is checked against `data_dir`'s data.

    Raises:
        UserError: the key's fingerprint is not that of `data_dir` (the data changed, or another folder was given).
    """
    registered, given = split_dataset_key(name)
    cls = get_dataset_class(registered)
    always = getattr(cls, "fingerprint_in_name", False)
    if not hasattr(cls, "data_fingerprint") or (given is None and data_dir is None and not always):
        return registered
    fingerprint = cls.data_fingerprint(data_dir)[:FINGERPRINT_CHARS]
    if given is not None and given != fingerprint:
        raise UserError(f"dataset {name} was made from other data than {cls.resolve_data_dir(data_dir)} (its "
                        f"fingerprint is {fingerprint}: the images changed or another folder was given); pass "
                        f"--dataset {registered} with the --data-dir you mean")
    if not always and _is_default_data(cls, data_dir, fingerprint):
        return registered
    return f"{registered}-{fingerprint}"


def _is_default_data(cls: type, data_dir: str | os.PathLike | None, fingerprint: str) -> bool:
    """Whether `data_dir` is (a copy of) the data `cls` reads when no folder is given."""
    if data_dir is None:
        return True
    try:
        default = cls.resolve_data_dir(None)
    except UserError:  # no default data (FOCUS without $FOCUS_DIR): every folder is "other" data
        return False
    if Path(data_dir).expanduser().resolve() == default.resolve():
        return True
    return cls.data_fingerprint(None)[:FINGERPRINT_CHARS] == fingerprint


def data_fingerprint(name: str, data_dir: str | os.PathLike | None = None) -> str | None:
    """The full SHA-256 fingerprint of a dataset's training data (None for datasets without one, such as COCO)."""
    cls = get_dataset_class(name)
    if not hasattr(cls, "data_fingerprint"):
        return None
    return cls.data_fingerprint(data_dir)


def add_dataset_arguments(parser, default: str = "custom_coco", purpose: str = "dataset to use") -> None:
    """`--dataset`, `--data-dir` and `--bad-images`, as every script that reads images takes them.

    Args:
        parser: an argparse parser or argument group.
        default: the default `--dataset` (the reference's default differs between scripts).
        purpose: the start of `--dataset`'s help text.
    """
    from semantic_aug.datasets.few_shot_dataset import TRAIN_POOL_SIZE, add_bad_images_argument

    parser.add_argument("--dataset", default=default, choices=DatasetChoices(list_datasets()),
                        help=f"{purpose}; `folder` reads the classes from --data-dir/train-val/ (default: %(default)s)")
    parser.add_argument("--data-dir", default=None,
                        help="the dataset's folder (default: its shipped copy or its environment variable, e.g. "
                             "$FOCUS_DIR, $COCO_DIR)")
    add_bad_images_argument(parser)
    parser.add_argument("--train-pool-size", type=int, default=None,
                        help=f"the split rule: the first N shuffled train-val images of a class are its training "
                             f"pool, the rest validation; each class needs N + 1 images (default: "
                             f"{TRAIN_POOL_SIZE}, the reference's; COCO keeps its 16)")
    add_dataset_module_argument(parser)


def add_dataset_module_argument(parser) -> None:
    """`--dataset-module`: a dataset plugin to load (read from the command line before parsing, see
    `load_dataset_plugins`)."""
    parser.add_argument(DATASET_MODULE_FLAG, action="append", default=[], metavar="FILE_OR_MODULE",
                        help=f"a Python file or dotted module that registers a dataset with @register_dataset; "
                             f"repeatable; also ${DATASET_MODULES_ENV} and the `{ENTRY_POINT_GROUP}` entry points "
                             f"(default: none)")


def check_dataset_arguments(args, examples_per_class=()) -> None:
    """The up-front dataset check of every script, before any long work: loads nothing heavy.

    Sets `args.dataset` to its key (`dataset_key`) and, for folder datasets, builds the training pool once (checking
    the class folders and image files) and checks the split rule (`FolderFewShotDataset.check_split_rule`: every
    class fills the largest `examples_per_class` and keeps a validation image), each with a one-line `UserError`.

    Args:
        args: parsed flags with `dataset`, `data_dir` and optionally `train_pool_size`, `bad_images`.
        examples_per_class: the run's examples per class (`--examples-per-class`).
    """
    from semantic_aug.datasets.few_shot_dataset import FolderFewShotDataset

    args.dataset = dataset_key(args.dataset, args.data_dir)
    examples_per_class = [e for e in (examples_per_class or []) if e is not None]
    if examples_per_class and issubclass(get_dataset_class(args.dataset), FolderFewShotDataset):
        largest = max(examples_per_class)
        # built without examples_per_class, so that the split rule's message comes first; the pool's images are read
        dataset = create_dataset(args.dataset, split="train", data_dir=args.data_dir,
                                 train_pool_size=getattr(args, "train_pool_size", None),
                                 bad_images=getattr(args, "bad_images", "error"))
        dataset.check_split_rule(largest)


def create_dataset(name: str, **kwargs):
    """Build dataset `name` (a registered name or a key, `dataset_key`) with constructor keyword arguments (`split`,
    `examples_per_class`, `seed`, `data_dir`, `train_pool_size`, ...). A key's fingerprint must match the data."""
    if split_dataset_key(name)[1] is not None:
        name = dataset_key(name, kwargs.get("data_dir"))
    if kwargs.get("train_pool_size", 0) is None:
        kwargs.pop("train_pool_size")
    dataset = get_dataset_class(name)(**kwargs)
    if name != split_dataset_key(name)[0]:
        dataset.dataset_name = name
    return dataset

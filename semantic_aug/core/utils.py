"""Small helpers shared by every script: user errors, strict flag parsing, seeding, atomic writes.

Nothing here knows about diffusion or classifiers; it is the plumbing that keeps long jobs safe
(atomic writes, resumable outputs) and keeps user mistakes to one readable line.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import errno
import io
import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

# the extensions every dataset folder is read with (any case); a file with another extension is read too when
# Pillow recognises its content, so these are the documented minimum
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels become white when an image is flattened to RGB
# torch dtypes by the names the generation flags take
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
# write failures that, like ENOSPC, mean the disk (or the process's share of it) is full
DISK_LIMIT_ERRNOS = (errno.EDQUOT, errno.EFBIG)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Every script's `--help`: the description as written, and each flag's default after its help."""


class UserError(Exception):
    """A problem with the user's input (paths, flags, files), reported as one line without a traceback."""


def run_cli(main: Callable[[argparse.Namespace], object], parse_args: Callable[[], argparse.Namespace]) -> None:
    """Run a script's `main(parse_args())`, turning a `UserError` into `error: ...` on stderr and exit code 2.

    Args:
        main: the script's main function.
        parse_args: the script's argument parser (argparse exits on bad flags; a `UserError` found while
            parsing, such as a dataset module that cannot be loaded, is reported like one from `main`).
    """
    try:
        main(parse_args())
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)


def str2bool(value: str | bool | int) -> bool:
    """Strict boolean for the reference's value-taking flags (`--augment-embeddings True`, `--use-embedding-noise 1`).

    The reference parsed any non-empty string as True, so `False` turned the feature on. Here only
    true/false/1/0/yes/no (any case) are accepted; anything else is an argparse error.
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "y", "t"):
        return True
    if text in ("false", "0", "no", "n", "f"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false/1/0), got {value!r}")


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (all devices) so that a run repeats."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def pick_device(requested: str | None = None) -> torch.device:
    """The device to run on: `requested` if given (`cpu`, `cuda`, `cuda:1`, or a bare GPU index), else CUDA when present.

    The reference's `--device 0` (a GPU index) keeps working; on a machine without a GPU it falls back to CPU
    with a warning instead of crashing.
    """
    if requested is None or requested == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = str(requested)
    if text.isdigit():
        text = f"cuda:{text}"
    if text.startswith("cuda") and not torch.cuda.is_available():
        print(f"warning: --device {requested} asked for CUDA, but none is available; using the CPU", file=sys.stderr)
        return torch.device("cpu")
    try:
        return torch.device(text)
    except RuntimeError as error:
        raise UserError(f"unknown --device {requested!r}: {error}") from None


# ----------------------------------------------------------------------------------------------------------
# atomic writes: write to a temporary file in the same folder, then os.replace (atomic on POSIX)


def make_output_dir(folder: str | os.PathLike) -> None:
    """Create an output folder (and its parents), or raise a one-line `UserError` when it cannot be created or written."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create output directory {folder}: {error.strerror}") from None
    if not os.access(folder, os.W_OK):
        raise UserError(f"output directory {folder} is not writable")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` atomically, on failure it is removed.

    `suffix` defaults to the target's suffix so that writers that look at the extension (PIL, torch) still work.
    """
    path = Path(path)
    make_output_dir(path.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=(suffix if suffix is not None else path.suffix) + ".tmp",
                                    dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        if error.errno == errno.ENOSPC:
            raise UserError(f"no space left on device while writing {path}") from None
        if error.errno in DISK_LIMIT_ERRNOS:
            raise UserError(f"cannot write {path}: {error.strerror} (a disk quota or file size limit); free space "
                            f"or raise the limit, then rerun to resume") from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: object, path: str | os.PathLike) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def atomic_save_image(image, path: str | os.PathLike, **save_kwargs) -> None:
    """Save a PIL image atomically; the format follows the target's extension (`save_kwargs` go to `Image.save`)."""
    buffer = io.BytesIO()
    image.save(buffer, format=_pil_format(Path(path).suffix), **save_kwargs)
    atomic_write_bytes(path, buffer.getvalue())


def atomic_write_csv(dataframe, path: str | os.PathLike, **to_csv_kwargs) -> None:
    """Write a pandas DataFrame as CSV atomically (`to_csv_kwargs` go to `DataFrame.to_csv`)."""
    to_csv_kwargs.setdefault("index", False)
    atomic_write_text(path, dataframe.to_csv(**to_csv_kwargs))


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete `.*.tmp` files an interrupted run left in `folder` (recursively). Returns how many were removed."""
    removed = 0
    folder = Path(folder)
    if folder.is_dir():
        for tmp in folder.rglob(".*.tmp"):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def _pil_format(suffix: str) -> str:
    return {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP"}.get(suffix.lower(), "PNG")


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether a dataset file is an image to read: a visible file with an image extension (any case, any format
    Pillow registers), or one whose content Pillow recognises. `.DS_Store`, `Thumbs.db` and text files are not."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if path.name.startswith(".") or not path.is_file():
        return False
    suffix = path.suffix.lower()
    if suffix in IMAGE_EXTENSIONS or suffix in Image.registered_extensions():
        return True
    try:
        with Image.open(path):
            return True
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return False


def to_rgb(image):
    """The one rule by which every image becomes RGB: EXIF orientation applied, transparency (alpha or a palette's
    transparent colour) composited onto white (`ALPHA_BACKGROUND`), grayscale repeated over the three channels, CMYK
    and the other modes converted by Pillow."""
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
        flat = Image.new("RGB", image.size, ALPHA_BACKGROUND)
        flat.paste(image, mask=image.getchannel("A"))
        return flat
    return image.convert("RGB")


def load_image(path: str | os.PathLike):
    """Open an image as RGB PIL (by `to_rgb`'s rule), raising a `UserError` that names the file when it is empty or
    corrupt."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"image file not found: {path}")
    if path.stat().st_size == 0:
        raise UserError(f"empty (0-byte) image file: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise UserError(f"corrupt image file: {path} ({error})") from None


def remove_interrupted_writes(output: str | os.PathLike) -> int:
    """Delete the temporaries that killed `atomic_path` writes of `output` left beside it (only this file's, so that
    concurrent jobs writing into the same folder are never disturbed). Returns how many were removed."""
    output = Path(output)
    if not output.parent.is_dir():
        return 0
    removed = 0
    for tmp in output.parent.glob(f".{glob.escape(output.name)}.*.tmp"):
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


@contextlib.contextmanager
def restart_marker(output: str | os.PathLike, what: str, outputs: Iterable[str | os.PathLike] = ()) -> Iterator[bool]:
    """Bracket work that keeps no mid-run checkpoint (classifier and filter training) and produces `output`.

    While the block runs, a hidden `.{output name}.running.tmp` marker sits beside `output`. If a marker is already
    there, an earlier run was killed part-way: that is logged, since the work restarts from the beginning rather
    than resuming. The unfinished temporaries of interrupted writes of `output` and `outputs` are removed first.
    The marker goes once the block succeeds, and when it fails with an exception (a bad input, a full disk), which
    is reported at once; only a kill or Ctrl-C leaves it for the next run to find.

    Yields:
        True if an earlier run of this work was interrupted.
    """
    output = Path(output)
    marker = output.parent / f".{output.name}.running.tmp"
    interrupted = marker.exists()
    if interrupted:
        logging.getLogger(__name__).warning("%s was interrupted before and keeps no mid-run checkpoint: it restarts "
                                            "from the start", what)
    for path in (output, *outputs):
        remove_interrupted_writes(path)
    make_output_dir(marker.parent)
    marker.touch()
    try:
        yield interrupted
    except Exception:
        marker.unlink(missing_ok=True)
        raise
    marker.unlink(missing_ok=True)


def check_flag_minimum(parser: argparse.ArgumentParser, args: argparse.Namespace, dests: Iterable[str],
                       minimum: int = 1) -> None:
    """`parser.error` (one line, exit 2) for the first flag among `dests` whose value, or any element of a list
    value, is below `minimum`; unset (None) values pass. The message uses the flag's own spelling."""
    spelling = {action.dest: action.option_strings[0] for action in parser._actions if action.option_strings}
    bound = "at least 1" if minimum == 1 else f"{minimum} or more"
    for dest in dests:
        value = getattr(args, dest)
        if any(item is not None and item < minimum for item in (value if isinstance(value, list) else [value])):
            parser.error(f"{spelling[dest]} must be {bound}, got {value}")


class StageTimer:
    """Wall time of a loop of units (updates, images, iterations), with the first step apart: compilation and
    cuDNN's autotuning land there. `benchmarks/bench_run.py` reads the `summary()` line from the scripts' logs.

    Args:
        name: what the loop does (`textual inversion`, `generation`, `classifier`).
        unit: what one unit is (`updates`, `images`, `iterations`).
    """

    def __init__(self, name: str, unit: str):
        self.name, self.unit = name, unit
        self.started = time.perf_counter()
        self.first_seconds: float | None = None
        self.first_units = self.units = 0

    def step(self, units: int = 1) -> None:
        """Count `units` finished since the last call (the caller has waited for the device's work)."""
        if units <= 0:
            return
        self.units += units
        if self.first_seconds is None:
            self.first_seconds, self.first_units = time.perf_counter() - self.started, self.units

    def summary(self) -> str:
        total = time.perf_counter() - self.started
        steady_units, steady_seconds = self.units - self.first_units, total - (self.first_seconds or 0.0)
        rate = steady_units / steady_seconds if steady_units and steady_seconds > 0 else float("nan")
        return (f"timing: {self.name}: {self.units} {self.unit} in {total:.1f} s; first step "
                f"{self.first_seconds or 0.0:.1f} s (warm-up included), then {rate:.2f} {self.unit}/s")

"""The SHA-256 of every file the demo writes: the proof that a change which claims to change no result changes none.

`record` runs `demo.sh` in a scratch copy of the checkout (its tracked and unignored files, an emptied model cache) and
stores one digest per output file; `check` runs it again and lists every file whose digest differs, is missing or
is new. The scratch folder's own path, where a file records it, is replaced by a placeholder. Tensor files (`.pt`, `.pth`, `.bin`, `.safetensors`) are digested by their tensors' names, dtypes, shapes and
bytes, and their other values, so that a serialisation detail cannot hide or fake a change; every other file by its
bytes.

    python tools/demo_outputs.py record tools/demo_outputs.json    # before the change
    python tools/demo_outputs.py check tools/demo_outputs.json     # after it: exit 1 on any difference
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TENSOR_SUFFIXES = {".pt", ".pth", ".bin", ".safetensors"}
OUTPUT_FOLDER = "RESULTS"  # demo.sh writes everything here (apart from the model cache)


def _digest_value(value, digest, scratch: str) -> None:
    import torch

    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"tensor {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            digest.update(f"key {key!r}".encode())
            _digest_value(value[key], digest, scratch)
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__} {len(value)}".encode())
        for item in value:
            _digest_value(item, digest, scratch)
    else:
        digest.update(repr(value).replace(scratch, "<scratch>").encode())


def file_digest(path: Path, scratch: Path) -> str:
    """The SHA-256 of a file: of its tensors for tensor files, else of its bytes (`scratch` replaced)."""
    digest = hashlib.sha256()
    if path.suffix in TENSOR_SUFFIXES:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            content = load_file(path)
        else:
            import torch

            content = torch.load(path, map_location="cpu", weights_only=False)
        _digest_value(content, digest, str(scratch))
    else:
        digest.update(path.read_bytes().replace(str(scratch).encode(), b"<scratch>"))
    return digest.hexdigest()


def run_demo(scratch: Path) -> dict[str, str]:
    """Copy the checkout to `scratch`, run the demo there, and digest every file it wrote."""
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (scratch / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, scratch / name)
    # one fixed cache path, emptied first: the synthetic images' settings fingerprint the model's folder path
    cache = Path(tempfile.gettempdir()) / "diagen-demo-outputs-cache"
    shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "DIAGEN_CACHE": str(cache), "PYTHONPATH": str(scratch),
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    result = subprocess.run(["bash", str(scratch / "demo.sh")], cwd=scratch, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-3000:] + result.stderr[-3000:])
        raise SystemExit(f"demo.sh failed with exit code {result.returncode}")
    outputs = scratch / OUTPUT_FOLDER
    return {str(path.relative_to(scratch)): file_digest(path, scratch) for path in sorted(outputs.rglob("*")) if path.is_file()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("record", "check"), help="store the digests, or compare with them")
    parser.add_argument("digests", type=Path, help="JSON file of the digests")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="demo-outputs-") as scratch:
        digests = run_demo(Path(scratch))
    if args.action == "record":
        args.digests.write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")
        print(f"{len(digests)} output files recorded in {args.digests}")
        return
    recorded = json.loads(args.digests.read_text())
    changed = sorted(name for name in recorded.keys() & digests.keys() if recorded[name] != digests[name])
    missing, new = sorted(recorded.keys() - digests.keys()), sorted(digests.keys() - recorded.keys())
    for label, names in (("changed", changed), ("missing", missing), ("new", new)):
        for name in names:
            print(f"{label}: {name}")
    same = len(recorded.keys() & digests.keys()) - len(changed)
    print(f"{same} of {len(recorded)} recorded output files identical; {len(changed)} changed, {len(missing)} missing, "
          f"{len(new)} new")
    if changed or missing or new:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

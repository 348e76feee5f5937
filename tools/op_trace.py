"""The sequence of PyTorch operations a run launches: the proof that a change which claims to cost no speed runs the
same work, on a machine without a GPU.

`record` runs `python -m MODULE ARGS...` (a benchmark, a script's module) under a dispatch mode that writes down
every aten operation with its inputs' shapes, dtypes and memory layout, one line each; `compare` lists where two
such records differ. Two runs that launch the same operations on the same shapes in the same order do the same
work on any device, so their speeds differ only by noise; what a `compare` lists is the work a change added or
removed. Operations run in other threads (image decoding) are not recorded.

    python tools/op_trace.py record before.txt benchmarks.bench_classifier --device cpu ...   # in the old tree
    python tools/op_trace.py record after.txt benchmarks.bench_classifier --device cpu ...    # in the new one
    python tools/op_trace.py compare before.txt after.txt                                    # exit 1 on a difference
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import os
import runpy
import sys
from pathlib import Path

MAX_SHOWN = 40  # differing lines printed by `compare`


def describe(value) -> str:
    """An operation argument as the trace writes it: a tensor's shape, dtype and layout; a list of those; else ''."""
    import torch

    if isinstance(value, torch.Tensor):
        channels_last = value.dim() == 4 and not value.is_contiguous() \
            and value.is_contiguous(memory_format=torch.channels_last)
        return f"{tuple(value.shape)}:{str(value.dtype).removeprefix('torch.')}{':cl' if channels_last else ''}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(describe(item) for item in value) + "]"
    return ""


def record(module: str, arguments: list[str]) -> list[str]:
    """Run `python -m module arguments` in this process and return one line per aten operation it dispatched."""
    from torch.utils._python_dispatch import TorchDispatchMode

    lines: list[str] = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            lines.append(f"{func} {describe(args)}")
            return func(*args, **(kwargs or {}))

    saved_argv = sys.argv
    sys.argv = [module, *arguments]
    sys.path.insert(0, os.getcwd())  # as `python -m` finds the module: from the current folder
    try:
        with Recorder():
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as error:
        if error.code not in (None, 0):
            raise
    finally:
        sys.argv = saved_argv
    return lines


def digest(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def compare(before: list[str], after: list[str]) -> list[str]:
    """The unified diff of two traces (empty when they are the same)."""
    return list(difflib.unified_diff(before, after, "before", "after", n=0, lineterm=""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    record_parser = commands.add_parser("record", help="run a module and write the operations it launches")
    record_parser.add_argument("output", type=Path, help="the trace file to write")
    record_parser.add_argument("module", help="the module to run as `python -m MODULE`")
    record_parser.add_argument("arguments", nargs=argparse.REMAINDER, help="the module's arguments")
    compare_parser = commands.add_parser("compare", help="list where two traces differ (exit 1 if they do)")
    compare_parser.add_argument("before", type=Path, help="the trace of the code before the change")
    compare_parser.add_argument("after", type=Path, help="the trace of the code after it")
    args = parser.parse_args()

    if args.command == "record":
        lines = record(args.module, args.arguments)
        args.output.write_text("\n".join(lines) + "\n")
        print(f"{len(lines)} operations, digest {digest(lines)}: {args.output}")
        return 0
    for path in (args.before, args.after):
        if not path.is_file():
            parser.error(f"trace {path} not found; write it with `python tools/op_trace.py record {path} MODULE ...`")
    before, after = args.before.read_text().splitlines(), args.after.read_text().splitlines()
    differences = compare(before, after)
    print(f"before: {len(before)} operations, digest {digest(before)}; after: {len(after)}, digest {digest(after)}")
    if not differences:
        print("the same operations on the same shapes, in the same order")
        return 0
    changed = [line for line in differences if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    print(f"{sum(line.startswith('-') for line in changed)} operations only before, "
          f"{sum(line.startswith('+') for line in changed)} only after:")
    print("\n".join(differences[:MAX_SHOWN]) + ("\n..." if len(differences) > MAX_SHOWN else ""))
    return 1


if __name__ == "__main__":
    sys.exit(main())

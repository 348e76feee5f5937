"""Stop `make setup` before pip starts when the disk that will hold the virtual environment is too small for it.

torch's wheels with their CUDA libraries fill about 6 GB, plus about 1 GB while pip unpacks the largest ones; on a
shorter disk pip fails half-way with `OSError: [Errno 28]` after minutes of downloads. Standard library only: it runs
with the Python that creates the environment.

    python3 tools/check_free_disk.py .venv 7
"""

import shutil
import sys
from pathlib import Path


def main(venv: str, need_gb: str) -> None:
    where = Path(venv).resolve()
    while not where.exists():  # the environment's folder, or its nearest parent that exists yet
        where = where.parent
    free_gb = shutil.disk_usage(where).free / 2**30
    if free_gb < float(need_gb):
        sys.exit(f"error: the set-up needs about {need_gb} GB of free disk for {venv} (torch and its CUDA libraries) "
                 f"and {where} has {free_gb:.1f} GB: free some space, or put the environment on a larger disk with "
                 f"make VENV=/path/on/larger/disk/venv")


if __name__ == "__main__":
    main(*sys.argv[1:])

"""The top layer: the experiment runner (`python -m semantic_aug.runner --config ...`), its executors (local GPUs,
Slurm), the grid's cost estimate and the report. It may import every layer below; nothing below imports it."""

from semantic_aug.runner.experiments import main, parse_args

__all__ = ["main", "parse_args"]

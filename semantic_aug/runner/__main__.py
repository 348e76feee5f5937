"""`python -m semantic_aug.runner --config experiments/custom_coco.yaml [--dry-run]`: the experiment grid."""

from semantic_aug.core.utils import run_cli
from semantic_aug.runner.experiments import main, parse_args

run_cli(main, parse_args)

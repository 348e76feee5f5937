"""Train DIAGen's calibrated filter (contribution c) for each (seed, examples_per_class) run.

The filter is a classifier trained on the real few-shot images only, then temperature-scaled on the validation
split; `train_classifier.py --synthetic_filter use` loads it to weight synthetic images. It is saved to
`{models-root}/filter_{dataset}_{seed}_{epc}.pth`; the logs go to `{logdir}/train_filter_{dataset}_{seed}_{epc}.csv`
(training curves) and `{logdir}/calibration_filter_{dataset}_{seed}_{epc}.csv` (NLL and ECE before and after
calibration). An existing filter is kept unless --overwrite.

The defaults are the paper's (200 iterations x up to 50 epochs, early stopping after 6, 256 px): minutes on a
GPU, tens of minutes on a CPU. A quick filter for trying things out on a CPU (about 20 s of compute on one core;
the larger learning rate makes up for the few steps):

    python train_filter.py --dataset custom_coco --seed 0 --examples-per-class 2 \\
        --classifier-backbone efficientnet_lite0 --iterations-per-epoch 10 --max-epochs 3 --image-size 128 --lr 1e-3
"""

from __future__ import annotations

import argparse
import logging

from semantic_aug.core.classifiers import list_backbones
from semantic_aug.core.layout import RunLayout
from semantic_aug.datasets import add_dataset_arguments, check_dataset_arguments
from semantic_aug.stages.filter_training import FilterTrainingOptions, train_filter
from semantic_aug.stages.filtering import FILTER_BACKBONE, TEMPERATURE_ITERATIONS, TEMPERATURE_LR
from semantic_aug.core.utils import HelpFormatter, check_flag_minimum, run_cli

logger = logging.getLogger("train_filter")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_dataset_arguments(parser, purpose="dataset to train on")
    parser.add_argument("--seeds", "--seed", dest="seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="seeds of the few-shot selection and training; one filter per seed")
    parser.add_argument("--examples-per-class", type=int, nargs="+", default=[2, 4, 8],
                        help="real training images per class; one filter per value")
    parser.add_argument("--classifier-backbone", default=FILTER_BACKBONE, choices=list_backbones(),
                        help="frozen pretrained backbone under the linear head (resnet50, the reference's, downloads "
                             "torchvision's ImageNet weights once; efficientnet_lite0 works offline)")
    parser.add_argument("--iterations-per-epoch", type=int, default=200, help="training batches per epoch")
    parser.add_argument("--max-epochs", type=int, default=50,
                        help="upper bound on epochs; early stopping usually ends sooner")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="images per training batch (the classifier's batch size)")
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate of the linear head (Adam)")
    parser.add_argument("--weight-decay", type=float, default=1e-2, help="Adam weight decay (an L2 term in the gradient, as the reference) of the linear head")
    parser.add_argument("--early-stopping-patience", type=int, default=6,
                        help="stop after this many epochs without a lower mean per-class validation loss; 0 disables")
    parser.add_argument("--image-size", type=int, default=256, help="side of the square input images in pixels")
    parser.add_argument("--use-randaugment", action=argparse.BooleanOptionalAction, default=True,
                        help="add RandAugment to the training transform (on in the reference)")
    parser.add_argument("--temperature-lr", type=float, default=TEMPERATURE_LR,
                        help="LBFGS learning rate of temperature scaling")
    parser.add_argument("--temperature-iterations", type=int, default=TEMPERATURE_ITERATIONS,
                        help="LBFGS iterations of temperature scaling")
    parser.add_argument("--models-root", default="models", help="folder of the saved filters")
    parser.add_argument("--logdir", default="logs", help="folder of the training and calibration CSV logs")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:N or a GPU index (default: CUDA when available, else CPU)")
    parser.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                        help="retrain filters that already exist (default: keep them, so reruns resume)")
    args = parser.parse_args(argv)
    check_flag_minimum(parser, args, ("iterations_per_epoch", "max_epochs", "batch_size", "image_size",
                                      "temperature_iterations", "examples_per_class"))
    check_flag_minimum(parser, args, ("early_stopping_patience",), minimum=0)
    if args.lr <= 0 or args.temperature_lr <= 0 or args.weight_decay < 0:
        parser.error("--lr and --temperature-lr must be positive and --weight-decay non-negative")
    return args


def filter_options(args: argparse.Namespace) -> FilterTrainingOptions:
    """The filter's hyperparameters from the flags (`--early-stopping-patience 0`: no early stopping)."""
    return FilterTrainingOptions(
        backbone=args.classifier_backbone, iterations_per_epoch=args.iterations_per_epoch, max_epochs=args.max_epochs,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        early_stopping_patience=args.early_stopping_patience or None, image_size=args.image_size,
        use_randaugment=args.use_randaugment, temperature_lr=args.temperature_lr,
        temperature_iterations=args.temperature_iterations)


def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    check_dataset_arguments(args, args.examples_per_class)
    options = filter_options(args)
    for seed in args.seeds:
        for examples_per_class in args.examples_per_class:
            layout = RunLayout(args.dataset, seed, examples_per_class, models_root=args.models_root)
            path = train_filter(layout, options, data_dir=args.data_dir, logdir=args.logdir, overwrite=args.overwrite,
                                bad_images=args.bad_images, train_pool_size=args.train_pool_size, device=args.device)
            logger.info("filter ready: %s", path)


if __name__ == "__main__":
    run_cli(main, parse_args)

"""Evaluate a saved classifier on one split of a dataset and write the reference's test CSV.

After README's DIAGen command (seed 0, 2 examples per class):

    python eval_on_testset.py --split test --logdir logs \\
        --model 'RESULTS/custom_coco_2epc/diagen/models/classifier_custom_coco_0_2_[0.7]_[15.0]_filter_llm_noise.pth'

writes `{logdir}/evaluation_on_{dataset}_{split}_{seed}_{epc}.csv` with columns idx, value, metric: `Mean Loss`,
`Mean Accuracy` (the mean of the per-class accuracies), then `Loss {Class}` and `Accuracy {Class}` per class.
The dataset, seed, examples per class, split rule and data folder come from the checkpoint's metadata (what
train_classifier.py trained on); `--dataset`, `--seed`, `--epc` and `--train-pool-size` may only confirm them, and a
contradiction is an error. Any split of the dataset works (`test`, `test_uncommon_context`, `val`; `val` depends on
the seed, as in training). A CSV newer than the model is kept unless --overwrite.
"""

import argparse
import logging
from pathlib import Path

from semantic_aug.datasets import add_dataset_arguments, create_dataset, dataset_key, split_dataset_key
from semantic_aug.datasets.few_shot_dataset import DEFAULT_IMAGE_SIZE, EVAL_SPLITS
from semantic_aug.core.layout import RunLayout
from semantic_aug.stages.training import DEFAULT_EVAL_BATCH_SIZE, evaluate, load_classifier
from semantic_aug.core.utils import HelpFormatter, UserError, atomic_write_csv, check_flag_minimum, pick_device, run_cli

logger = logging.getLogger("eval_on_testset")

SPLIT_ALIASES = {"test_uncommon": "test_uncommon_context"}  # the reference's name for the uncommon split


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_dataset_arguments(parser, default=None, purpose="dataset to evaluate on; only confirms the checkpoint's "
                                                         "(None: the checkpoint's)")
    parser.add_argument("--split", default="test", choices=[*EVAL_SPLITS, *SPLIT_ALIASES],
                        help="split to evaluate (test_uncommon is an alias of test_uncommon_context)")
    parser.add_argument("--model", required=True, help="classifier checkpoint (.pth) written by train_classifier.py")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the run, which selects the val images and names the output file; only "
                             "confirms the checkpoint's (default: the checkpoint's)")
    parser.add_argument("--epc", "--examples-per-class", dest="epc", type=int, default=None,
                        help="examples per class of the run (names the output file); only confirms the "
                             "checkpoint's (default: the checkpoint's)")
    parser.add_argument("--logdir", default="logs", help="folder of the output CSV")
    parser.add_argument("--image-size", type=int, default=None,
                        help=f"input side in pixels (default: the size the classifier was trained at, else "
                             f"{DEFAULT_IMAGE_SIZE})")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_EVAL_BATCH_SIZE,
                        help="images per forward pass (the results do not depend on it; the reference used 1)")
    parser.add_argument("--num-workers", type=int, default=None, help="image-decoding threads (default: automatic)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:1 or a GPU index as in the reference (default: a GPU if present)")
    parser.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                        help="evaluate even when the output CSV is newer than the model")
    args = parser.parse_args()
    args.split = SPLIT_ALIASES.get(args.split, args.split)
    check_flag_minimum(parser, args, ("batch_size", "image_size"))
    return args


def check_classes(model, dataset, model_path: str) -> None:
    """Refuse a classifier trained on other classes than `dataset` has (count, and names in order when saved).

    Args:
        model: from `load_classifier` (its `class_names` may be empty for old checkpoints).
        dataset: the split to evaluate on.
        model_path: for the message.
    """
    if model.head.out_features != dataset.num_classes:
        raise UserError(f"classifier {model_path} has {model.head.out_features} classes but {dataset.dataset_name} "
                        f"has {dataset.num_classes}; pass the --dataset it was trained on")
    if model.class_names and list(model.class_names) != list(dataset.class_names):
        raise UserError(f"classifier {model_path} was trained on other classes ({', '.join(model.class_names[:3])}, "
                        f"...) than {dataset.dataset_name}; pass the --dataset it was trained on")


def from_checkpoint(metadata: dict, model_path: Path, key: str, flag: str, value, same=lambda a, b: a == b):
    """The checkpoint's `metadata[key]`, which the flag's `value` may only confirm; the flag where the checkpoint
    records nothing (older checkpoints). A contradiction, or neither, is a `UserError`."""
    recorded = metadata.get(key)
    if recorded is None:
        if value is None:
            raise UserError(f"checkpoint {model_path} records no {key}; pass {flag}")
        return value
    if value is not None and not same(value, recorded):
        raise UserError(f"{flag} {value} contradicts checkpoint {model_path}, which was trained with {key} {recorded}; "
                        f"leave {flag} out")
    return recorded


def same_dataset(flag: str, recorded: str) -> bool:
    """Whether `--dataset` confirms the checkpoint's dataset key (`folder` confirms `folder-1a2b3c4d`)."""
    name, fingerprint = split_dataset_key(flag)
    return name == split_dataset_key(recorded)[0] and (fingerprint is None or flag == recorded)


def run_settings(args: argparse.Namespace, metadata: dict, model_file: Path) -> None:
    """Fill in `args.dataset`, `seed`, `epc`, `train_pool_size` and `data_dir` from the checkpoint's metadata."""
    args.dataset = from_checkpoint(metadata, model_file, "dataset", "--dataset", args.dataset, same=same_dataset)
    args.seed = from_checkpoint(metadata, model_file, "seed", "--seed", args.seed)
    args.epc = from_checkpoint(metadata, model_file, "examples_per_class", "--epc", args.epc)
    if metadata.get("train_pool_size") is not None:
        args.train_pool_size = from_checkpoint(metadata, model_file, "train_pool_size", "--train-pool-size",
                                               args.train_pool_size)
    recorded_dir = metadata.get("data_dir")
    if args.data_dir is None and recorded_dir and Path(recorded_dir).is_dir():
        args.data_dir = recorded_dir
    args.dataset = dataset_key(args.dataset, args.data_dir)  # a folder dataset's data must be the trained-on data


def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    model_file = Path(args.model)
    if not model_file.is_file():
        raise UserError(f"classifier checkpoint not found: {model_file} (train_classifier.py saves them under "
                        f"{{dirname(logdir)}}/models/)")

    # 1. the classifier, at the resolution it was trained at, and the run it was trained in
    device = pick_device(args.device)
    model = load_classifier(model_file, device)
    run_settings(args, model.metadata, model_file)
    image_size = args.image_size or int(model.metadata.get("image_size", DEFAULT_IMAGE_SIZE))
    output = RunLayout(args.dataset, args.seed, args.epc).evaluation_csv(args.logdir, args.split)
    if output.is_file() and not args.overwrite and output.stat().st_mtime >= model_file.stat().st_mtime:
        logger.info("%s exists and is newer than the model; kept (pass --overwrite to evaluate again)", output)
        return

    # 2. the split: every image of it (val depends on the seed and the split rule, as during training)
    dataset = create_dataset(args.dataset, split=args.split, seed=args.seed, image_size=image_size,
                             data_dir=args.data_dir, bad_images=args.bad_images, train_pool_size=args.train_pool_size)
    check_classes(model, dataset, args.model)
    logger.info("evaluating %s on %d images of %s/%s at %d px on %s", model_file, len(dataset), args.dataset,
                args.split, image_size, device)

    # 3. loss and accuracy, overall and per class
    results = evaluate(model, dataset, device, batch_size=args.batch_size, num_workers=args.num_workers, progress=True)
    atomic_write_csv(results, output)
    accuracy = results.loc[results["metric"] == "Mean Accuracy", "value"].item()
    logger.info("mean per-class accuracy %.2f%% on %s/%s; wrote %s", 100 * accuracy, args.dataset, args.split, output)


if __name__ == "__main__":
    run_cli(main, parse_args)

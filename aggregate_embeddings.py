"""Merge the per-class tokens of `fine_tune.py` into one file per run, optionally with DIAGen's noisy tokens.

For every seed in `--seeds` and count in `--examples-per-class`:

    {input_path}/{dataset}-{seed}-{epc}/{class_}/learned_embeds.bin
        -> {output_dir}/{dataset}-tokens/{dataset}-{seed}-{epc}.pt

With `--augment-embeddings True` (DIAGen contribution a, `embedding_noise`), a second file
`{output_dir}/{dataset}-tokens/noise/{dataset}-{seed}-{epc}.pt` holds each token and, for each σ of
`--std-deviation`, a noisy copy `<class_σ>` = e + σ·N(0, I). The noise is seeded (`--seed`, the run's seed and
epc), so reruns write identical files.

SDXL runs (two text encoders) also have `learned_embeds_2.safetensors` per class: their tokens go to a second
file beside each one, `..._2.pt` (`{dataset}-{seed}-{epc}_2.pt`, `noise/{dataset}-{seed}-{epc}_2.pt`), with the same
token names and noisy copies of their own (seeded apart from the first encoder's).

`--embed-path` (the reference's flag) names the one file to write instead, with {dataset}, {seed} and
{examples_per_class} filled in per run: the merged tokens, or with `--augment-embeddings True` the tokens and
their noisy copies, as the reference wrote them:

    python aggregate_embeddings.py --seeds 0 --examples-per-class 8 --dataset custom_coco --augment-embeddings True \
        --input-path ./fine-tuned --embed-path "tokens/{dataset}-tokens/noise/{dataset}-{seed}-{examples_per_class}.pt"
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from semantic_aug.datasets import (DatasetChoices, add_dataset_module_argument, create_dataset, dataset_key,
                                   get_dataset_class, list_datasets)
from semantic_aug.core.embeddings import (collect_class_tokens, collect_second_encoder_tokens, embedding_noise,
                                          embedding_rms, save_tokens, second_encoder_path, stable_seed)
from semantic_aug.core.layout import RunLayout
from semantic_aug.core.utils import HelpFormatter, run_cli, str2bool

logger = logging.getLogger("aggregate_embeddings")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="Seeds of the fine_tune.py runs to merge.")
    parser.add_argument("--examples-per-class", type=int, nargs="+", default=[2, 4, 8],
                        help="Examples per class of the fine_tune.py runs to merge.")
    parser.add_argument("--input-path", default="./fine-tuned", help="The fine-tuned/ folder that fine_tune.py wrote.")
    parser.add_argument("--dataset", default="custom_coco", choices=DatasetChoices(list_datasets()),
                        help="Dataset the tokens belong to.")
    parser.add_argument("--data-dir", default=None,
                        help="The dataset's folder; only needed where the class list comes from the data (coco, "
                             "folder).")
    add_dataset_module_argument(parser)
    parser.add_argument("--augment-embeddings", type=str2bool, default=False,
                        help="Also write the noise file with noisy copies of every token (true/false).")
    parser.add_argument("--std-deviation", type=float, nargs="+", default=[0.005, 0.01, 0.025],
                        help="Absolute noise standard deviations σ, one noisy token <class_σ> each.")
    parser.add_argument("--output-dir", default="tokens", help="Folder that receives {dataset}-tokens/.")
    parser.add_argument("--embed-path", default=None,
                        help="The one token file to write per run instead ({dataset}, {seed}, {examples_per_class} "
                             "filled in): the merged tokens, or under --augment-embeddings the tokens with their "
                             "noisy copies. Default: both files under --output-dir.")
    parser.add_argument("--seed", type=int, default=0, help="Seeds the embedding noise (with each run's seed and epc).")
    args = parser.parse_args(argv)
    if any(std < 0 for std in args.std_deviation):
        parser.error(f"--std-deviation values must be 0 or more, got {args.std_deviation}")
    if len(set(args.std_deviation)) != len(args.std_deviation):
        parser.error(f"--std-deviation has repeated values {args.std_deviation}; each σ names one token")
    return args


def class_names_of(dataset: str, seed: int, examples_per_class: int, data_dir: str | None) -> list[str]:
    """The dataset's classes: fixed for folder datasets, read from the data for COCO."""
    names = list(get_dataset_class(dataset).class_names)
    if names:
        return names
    return list(create_dataset(dataset, split="train", examples_per_class=examples_per_class, seed=seed,
                               data_dir=data_dir).class_names)


SECOND_ENCODER_NOISE = "text_encoder_2"  # mixed into the noise seed of SDXL's second-encoder tokens


def save_run_tokens(tokens: dict, tokens_2: dict | None, path: Path, std_deviations=None, noise_seed: int = 0) -> None:
    """Write a run's tokens to `path` (and SDXL's second-encoder tokens beside it), with DIAGen's noisy copies
    (`embedding_noise`) of both where `std_deviations` is given."""
    if std_deviations is not None:
        tokens = embedding_noise(tokens, std_deviations, seed=noise_seed)
        if tokens_2 is not None:
            tokens_2 = embedding_noise(tokens_2, std_deviations, seed=stable_seed(noise_seed, SECOND_ENCODER_NOISE))
    if tokens_2 is not None:
        save_tokens(tokens_2, second_encoder_path(path))  # first: the first encoder's file marks the run written
    save_tokens(tokens, path)


def log_noise_scale(tokens: dict, std_deviations: list[float]) -> None:
    """Log the tokens' RMS and each σ relative to it: σ is absolute, and the paper chose its values for SD 1.x's
    CLIP ViT-L/14 embeddings, so on another text encoder the relative size tells how to rescale them."""
    rms = embedding_rms(tokens)
    logger.info("token embedding RMS %.4g; σ / RMS = %s (σ is absolute: multiply it by the ratio of two models' RMS "
                "to keep the same relative noise)", rms, ", ".join(f"{std / rms:.3g}" for std in std_deviations))


def write_embed_path(args: argparse.Namespace, layout: RunLayout, tokens: dict, tokens_2: dict | None) -> None:
    """The reference's output: one file at --embed-path, with the noisy copies under --augment-embeddings."""
    path = layout.embed_path()
    if args.augment_embeddings:
        log_noise_scale(tokens, args.std_deviation)
    save_run_tokens(tokens, tokens_2, path, args.std_deviation if args.augment_embeddings else None,
                    stable_seed(args.seed, layout.seed, layout.examples_per_class))
    logger.info("wrote %s: %d tokens", path, len(tokens) * (1 + len(args.std_deviation) * args.augment_embeddings))


def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args.dataset = dataset_key(args.dataset, args.data_dir)  # folder datasets: the paths carry the data fingerprint
    for seed in args.seeds:
        for examples_per_class in args.examples_per_class:
            class_names = class_names_of(args.dataset, seed, examples_per_class, args.data_dir)
            layout = RunLayout(args.dataset, seed, examples_per_class, fine_tuned_root=args.input_path,
                               tokens_root=args.output_dir, embed_path_template=args.embed_path)
            tokens = collect_class_tokens(layout.fine_tuned_dir, class_names)
            tokens_2 = collect_second_encoder_tokens(layout.fine_tuned_dir, class_names)  # SDXL's second encoder
            if args.embed_path is not None:
                write_embed_path(args, layout, tokens, tokens_2)
                continue
            path = layout.tokens()
            save_run_tokens(tokens, tokens_2, path)
            logger.info("wrote %s: %d tokens of width %d", path, len(tokens), next(iter(tokens.values())).shape[-1])
            if args.augment_embeddings:
                noise_seed = stable_seed(args.seed, seed, examples_per_class)
                noise_path = layout.tokens(noise=True)
                save_run_tokens(tokens, tokens_2, noise_path, args.std_deviation, noise_seed)
                logger.info("wrote %s: %d tokens (σ = %s)", noise_path, len(tokens) * (1 + len(args.std_deviation)),
                            ", ".join(str(std) for std in args.std_deviation))
                log_noise_scale(tokens, args.std_deviation)


if __name__ == "__main__":
    run_cli(main, parse_args)

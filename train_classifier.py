"""Train few-shot classifiers on real and synthetic images: the baseline, DA-Fusion and DIAGen.

For every --seeds × --examples-per-class run:
  1. the few-shot training split and the validation split of --dataset;
  2. with --num-synthetic N > 0: N img2img variations of every real training image with the --aug augmentations
     (learned Textual-Inversion tokens, with DIAGen's embedding_noise under --use-embedding-noise 1 and its LLM
     prompts under --use-generated-prompts 1), cached under --synthetic-dir; the model and tokens are reloaded
     for every run;
  3. with --synthetic_filter train|use: DIAGen's calibrated filter scores them into filter_weights (--filter-mode);
  4. the classifier: class-balanced draws, each replaced by a synthetic sibling with --synthetic-probability,
     best epoch by mean per-class validation accuracy;
  5. the outputs:
       {logdir}/results_{dataset}_{seed}_{epc}.csv                     training history
       {dirname(logdir)}/models/classifier_{dataset}_{seed}_{epc}[_{strength}_{guidance}][_filter][_llm][_noise]
           [_uncommon].pth                                             best model (--save_model)
       {dirname(logdir)}/test/{split}_results_{dataset}_{seed}_{epc}.csv  each --eval_on_test_set split
A run whose outputs all exist is skipped, so rerunning a command resumes it; synthetic images are a cache.

A quick CPU check (Custom COCO ships with the package; efficientnet_lite0 works offline):
    python train_classifier.py --seeds 0 --examples-per-class 2 --num-synthetic 0 --classifier-backbone \\
        efficientnet_lite0 --image-size 128 --iterations-per-epoch 5 --num-epochs 2 --eval_on_test_set test
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import itertools
import logging
from pathlib import Path

import torch

from semantic_aug.stages.augmentations import COMPOSE_MODES, list_augmentations
from semantic_aug.core.classifiers import FewShotClassifier, list_backbones
from semantic_aug.datasets import (add_dataset_arguments, check_dataset_arguments, create_dataset, data_fingerprint,
                                   get_dataset_class)
from semantic_aug.datasets.few_shot_dataset import FolderFewShotDataset
from semantic_aug.stages.filtering import (DEFAULT_FILTER_MODE, FILTER_BACKBONE, FILTER_CONFIDENCE_THRESHOLD, FILTER_MODE_HELP,
                                   FILTER_MODES)
from semantic_aug.core.layout import DEFAULT_EMBED_PATH, DEFAULT_LOGDIR, DEFAULT_SYNTHETIC_DIR, NOISY_EMBED_PATH, RunLayout
from semantic_aug.core.stable_diffusion import enable_compile_cache
from semantic_aug.stages.training import (FitOptions, default_num_workers, evaluate, fit, load_classifier,
                                          save_classifier)
from semantic_aug.core.utils import (DTYPES, HelpFormatter, UserError, atomic_write_csv, check_flag_minimum,
                                pick_device, restart_marker, run_cli, set_seed, str2bool)

logger = logging.getLogger("train_classifier")

TEST_SPLITS = ("test", "test_uncommon_context")
SPLIT_ALIASES = {"test_uncommon": "test_uncommon_context"}  # the reference's name for the uncommon split
DEFAULT_STRENGTH = 0.7  # the README's DIAGen settings; the reference crashed when they were left out
DEFAULT_GUIDANCE_SCALE = 15.0
DEFAULT_GENERATION_BATCH_SIZE = 32  # fills an H100/H200 (bench_generation.py); the images do not depend on it


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    # runs and outputs
    add_dataset_arguments(parser, purpose="dataset to train on")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="seeds; each selects the few-shot images and seeds generation and training")
    parser.add_argument("--examples-per-class", type=int, nargs="+", default=[2, 4, 8],
                        help="real training images per class; one run per value and seed")
    parser.add_argument("--method", default="baseline", help="name of the method, used in the default output paths")
    parser.add_argument("--logdir", default=DEFAULT_LOGDIR,
                        help="folder of the results CSVs; {dataset}, {examples_per_class}, {method} and {seed} are "
                             "filled in per run. Models go to its parent's models/, test CSVs to its parent's test/")
    parser.add_argument("--save_model", type=str2bool, default=True, help="save the best classifier (true/false, 1/0)")
    parser.add_argument("--eval_on_test_set", nargs="*", default=[], choices=[*TEST_SPLITS, *SPLIT_ALIASES],
                        help="splits to evaluate the best classifier on (test_uncommon = test_uncommon_context)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:N or a GPU index as in the reference (default: a GPU if present)")
    parser.add_argument("--num-workers", type=int, default=default_num_workers(),
                        help="threads decoding images into the training cache")
    # synthetic images
    parser.add_argument("--num-synthetic", type=int, default=10,
                        help="synthetic images per real training image (0: the baseline, real images only)")
    parser.add_argument("--synthetic-probability", type=float, default=0.7,
                        help="chance that a training draw shows one of the real image's synthetic siblings")
    parser.add_argument("--synthetic-dir", default=DEFAULT_SYNTHETIC_DIR,
                        help="cache folder of the synthetic images ({dataset}, {examples_per_class}, {method}, "
                             "{seed} filled in per run)")
    parser.add_argument("--overwrite-synthetic", action=argparse.BooleanOptionalAction, default=False,
                        help="when --synthetic-dir holds images made with other settings, move it aside and "
                             "regenerate (default: stop with an error)")
    parser.add_argument("--generation-batch-size", type=int, default=DEFAULT_GENERATION_BATCH_SIZE,
                        help="images per diffusion pipeline call (the images do not depend on it)")
    parser.add_argument("--generation-dtype", default="auto", choices=("auto", *DTYPES),
                        help="weight dtype of the diffusion model; auto: bf16 on a GPU, fp32 on the CPU")
    parser.add_argument("--num-inference-steps", type=int, default=50,
                        help="diffusion scheduler steps at strength 1 (img2img runs strength x steps of them)")
    parser.add_argument("--compile-generation", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the diffusion model (default: on a GPU; its compiled code is cached on "
                             "disk, so only a machine's first run pays the warm-up)")
    parser.add_argument("--model-path", default="CompVis/stable-diffusion-v1-4",
                        help="Stable Diffusion: a hub id, a local diffusers folder, or `tiny` (embedded, for tests)")
    parser.add_argument("--aug", nargs="+", default=["textual-inversion"], choices=list_augmentations(),
                        help="generative augmentations; several are combined by --compose")
    parser.add_argument("--compose", default="parallel", choices=COMPOSE_MODES,
                        help="parallel: one augmentation drawn per image (--probs weights); sequential: each "
                             "applied with its --probs probability")
    parser.add_argument("--probs", type=float, nargs="+", default=None, help="one value per --aug (see --compose)")
    parser.add_argument("--strength", type=float, nargs="+", default=[DEFAULT_STRENGTH],
                        help="img2img strength in (0, 1], one value or one per --aug")
    parser.add_argument("--guidance-scale", type=float, nargs="+", default=[DEFAULT_GUIDANCE_SCALE],
                        help="classifier-free guidance scale (>= 1), one value or one per --aug")
    parser.add_argument("--mask", type=str2bool, nargs="+", default=[False],
                        help="inpaint only the largest object's mask (COCO), one value or one per --aug (0/1)")
    parser.add_argument("--inverted", type=str2bool, nargs="+", default=[False],
                        help="with --mask, repaint the background instead, one value or one per --aug (0/1)")
    parser.add_argument("--prompt", default="a photo of a {name}", help="prompt template; {name} becomes the token")
    parser.add_argument("--embed-path", default=None,
                        help=f"learned tokens ({{dataset}}, {{seed}}, {{examples_per_class}} filled in per run); "
                             f"None: {DEFAULT_EMBED_PATH}, or {NOISY_EMBED_PATH} under --use-embedding-noise 1")
    parser.add_argument("--use-embedding-noise", type=str2bool, default=False,
                        help="DIAGen (a): cycle each class through its original and noisy tokens (0/1)")
    parser.add_argument("--use-generated-prompts", type=str2bool, default=False,
                        help="DIAGen (b): cycle each class through its LLM prompts from --prompt-path (0/1)")
    parser.add_argument("--prompt-path", default="prompts/prompts.csv", help="prompt CSV of generate_prompts.py")
    parser.add_argument("--erasure-ckpt-path", default=None,
                        help="UNet weights (e.g. a concept-erased UNet) loaded over --model-path's")
    parser.add_argument("--tokens-per-class", type=int, default=4,
                        help="accepted for compatibility with the reference, which ignored it too")
    parser.add_argument("--filter_mask_area", type=int, default=0,
                        help="the reference's no-op; only 0 is accepted")
    # DIAGen's filter (contribution c)
    parser.add_argument("--synthetic_filter", default=None, choices=["train", "use", "None"],
                        help="weight synthetic images with DIAGen's filter: `train` trains it first, `use` loads "
                             "{models-root}/filter_{dataset}_{seed}_{epc}.pth (default: no filter)")
    parser.add_argument("--filter-mode", default=DEFAULT_FILTER_MODE, choices=FILTER_MODES, help=FILTER_MODE_HELP)
    parser.add_argument("--filter-threshold", type=float, default=FILTER_CONFIDENCE_THRESHOLD,
                        help="--filter-mode threshold: the lowest confidence a synthetic image may have")
    parser.add_argument("--models-root", default="models",
                        help="folder of the filters, the same default as train_filter.py's --models-root")
    parser.add_argument("--filter-backbone", default=FILTER_BACKBONE, choices=list_backbones(),
                        help="backbone of the filter that --synthetic_filter train trains (the reference's resnet50, "
                             "as train_filter.py; efficientnet_lite0 works offline)")
    # the classifier
    parser.add_argument("--classifier-backbone", default="resnet50", choices=list_backbones(),
                        help="ImageNet-pretrained backbone (resnet50 downloads torchvision's weights; "
                             "efficientnet_lite0 works offline)")
    parser.add_argument("--finetune-backbone", action=argparse.BooleanOptionalAction, default=False,
                        help="train the backbone too (default: a linear probe on the frozen backbone, as in the "
                             "reference)")
    parser.add_argument("--image-size", type=int, default=256, help="side of the square training images in pixels")
    parser.add_argument("--iterations-per-epoch", type=int, default=200, help="training batches per epoch")
    parser.add_argument("--num-epochs", type=int, default=50, help="training epochs, each followed by validation")
    parser.add_argument("--batch-size", type=int, default=16, help="images per training batch")
    parser.add_argument("--use-randaugment", action=argparse.BooleanOptionalAction, default=False,
                        help="add RandAugment to the training transform")
    parser.add_argument("--use-cutmix", action=argparse.BooleanOptionalAction, default=False,
                        help="CutMix: half of the draws get a box of another image of the batch, labels mixed by area")
    args = parser.parse_args(argv)

    args.synthetic_filter = None if args.synthetic_filter == "None" else args.synthetic_filter
    args.eval_on_test_set = list(dict.fromkeys(SPLIT_ALIASES.get(s, s) for s in args.eval_on_test_set))
    check_flag_minimum(parser, args, ("iterations_per_epoch", "num_epochs", "batch_size", "image_size",
                                      "generation_batch_size", "num_inference_steps", "num_workers",
                                      "examples_per_class"))
    check_flag_minimum(parser, args, ("num_synthetic",), minimum=0)
    if not 0 <= args.synthetic_probability <= 1:
        parser.error(f"--synthetic-probability must lie in [0, 1], got {args.synthetic_probability}")
    if args.filter_mask_area != 0:
        parser.error(f"--filter_mask_area {args.filter_mask_area}: masking by area is not supported (the reference "
                     f"ignored it); leave it at 0")
    if args.synthetic_filter and args.num_synthetic == 0:
        parser.error(f"--synthetic_filter {args.synthetic_filter} needs synthetic images; set --num-synthetic > 0")
    dataset_splits = get_dataset_class(args.dataset).splits
    for split in args.eval_on_test_set:
        if split not in dataset_splits:
            parser.error(f"--eval_on_test_set {split}: {args.dataset} has no such split (it has "
                         f"{', '.join(dataset_splits)})")
    return args


# ----------------------------------------------------------------------------------------------------------
# one run's files


@dataclasses.dataclass(frozen=True)
class Run:
    """One (seed, examples_per_class) run: its files and the name of its classifier."""

    layout: RunLayout
    embed_path: Path
    model_path: Path

    @property
    def seed(self) -> int:
        return self.layout.seed

    @property
    def examples_per_class(self) -> int:
        return self.layout.examples_per_class

    @property
    def name(self) -> str:
        return f"seed {self.seed}, {self.examples_per_class} examples per class"


def plan_run(args: argparse.Namespace, seed: int, examples_per_class: int) -> Run:
    """The files of one run, from the path flags (the reference's layout)."""
    layout = RunLayout(args.dataset, seed, examples_per_class, method=args.method, models_root=args.models_root,
                       logdir_template=args.logdir, synthetic_dir_template=args.synthetic_dir,
                       embed_path_template=args.embed_path)
    uses_synthetic = args.num_synthetic > 0
    model_path = layout.classifier(
        strength=args.strength if uses_synthetic else None,
        guidance_scale=args.guidance_scale if uses_synthetic else None, use_filter=bool(args.synthetic_filter),
        use_llm=args.use_generated_prompts, use_noise=args.use_embedding_noise,
        uncommon=args.use_generated_prompts and "uncommon" in Path(args.prompt_path).name)
    # aggregate_embeddings.py --augment-embeddings writes the noisy tokens beside the plain ones
    return Run(layout, embed_path=layout.embed_path(noise=args.use_embedding_noise), model_path=model_path)


def sibling_synthetic_dirs(args: argparse.Namespace, run: Run) -> list[str]:
    """The synthetic folders of the same (seed, examples per class) under other --method names: a set made there
    with the same settings is linked instead of generated again."""
    pattern = str(dataclasses.replace(run.layout, method="*").synthetic_dir)
    return sorted(glob.glob(glob.escape(pattern).replace(glob.escape("*"), "*"))) if "*" in pattern else []


def check_test_splits(args: argparse.Namespace) -> None:
    """Fail before any training if a --eval_on_test_set folder is missing (the shipped Custom COCO has no
    test_uncommon_context)."""
    dataset_class = get_dataset_class(args.dataset)
    if not issubclass(dataset_class, FolderFewShotDataset):
        return
    for split in args.eval_on_test_set:
        folder = dataset_class.resolve_data_dir(args.data_dir) / dataset_class.split_folders[split]
        if not folder.is_dir():
            raise UserError(f"--eval_on_test_set {split}: folder {folder} not found; pass the --data-dir that has it")


def check_run_inputs(args: argparse.Namespace, runs: list[Run]) -> None:
    """Read every input the runs need (data splits, token files, prompt CSV, filters) before the first image is
    generated or the first step trained, so that a missing file stops the command at once."""
    from semantic_aug.stages.augmentations.generative_augmentation import check_strength_and_guidance
    from semantic_aug.stages.filtering import check_filter_file
    from semantic_aug.stages.synthetic import check_augmentation_inputs

    if args.num_synthetic > 0 and runs:
        for strength in args.strength:
            check_strength_and_guidance(strength, args.guidance_scale[0])
        for guidance_scale in args.guidance_scale:
            check_strength_and_guidance(args.strength[0], guidance_scale)
    for run in runs:
        class_names = load_split(args, run, "train").class_names
        load_split(args, run, "val")
        if args.num_synthetic == 0:
            continue
        check_augmentation_inputs(args.aug, run.embed_path, class_names, args.use_generated_prompts, args.prompt_path)
        if args.synthetic_filter == "use":
            check_filter_file(run.layout.filter)


def missing_outputs(args: argparse.Namespace, run: Run) -> tuple[bool, list[str]]:
    """(whether the run must train, the test splits still to evaluate)."""
    trained = run.layout.results_csv.is_file()
    missing_splits = [split for split in args.eval_on_test_set if not run.layout.test_csv(split).is_file()]
    # without a saved model, a missing test CSV can only be made by training again
    must_train = not trained or (args.save_model and not run.model_path.is_file()) or \
        (bool(missing_splits) and not run.model_path.is_file())
    return must_train, missing_splits


# ----------------------------------------------------------------------------------------------------------
# the steps of a run


def load_split(args: argparse.Namespace, run: Run, split: str):
    """The few-shot training split (with the synthetic probability), or every image of another split."""
    if split == "train":
        return create_dataset(args.dataset, split=split, examples_per_class=run.examples_per_class, seed=run.seed,
                              data_dir=args.data_dir, image_size=args.image_size,
                              synthetic_probability=args.synthetic_probability, use_randaugment=args.use_randaugment,
                              bad_images=args.bad_images, train_pool_size=args.train_pool_size)
    return create_dataset(args.dataset, split=split, seed=run.seed, data_dir=args.data_dir, image_size=args.image_size,
                          bad_images=args.bad_images, train_pool_size=args.train_pool_size)


def generation_dtype(name: str, device: torch.device) -> torch.dtype:
    """--generation-dtype: `auto` is bf16 on a GPU (as fast as fp16 there, with fp32's range) and fp32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def compile_generation(args: argparse.Namespace, device: torch.device) -> bool:
    """--compile-generation, on by default on a GPU; with it, compiled code is kept on disk for the next run."""
    compile_model = device.type == "cuda" if args.compile_generation is None else args.compile_generation
    if compile_model:
        enable_compile_cache()
    return compile_model


def generate_synthetic(args: argparse.Namespace, run: Run, train_dataset, device: torch.device, accelerator):
    """`--num-synthetic` images per real training image (cached in the run's synthetic folder); returns the
    `SyntheticSet`. The diffusion model is loaded only if an image is missing: a complete set (or one a folder of
    the same settings can fill by links) is planned and checked from the model's configs alone."""
    from semantic_aug.acceleration import Acceleration
    from semantic_aug.stages.synthetic import (AugmentationOptions, GenerationOptions, build_augmentation,
                                               generate_synthetic_images)

    options = AugmentationOptions(
        model_path=args.model_path, embed_path=run.embed_path, dataset_name=args.dataset,
        class_names=train_dataset.class_names, prompt=args.prompt, strength=args.strength,
        guidance_scale=args.guidance_scale, mask=args.mask, inverted=args.inverted, probs=args.probs,
        compose=args.compose, use_embedding_noise=args.use_embedding_noise,
        use_generated_prompts=args.use_generated_prompts, prompt_path=args.prompt_path,
        dtype=generation_dtype(args.generation_dtype, device), erasure_ckpt_path=args.erasure_ckpt_path,
        num_inference_steps=args.num_inference_steps)

    def generator():
        acceleration = Acceleration(compile=compile_generation(args, device))
        acceleration.configure_process(device)  # cuDNN autotuning on a GPU, for this process
        return build_augmentation(args.aug, options, device=device, acceleration=acceleration)

    generation = GenerationOptions(batch_size=args.generation_batch_size, overwrite=args.overwrite_synthetic,
                                   shared_dirs=sibling_synthetic_dirs(args, run))
    synthetic_set = generate_synthetic_images(
        train_dataset, build_augmentation(args.aug, options, load_weights=False), args.num_synthetic,
        run.layout.synthetic_dir, run.seed, options=generation, accelerator=accelerator, generator=generator)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the diffusion model has left the GPU before the classifier trains
    return synthetic_set


def attach_synthetic_images(args: argparse.Namespace, run: Run, train_dataset, synthetic_set, device: torch.device):
    """Give the training split its synthetic set, weighted by DIAGen's filter if asked (the filter's one hook)."""
    if args.synthetic_filter:
        from semantic_aug.stages.filter_training import FilterTrainingOptions, train_filter
        from semantic_aug.stages.filtering import filter_mode_weights, filter_scores, load_filter

        if args.synthetic_filter == "train":  # trained like the classifier, on the same real images (kept if it exists)
            options = FilterTrainingOptions(backbone=args.filter_backbone, iterations_per_epoch=args.iterations_per_epoch,
                                            max_epochs=args.num_epochs, batch_size=args.batch_size,
                                            image_size=args.image_size)
            train_filter(run.layout, options, data_dir=args.data_dir, logdir=run.layout.logdir,
                         bad_images=args.bad_images, train_pool_size=args.train_pool_size, device=device)
        filter_model = load_filter(run.layout.filter, device)
        scores = filter_scores(filter_model, synthetic_set.manifest, train_dataset, seed=run.seed, device=device)
        synthetic_set = synthetic_set.with_filter_scores(scores).with_filter_weights(
            filter_mode_weights(scores, synthetic_set.manifest["real_idx"], args.filter_mode, args.filter_threshold))
    train_dataset.set_synthetic_images(synthetic_set)


def data_dir_of(dataset, args: argparse.Namespace) -> str | None:
    """The absolute data folder a run read (recorded in the checkpoint, so that evaluation finds it again)."""
    folder = getattr(dataset, "data_dir", None) or args.data_dir
    return str(Path(folder).resolve()) if folder else None


def train(args: argparse.Namespace, run: Run, model, train_dataset, val_dataset, device: torch.device):
    """Fit the classifier (best epoch kept), write the results CSV and, with --save_model, the model."""
    options = FitOptions(num_epochs=args.num_epochs, iterations_per_epoch=args.iterations_per_epoch,
                         batch_size=args.batch_size, use_cutmix=args.use_cutmix, num_workers=args.num_workers)
    result = fit(model, train_dataset, val_dataset, options, device=device,
                 generator=torch.Generator().manual_seed(run.seed))
    logger.info("%s: best epoch %d, mean per-class validation accuracy %.2f%%", run.name, result.best_epoch,
                100 * result.best_value)
    atomic_write_csv(result.history, run.layout.results_csv)
    if args.save_model:
        save_classifier(model, run.model_path, {
            "class_names": list(train_dataset.class_names), "dataset": args.dataset, "seed": run.seed,
            "examples_per_class": run.examples_per_class, "image_size": args.image_size, "method": args.method,
            "best_epoch": result.best_epoch, "num_synthetic": args.num_synthetic,
            "synthetic_probability": args.synthetic_probability, "data_dir": data_dir_of(train_dataset, args),
            "train_pool_size": getattr(train_dataset, "train_pool_size", None),
            "data_fingerprint": data_fingerprint(args.dataset, args.data_dir)})
    return model


def evaluate_splits(args: argparse.Namespace, run: Run, model, splits: list[str], device: torch.device) -> None:
    """Write `{dirname(logdir)}/test/{split}_results_...csv` for each split."""
    for split in splits:
        dataset = load_split(args, run, split)
        results = evaluate(model, dataset, device, num_workers=args.num_workers)
        atomic_write_csv(results, run.layout.test_csv(split))
        accuracy = results.loc[results["metric"] == "Mean Accuracy", "value"].item()
        logger.info("%s: mean per-class accuracy %.2f%% on %s", run.name, 100 * accuracy, split)


def main(args: argparse.Namespace) -> None:
    from accelerate import Accelerator

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    accelerator = Accelerator(cpu=args.device == "cpu")
    # several processes (accelerate launch) share the generation; the main process alone trains
    distributed = accelerator.num_processes > 1
    device = accelerator.device if distributed else pick_device(args.device)

    check_dataset_arguments(args, args.examples_per_class)  # class folders and the split rule, before any work
    check_test_splits(args)
    runs = []
    for seed, examples_per_class in itertools.product(args.seeds, args.examples_per_class):
        run = plan_run(args, seed, examples_per_class)
        must_train, missing_splits = missing_outputs(args, run)
        if must_train or missing_splits:
            runs.append((run, must_train, missing_splits))
        else:
            logger.info("%s: results, model and test CSVs exist; skipped (delete them to rerun)", run.name)
    check_run_inputs(args, [run for run, must_train, _ in runs if must_train])

    # 1. synthetic images for every run first, so that processes never wait on another's training
    synthetic_sets = {}
    if args.num_synthetic > 0:
        for run, must_train, _ in runs:
            if must_train:  # generation draws from generators seeded per image (`stable_seed`)
                synthetic_sets[run.seed, run.examples_per_class] = generate_synthetic(
                    args, run, load_split(args, run, "train"), device, accelerator if distributed else None)
    if not accelerator.is_main_process:
        return

    # 2. per run: filter weights, classifier training, test-split evaluation
    for run, must_train, missing_splits in runs:
        outputs = [run.layout.results_csv, *(run.layout.test_csv(split) for split in args.eval_on_test_set)]
        with restart_marker(run.model_path, f"{run.name}: classifier training", outputs):
            if must_train:
                set_seed(run.seed)  # the run's one seeding: the classifier's head starts from it
                train_dataset, val_dataset = load_split(args, run, "train"), load_split(args, run, "val")
                model = FewShotClassifier(args.classifier_backbone, train_dataset.num_classes,
                                          finetune_backbone=args.finetune_backbone)
                if args.num_synthetic > 0:
                    attach_synthetic_images(args, run, train_dataset, synthetic_sets[run.seed, run.examples_per_class],
                                            device)
                train(args, run, model, train_dataset, val_dataset, device)
                missing_splits = args.eval_on_test_set
            else:
                logger.info("%s: already trained; evaluating the saved model on %s", run.name,
                            ", ".join(missing_splits))
                model = load_classifier(run.model_path, device)
            evaluate_splits(args, run, model, missing_splits, device)


if __name__ == "__main__":
    run_cli(main, parse_args)

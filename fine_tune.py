"""Textual Inversion: learn one token `<class_name>` per class of `--dataset` from its few-shot training images.

For every seed in `--seeds` and every count in `--examples-per-class`, the train split of the dataset is selected
and each class gets a token whose embedding is trained (only that row) so that the frozen Stable Diffusion
denoises the class's images when prompted with "a photo of a <class_name>". The result of each class goes to

    {output_dir}/fine-tuned/{dataset}-{seed}-{epc}/{class_name}/learned_embeds.bin  (+ learned_embeds.safetensors)

({"<class_name>": [dim]}, or [N, dim] with `--num_vectors N`: diffusers' `load_textual_inversion` reads either)

which `aggregate_embeddings.py` merges into `tokens/`. A finished class is skipped on rerun; an unfinished one
resumes from its newest `checkpoint-N.pt`. Under `accelerate launch`, the classes are shared out among the
processes; each class's result is the same as in a one-process run.

Example (the README's settings, on one GPU):
    python fine_tune.py --dataset custom_coco --pretrained_model_name_or_path CompVis/stable-diffusion-v1-4 \\
        --examples-per-class 2 4 8 --seeds 0 1 2 --train_batch_size 4 --learning_rate 5e-4 --scale_lr \\
        --max_train_steps 1000 --lr_warmup_steps 0 --mixed_precision bf16
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from pathlib import Path

import torch

from semantic_aug.datasets import add_dataset_arguments, check_dataset_arguments, create_dataset
from semantic_aug.core.embeddings import class_folder_name
from semantic_aug.core.model_family import detect_family
from semantic_aug.core.stable_diffusion import (checked_resolution, enable_compile_cache, load_sd_components,
                                                load_sdxl_second_encoder, load_tokenizer, resolve_model_path)
from semantic_aug.stages.textual_inversion_training import (TEMPLATES, ClassSpec, TextualInversionConfig,
                                                           TextualInversionTrainer, TrainingSpeed)
from semantic_aug.core.layout import FINE_TUNED_FOLDER, RunLayout
from semantic_aug.core.utils import (HelpFormatter, UserError, check_flag_minimum, make_output_dir, pick_device,
                                remove_stale_temporaries, run_cli, str2bool)

logger = logging.getLogger("fine_tune")

DEFAULT_MAX_TRAIN_STEPS = 5000  # the reference's default
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", required=True,
                       help="Stable Diffusion to learn the tokens for: 'tiny' (embedded, CPU-sized), a hub id such as "
                            "CompVis/stable-diffusion-v1-4, or a local diffusers folder.")
    model.add_argument("--revision", default=None, help="Hub revision of the model.")
    model.add_argument("--tokenizer_name", default=None,
                       help="Tokenizer folder or hub id, if not the model's own tokenizer/ subfolder.")
    model.add_argument("--unet-ckpt", default=None,
                       help="A UNet state dict (.pt/.bin/.safetensors, diffusers key names) loaded over the model's "
                            "UNet, e.g. a concept-erased UNet.")
    model.add_argument("--erase-concepts", action=argparse.BooleanOptionalAction, default=False,
                       help="Not supported (the reference never implemented it): pass an erased UNet with --unet-ckpt.")

    data = parser.add_argument_group("data")
    add_dataset_arguments(data, default="coco", purpose="dataset whose classes get tokens")
    data.add_argument("--classes", nargs="+", default=None,
                      help="Learn tokens only for these classes (default: every class of the dataset).")
    data.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                      help="Few-shot selections to learn tokens for (one run per seed).")
    data.add_argument("--examples-per-class", type=int, nargs="+", default=[1, 2, 4, 8, 16],
                      help="Training images per class (one run per value).")
    data.add_argument("--learnable_property", default="object", choices=sorted(TEMPLATES),
                      help="Caption templates: 'object' (\"a photo of a <x>\") or 'style' "
                           "(\"a painting in the style of <x>\").")
    data.add_argument("--repeats", type=int, default=100,
                      help="Passes over each class's images per epoch: every epoch shows each image this many "
                           "times in shuffled order, as the reference; also the epoch length for --num_train_epochs.")
    data.add_argument("--resolution", type=int, default=None,
                      help="Training image side in pixels (default: the model's native size, 512 for SD v1.x, "
                           "64 for tiny).")
    data.add_argument("--center_crop", action=argparse.BooleanOptionalAction, default=False,
                      help="Crop the centred square before resizing (default: resize the whole image to a square).")
    data.add_argument("--flip_p", type=float, default=0.5, help="Probability of mirroring a training image.")
    data.add_argument("--filter_mask_area", type=int, default=0,
                      help="Not supported (a no-op in the reference); only 0 is accepted.")
    data.add_argument("--use_manual_list", type=str2bool, default=False,
                      help="Not supported (a no-op in the reference); only False is accepted.")

    train = parser.add_argument_group("training")
    train.add_argument("--initializer-token", default="the", help="Word whose embedding starts every class token.")
    train.add_argument("--num_vectors", type=int, default=1,
                       help="Vectors per class token (diffusers' flag): 1 as the reference scripts, 4 as the DA-Fusion "
                            "paper. Written as <class>, <class>_1, ... in captions; saved as one [N, dim] tensor.")
    train.add_argument("--train_batch_size", type=int, default=4,
                       help="Samples per class per step (the README's and paper's 4; the reference script "
                            "defaulted to 16).")
    train.add_argument("--max_train_steps", type=int, default=None,
                       help=f"Updates per class (default {DEFAULT_MAX_TRAIN_STEPS}; README: 1000).")
    train.add_argument("--num_train_epochs", type=int, default=None,
                       help="Alternative to --max_train_steps: epochs of ceil(images × repeats / batch) updates.")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1,
                       help="Micro-steps of --train_batch_size samples per class per update.")
    train.add_argument("--learning_rate", type=float, default=1e-4,
                       help="AdamW learning rate (README: 5e-4 with --scale_lr).")
    train.add_argument("--scale_lr", action=argparse.BooleanOptionalAction, default=False,
                       help="Multiply the learning rate by train_batch_size × gradient_accumulation_steps (each "
                            "class's batch; classes are split over processes, not their batches).")
    train.add_argument("--lr_scheduler", default="constant", choices=LR_SCHEDULERS, help="Learning-rate schedule.")
    train.add_argument("--lr_warmup_steps", type=int, default=500, help="Warm-up updates of the schedule.")
    train.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    train.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2.")
    train.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW decoupled weight decay.")
    train.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon.")
    train.add_argument("--seed", type=int, default=None,
                       help="Not used (the reference overwrote it with each of --seeds); use --seeds.")

    speed = parser.add_argument_group("speed and devices")
    speed.add_argument("--joint", action=argparse.BooleanOptionalAction, default=True,
                       help="Train all classes in one batch (each token still learns only from its own class); "
                            "--no-joint trains one class at a time like the reference. Same result either way.")
    speed.add_argument("--cache-latents", action=argparse.BooleanOptionalAction, default=True,
                       help="Encode each image and its mirror image once with the VAE (--no-cache-latents: "
                            "at every step, as the reference).")
    speed.add_argument("--micro-batch-size", type=int, default=0,
                       help="Samples per forward/backward pass; 0 = the whole step (one class's batch above 512², as "
                            "for SD 2.x at 768² and SDXL), halved on out-of-memory.")
    speed.add_argument("--mixed_precision", default="no", choices=("no", "fp16", "bf16"),
                       help="Low-precision UNet/VAE (bf16 recommended on GPUs); the learned vectors stay fp32.")
    speed.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=False,
                       help="Recompute activations in the backward pass: less memory, slower.")
    speed.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="Run the UNet through torch.compile (default: on a GPU, where 1000 updates take about "
                            "a third less time; the compiled code is cached on disk for the next run).")
    speed.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                       help="Channels-last UNet weights (faster convolutions on tensor cores).")
    speed.add_argument("--allow_tf32", action=argparse.BooleanOptionalAction, default=False,
                       help="Allow TF32 matmuls on Ampere+ GPUs (for fp32 training).")
    speed.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                       help="Use xformers attention (needs xformers; PyTorch SDPA, the default, is as fast).")
    speed.add_argument("--device", default=None,
                       help="cpu, cuda, cuda:N or a GPU index for a one-process run (default: accelerate's choice).")
    speed.add_argument("--local_rank", type=int, default=-1, help="Set by older launchers; accelerate needs no value.")

    output = parser.add_argument_group("output")
    output.add_argument("--output_dir", default="./", help="Folder that receives fine-tuned/.")
    output.add_argument("--save_steps", type=int, default=500,
                        help="Also save learned_embeds-steps-N.bin every N updates (0: never).")
    output.add_argument("--checkpointing_steps", type=int, default=500,
                        help="Save resumable state (checkpoint-N.pt per class) every N updates (0: never).")
    output.add_argument("--checkpoints_total_limit", type=int, default=None,
                        help="Keep at most this many checkpoints per class (default: all).")
    output.add_argument("--resume_from_checkpoint", default="latest", choices=("latest", "none"),
                        help="'latest': unfinished classes resume from their newest checkpoint; 'none': start "
                             "them over.")
    output.add_argument("--report_to", default="none", choices=("none", "tensorboard", "wandb", "all"),
                        help="Experiment tracker for the per-class losses.")
    output.add_argument("--logging_dir", default="logs", help="Tracker folder, relative to --output_dir.")
    output.add_argument("--push_to_hub", action="store_true", help="Not supported: the tokens are written locally.")
    output.add_argument("--hub_token", default=None, help="Not supported (see --push_to_hub).")
    output.add_argument("--hub_model_id", default=None, help="Not supported (see --push_to_hub).")

    args = parser.parse_args(argv)
    refused = {
        "--seed": (args.seed is not None, "the reference overwrote it with each of --seeds; use --seeds"),
        "--erase-concepts": (args.erase_concepts, "pass a concept-erased UNet with --unet-ckpt instead"),
        "--filter_mask_area": (args.filter_mask_area != 0, "it had no effect in the reference; drop it"),
        "--use_manual_list": (args.use_manual_list, "it had no effect in the reference; drop it"),
        "--push_to_hub": (args.push_to_hub, "the tokens are written under --output_dir; upload them yourself"),
        "--hub_token": (args.hub_token is not None, "nothing is uploaded; drop it"),
        "--hub_model_id": (args.hub_model_id is not None, "nothing is uploaded; drop it"),
    }
    for flag, (given, advice) in refused.items():
        if given:
            parser.error(f"{flag} is not supported: {advice}")
    if args.max_train_steps is not None and args.num_train_epochs is not None:
        parser.error("--max_train_steps and --num_train_epochs both set the training length; pass one")
    check_flag_minimum(parser, args, ("train_batch_size", "gradient_accumulation_steps", "repeats", "max_train_steps",
                                      "num_train_epochs", "resolution", "checkpoints_total_limit",
                                      "examples_per_class", "num_vectors"))
    check_flag_minimum(parser, args, ("micro_batch_size", "save_steps", "checkpointing_steps", "lr_warmup_steps"),
                       minimum=0)
    if not 0.0 <= args.flip_p <= 1.0:
        parser.error(f"--flip_p must lie in [0, 1], got {args.flip_p}")
    return args


def build_accelerator(args: argparse.Namespace):
    """An Accelerator with the requested mixed precision, tracker, and (one-process runs) device."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu = multi_process and not torch.cuda.is_available()  # several CPU processes talk through gloo
    if args.device is not None:
        if multi_process:
            logger.warning("--device %s ignored: accelerate launch assigns one device per process", args.device)
        else:
            device = pick_device(args.device)
            cpu = device.type == "cpu"
            if device.type == "cuda" and device.index is not None:
                torch.cuda.set_device(device)  # accelerate places one-process runs on the current CUDA device
    if args.mixed_precision == "fp16" and (cpu or not torch.cuda.is_available()):
        raise UserError("--mixed_precision fp16 needs a CUDA GPU (the CPU has no fp16 training path); "
                        "use --mixed_precision bf16 or no")
    project = ProjectConfiguration(project_dir=args.output_dir,
                                   logging_dir=os.path.join(args.output_dir, args.logging_dir))
    try:
        accelerator = Accelerator(cpu=cpu, mixed_precision=args.mixed_precision, project_config=project,
                                  log_with=None if args.report_to == "none" else args.report_to)
        if args.report_to != "none":
            accelerator.init_trackers("textual_inversion", config={k: v for k, v in vars(args).items()
                                                                    if isinstance(v, (int, float, str, bool))})
    except (ValueError, ImportError, ModuleNotFoundError) as error:
        raise UserError(f"cannot set up accelerate (--mixed_precision {args.mixed_precision}, --report_to "
                        f"{args.report_to}): {error}") from None
    return accelerator


def load_models(args: argparse.Namespace):
    """(tokenizer, text_encoder, vae, unet, noise_scheduler), after --tokenizer_name, --unet-ckpt, attention flags."""
    tokenizer, text_encoder, vae, unet, noise_scheduler = load_sd_components(args.pretrained_model_name_or_path,
                                                                             args.revision)
    if args.tokenizer_name:
        try:
            tokenizer = load_tokenizer(args.tokenizer_name)
        except OSError as error:
            raise UserError(f"cannot load --tokenizer_name {args.tokenizer_name}: {error}") from None
    if args.unet_ckpt:
        try:
            unet.load_state_dict(read_state_dict(args.unet_ckpt), strict=True)
        except RuntimeError as error:
            reason = str(error).strip().splitlines()[0:2]
            raise UserError(f"--unet-ckpt {args.unet_ckpt} does not fit the model's UNet: {' '.join(reason)}") from None
    if args.enable_xformers_memory_efficient_attention:
        try:
            unet.enable_xformers_memory_efficient_attention()
        except (ImportError, ModuleNotFoundError, ValueError) as error:
            raise UserError(f"--enable_xformers_memory_efficient_attention: {error}; drop the flag "
                            f"(PyTorch SDPA, the default, is as fast)") from None
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return tokenizer, text_encoder, vae, unet, noise_scheduler


def load_second_encoder(args: argparse.Namespace):
    """SDXL's (tokenizer_2, text_encoder_2), whose token vectors are learned beside the first encoder's; None for
    SD 1.x/2.x. The family is read from the model folder."""
    if detect_family(resolve_model_path(args.pretrained_model_name_or_path)) != "sdxl":
        return None
    return load_sdxl_second_encoder(args.pretrained_model_name_or_path, args.revision)


def read_state_dict(path: str) -> dict:
    """A state dict from a .safetensors or torch file, or a `UserError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--unet-ckpt file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is reported the same way
        raise UserError(f"cannot read --unet-ckpt {path}: {type(error).__name__}: {error}") from None
    return state.get("state_dict", state) if isinstance(state, dict) else state


def training_config(args: argparse.Namespace, resolution: int, examples_per_class: int) -> TextualInversionConfig:
    """The hyperparameters of one (seed, epc) run; the step count depends on epc under --num_train_epochs."""
    if args.num_train_epochs is not None:
        samples_per_update = args.train_batch_size * args.gradient_accumulation_steps
        updates_per_epoch = math.ceil(examples_per_class * args.repeats / samples_per_update)
        max_train_steps = args.num_train_epochs * updates_per_epoch
    else:
        max_train_steps = args.max_train_steps or DEFAULT_MAX_TRAIN_STEPS
    learning_rate = args.learning_rate
    if args.scale_lr:
        learning_rate *= args.train_batch_size * args.gradient_accumulation_steps
    return TextualInversionConfig(
        resolution=resolution, repeats=args.repeats, center_crop=args.center_crop, flip_p=args.flip_p, train_batch_size=args.train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, max_train_steps=max_train_steps,
        learning_rate=learning_rate, lr_scheduler=args.lr_scheduler, lr_warmup_steps=args.lr_warmup_steps,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_weight_decay=args.adam_weight_decay,
        adam_epsilon=args.adam_epsilon, learnable_property=args.learnable_property,
        initializer_token=args.initializer_token, num_vectors=args.num_vectors,
        checkpointing_steps=args.checkpointing_steps or None,
        checkpoints_total_limit=args.checkpoints_total_limit, save_steps=args.save_steps or None,
        micro_batch_size=args.micro_batch_size, cache_latents=args.cache_latents,
        resume=args.resume_from_checkpoint == "latest")


def class_specs(dataset, run_dir: Path, only: list[str] | None = None) -> list[ClassSpec]:
    """A `ClassSpec` per class of the dataset (or of `only`), images not loaded yet, output in `run_dir/{class_}`."""
    unknown = sorted(set(only or ()) - set(dataset.class_names))
    if unknown:
        raise UserError(f"--classes {', '.join(unknown)} not in {type(dataset).__name__}; its classes: "
                        f"{', '.join(dataset.class_names)}")
    specs = [ClassSpec(name, images=[], output_dir=run_dir / class_folder_name(name)) for name in dataset.class_names]
    for idx, label in enumerate(dataset.labels):
        specs[label].image_ids.append(dataset.get_metadata_by_idx(idx).get("path", idx))
    missing = [spec.name for spec in specs if not spec.image_ids]
    if missing:
        logger.warning("no training images for %s; no tokens learned for them", ", ".join(missing))
    return [spec for spec in specs if spec.image_ids and (only is None or spec.name in only)]


def load_images(dataset, specs: list[ClassSpec]) -> None:
    """Fill `spec.images` for `specs` (only the classes this process trains)."""
    wanted = {spec.name: spec for spec in specs}
    for idx, label in enumerate(dataset.labels):
        spec = wanted.get(dataset.class_names[label])
        if spec is not None:
            spec.images.append(dataset.get_image_by_idx(idx))


def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    fine_tuned_root = Path(args.output_dir) / FINE_TUNED_FOLDER
    make_output_dir(fine_tuned_root)  # fail now, not after the first class has trained
    check_dataset_arguments(args, args.examples_per_class)  # class folders and the split rule, before the model loads
    accelerator = build_accelerator(args)
    tokenizer, text_encoder, vae, unet, noise_scheduler = load_models(args)
    resolution = checked_resolution(args.resolution, unet, vae)
    run_settings = {"model": args.pretrained_model_name_or_path, "revision": args.revision,
                    "tokenizer": args.tokenizer_name, "unet_ckpt": args.unet_ckpt}
    first_config = training_config(args, resolution, args.examples_per_class[0])
    compile_unet = accelerator.device.type == "cuda" if args.compile is None else args.compile
    if compile_unet:
        enable_compile_cache()
    trainer = TextualInversionTrainer(tokenizer, text_encoder, vae, unet, noise_scheduler, first_config, accelerator,
                                      TrainingSpeed(args.gradient_checkpointing, compile_unet, args.channels_last),
                                      run_settings=run_settings,
                                      second_encoder=load_second_encoder(args))

    for seed in args.seeds:
        for examples_per_class in args.examples_per_class:
            config = trainer.configure(training_config(args, resolution, examples_per_class))
            # 1. the few-shot training images of this (seed, epc), and the classes still to learn
            run_dir = RunLayout(args.dataset, seed, examples_per_class, fine_tuned_root=fine_tuned_root).fine_tuned_dir
            dataset = create_dataset(args.dataset, split="train", examples_per_class=examples_per_class, seed=seed,
                                     data_dir=args.data_dir, bad_images=args.bad_images,
                                     train_pool_size=args.train_pool_size)
            specs = class_specs(dataset, run_dir, args.classes)
            accelerator.wait_for_everyone()  # every process must see the same finished classes
            todo = [spec for spec in specs if not spec.finished]
            mine = todo[accelerator.process_index::accelerator.num_processes]
            logger.info("%s seed %d, %d per class: %d classes, %d finished, %d to learn (%d on this process); "
                        "%d updates × %d samples per class, lr %.3g, %dpx, %s", args.dataset, seed, examples_per_class,
                        len(specs), len(specs) - len(todo), len(todo), len(mine), config.max_train_steps,
                        config.train_batch_size * config.gradient_accumulation_steps, config.learning_rate, resolution,
                        "jointly" if args.joint else "one class at a time")
            load_images(dataset, mine)
            for spec in mine:
                remove_stale_temporaries(spec.output_dir)

            # 2. learn the tokens: all of this process's classes in one batch, or one class at a time
            if args.joint and mine:
                trainer.learn(mine, seed=seed)
            elif mine:
                for spec in mine:
                    trainer.learn([spec], seed=seed)
            accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    run_cli(main, parse_args)

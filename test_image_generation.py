"""Preview what Stable Diffusion makes of learned tokens: text-to-image with a Textual Inversion token file.

    python test_image_generation.py --model-path CompVis/stable-diffusion-v1-4 \
        --embed-path tokens/custom_coco-tokens/custom_coco-0-2.pt \
        --prompt "a photo of a <bench>" "a photo of a <bench> in the snow" --num-generate 10

writes `{out}/{idx}.png` for idx = 0 .. num-generate - 1, the prompts taken in turn, and `{out}/manifest.csv`
(idx, prompt, seed, path). Each image has its own seeded generator, so a rerun repeats it and the batch size
does not change it; existing images are kept (resume) unless --overwrite. Prompts may only use tokens the
file holds (`<bench>`, `<bench_0.005>`, ...): an unknown `<name>` is an error, not a silent misspelling.
The reference's single default prompt was a string that the loop indexed character by character; here
--prompt is always a list.
"""

import argparse
import logging
import re
from pathlib import Path

import pandas as pd
import torch

from semantic_aug.core.embeddings import load_tokens_into_pipeline, stable_seed
from semantic_aug.core.stable_diffusion import default_resolution, load_stable_diffusion
from semantic_aug.core.utils import (HelpFormatter, UserError, atomic_save_image, atomic_write_csv, check_flag_minimum,
                                pick_device, run_cli)

logger = logging.getLogger("test_image_generation")

PLACEHOLDER = re.compile(r"<[^<>\s]+>")  # a learned token in a prompt, e.g. <cell_phone> or <bench_0.005>
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model-path", default="CompVis/stable-diffusion-v1-4",
                        help="Stable Diffusion: a hub id, a local diffusers folder, or `tiny` (the embedded test model)")
    parser.add_argument("--embed-path", default="tokens/custom_coco-tokens/custom_coco-0-2.pt",
                        help="token file written by aggregate_embeddings.py (a dict token -> vector)")
    parser.add_argument("--seed", type=int, default=0, help="seed; image idx uses a generator derived from (seed, idx)")
    parser.add_argument("--num-generate", type=int, default=10, help="number of images")
    parser.add_argument("--prompt", nargs="+", default=["a photo of a <bench>"],
                        help="one or more prompts, used in turn (image idx gets prompt idx mod count)")
    parser.add_argument("--out", default="test_generations", help="output folder")
    parser.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument("--num-inference-steps", type=int, default=50, help="denoising steps per image")
    parser.add_argument("--resolution", type=int, default=None,
                        help="image side in pixels (default: the model's own, 512 for SD v1.x, 64 for `tiny`)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per pipeline call (does not change them)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:1 or a GPU index as in the reference (default: a GPU if present)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                        help="weight dtype (default: float16 on a GPU, as the reference, float32 on the CPU)")
    parser.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                        help="regenerate images that already exist")
    args = parser.parse_args()
    check_flag_minimum(parser, args, ("num_generate", "num_inference_steps", "batch_size", "resolution"))
    if args.guidance_scale < 1:
        parser.error(f"--guidance-scale must be at least 1, got {args.guidance_scale}")
    return args


def check_prompts(prompts: list[str], tokens: dict, embed_path: str) -> None:
    """Refuse a prompt with a `<token>` the token file lacks (CLIP would split it into pieces without a word).

    Args:
        prompts: the --prompt list.
        tokens: token -> vector from the file.
        embed_path: for the message.
    """
    unknown = sorted({token for prompt in prompts for token in PLACEHOLDER.findall(prompt)} - set(tokens))
    if unknown:
        known = ", ".join(list(tokens)[:5]) + (", ..." if len(tokens) > 5 else "")
        raise UserError(f"token(s) {', '.join(unknown)} of --prompt are not in {embed_path} (it has {known})")


def image_seed(seed: int, idx: int) -> int:
    """The seed of image `idx`: the same for a rerun, different for every image and every --seed."""
    return stable_seed("test_image_generation", seed, idx)


def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    from tqdm.auto import tqdm

    out = Path(args.out)
    plan = pd.DataFrame({"idx": range(args.num_generate)})
    plan["prompt"] = [args.prompt[idx % len(args.prompt)] for idx in plan["idx"]]
    plan["seed"] = [image_seed(args.seed, idx) for idx in plan["idx"]]
    plan["path"] = [str(out / f"{idx}.png") for idx in plan["idx"]]
    todo = plan if args.overwrite else plan[[not Path(path).is_file() for path in plan["path"]]]
    if todo.empty:
        logger.info("all %d images exist in %s; nothing to do (pass --overwrite to regenerate)", len(plan), out)
        atomic_write_csv(plan, out / "manifest.csv")
        return
    if not Path(args.embed_path).is_file():
        raise UserError(f"token file not found: {args.embed_path} (fine_tune.py, then aggregate_embeddings.py, write it)")

    # 1. the text-to-image pipeline, with the learned tokens added to its text encoder
    device = pick_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    pipe = load_stable_diffusion(args.model_path, "text2img", device=device, dtype=dtype)
    tokens = load_tokens_into_pipeline(args.embed_path, pipe.tokenizer, pipe.text_encoder,
                                       getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None))
    check_prompts(args.prompt, tokens, args.embed_path)
    resolution = args.resolution or default_resolution(pipe.unet, pipe.vae)
    logger.info("%d of %d images to generate at %d px, %d steps, guidance %.1f, on %s", len(todo), len(plan),
                resolution, args.num_inference_steps, args.guidance_scale, device)

    # 2. generate in batches; image idx always gets its own generator, so batching does not change it
    batches = [todo.iloc[start:start + args.batch_size] for start in range(0, len(todo), args.batch_size)]
    for batch in tqdm(batches, desc="generate", unit="batch"):
        generators = [torch.Generator(device="cpu").manual_seed(int(seed)) for seed in batch["seed"]]
        images = pipe(prompt=list(batch["prompt"]), generator=generators, guidance_scale=args.guidance_scale,
                      num_inference_steps=args.num_inference_steps, height=resolution, width=resolution).images
        for image, path in zip(images, batch["path"]):
            atomic_save_image(image, path)

    atomic_write_csv(plan, out / "manifest.csv")
    logger.info("wrote %d images and manifest.csv to %s", len(todo), out)


if __name__ == "__main__":
    run_cli(main, parse_args)

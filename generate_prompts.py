"""Class-specific prompts from a language model (DIAGen contribution b).

For every class of `--dataset`, ask a language model for `--prompts-per-class` distinct captions such as
"a photo of a red {name} on a rainy street at night", and write them to `--outdir/--out-filename` as the
`;`-delimited CSV that `train_classifier.py --use-generated-prompts 1 --prompt-path ...` reads.

Offline (default, downloads nothing):
    python generate_prompts.py --dataset custom_coco --prompts-per-class 5 --out-filename custom_coco_qwen.csv
Any OpenAI-compatible API (key in OPENAI_API_KEY or a .env file):
    python generate_prompts.py --dataset custom_coco --prompts-per-class 5 --model gpt-4o-mini \\
        --base-url http://127.0.0.1:8000/v1

The CSV is rewritten atomically after each class; a rerun skips the classes it already holds (`--overwrite`
regenerates them). Classes the model cannot fill after `--max-tries` requests are named in the final error.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from tqdm.auto import tqdm

from semantic_aug.datasets import (DatasetChoices, add_dataset_module_argument, create_dataset, get_dataset_class,
                                   list_datasets)
from semantic_aug.stages.llm import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT_S, DTYPES, SHORT_NAMES, create_llm
from semantic_aug.stages.prompts import (CONTENT_STYLES, DEFAULT_CONTENT, generate_class_prompts, read_prompt_csv,
                                  write_prompt_csv)
from semantic_aug.core.utils import HelpFormatter, UserError, remove_interrupted_writes, run_cli

logger = logging.getLogger("generate_prompts")

DEFAULT_MODEL = "qwen2.5-coder-1.5b"
HTTP_LOGGERS = ("httpx", "httpx2")
EDGE_CASE_CONTENT = "uncommonSetting"  # what the reference's `--content-gpt edge_cases` asked GPT for


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--outdir", default="prompts", help="folder of the prompt CSV (default: %(default)s)")
    parser.add_argument("--out-filename", default="prompts.csv",
                        help="file name of the prompt CSV inside --outdir (default: %(default)s)")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"language model: an offline short name ({', '.join(SHORT_NAMES)}), a .gguf file, "
                             f"a local model folder, a hub id (e.g. the reference's Llama-2-7b-chat-hf), or an API "
                             f"model (gpt-4o, gpt-4o-mini, ...; any name together with --base-url); "
                             f"default: %(default)s")
    parser.add_argument("--prompts-per-class", type=int, default=10,
                        help="distinct prompts every class gets (default: %(default)s)")
    parser.add_argument("--dataset", default="coco", choices=DatasetChoices(list_datasets()),
                        help="dataset whose classes get prompts (default: %(default)s)")
    parser.add_argument("--data-dir", default=None,
                        help="dataset folder; only needed where the class names come from the data (coco, folder)")
    add_dataset_module_argument(parser)
    parser.add_argument("--classes", nargs="+", default=None, help="only these classes (default: all of the dataset)")
    parser.add_argument("--content", default=None, choices=CONTENT_STYLES,
                        help=f"prompt style: the class in varied settings, with visual adjectives, both, or in "
                             f"uncommon settings (default {DEFAULT_CONTENT})")
    parser.add_argument("--content-gpt", default="normal", choices=("normal", "edge_cases"),
                        help=f"the reference's style switch for GPT models: edge_cases means "
                             f"--content {EDGE_CASE_CONTENT}")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed: the same seed and model give the same CSV")
    parser.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                        help="regenerate classes the output CSV already holds (default: skip them, i.e. resume)")
    parser.add_argument("--max-tries", type=int, default=5,
                        help="requests per class at most before the class counts as failed (default: %(default)s)")
    parser.add_argument("--base-url", default=None,
                        help="URL of an OpenAI-compatible server (vLLM, Ollama, LM Studio), "
                             "e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help="API only: seconds per request (default: %(default)s)")
    parser.add_argument("--max-retries", type=int, default=DEFAULT_MAX_RETRIES,
                        help="API only: retries of a request after HTTP 429/5xx or a timeout, with exponential backoff "
                             "(default: %(default)s)")
    parser.add_argument("--device", default=None,
                        help="local models only: cpu, cuda, cuda:N or a GPU index (default: a GPU if present)")
    parser.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                        help="local models only: weight dtype (auto: float32 on CPU, bfloat16/float16 on GPU)")
    args = parser.parse_args()
    if args.content_gpt == "edge_cases":
        if args.content not in (None, EDGE_CASE_CONTENT):
            parser.error(f"--content-gpt edge_cases means --content {EDGE_CASE_CONTENT}; "
                         f"it cannot go with --content {args.content}")
        args.content = EDGE_CASE_CONTENT
    args.content = args.content or DEFAULT_CONTENT
    for flag, value, minimum in (("--prompts-per-class", args.prompts_per_class, 1), ("--max-tries", args.max_tries, 1),
                                 ("--max-retries", args.max_retries, 0)):
        if value < minimum:
            parser.error(f"{flag} must be at least {minimum}, got {value}")
    if args.timeout <= 0:
        parser.error(f"--timeout must be positive, got {args.timeout}")
    return args


def load_class_names(dataset: str, data_dir: str | None) -> list[str]:
    """The dataset's class names; built from the data only where they live there (COCO's annotations)."""
    dataset_class = get_dataset_class(dataset)
    if dataset_class.class_names:
        return list(dataset_class.class_names)
    if hasattr(dataset_class, "classes_in"):  # folder: the class folders of data_dir, no image read
        return list(dataset_class.classes_in(data_dir))
    # the test split is the cheapest to build for COCO (val2017's annotations are a tenth of train2017's)
    split = "test" if "test" in dataset_class.splits else dataset_class.splits[0]
    return list(create_dataset(dataset, split=split, data_dir=data_dir).class_names)


def select_classes(class_names: list[str], wanted: list[str] | None) -> list[str]:
    """`wanted` (in dataset order), or every class; unknown names are a `UserError` that lists the known ones."""
    if wanted is None:
        return class_names
    unknown = [name for name in wanted if name not in class_names]
    if unknown:
        raise UserError(f"--classes {' '.join(unknown)}: not classes of this dataset; known: {', '.join(class_names)}")
    return [name for name in class_names if name in wanted]


def load_finished(out_path: Path, overwrite: bool) -> dict[str, list[str]]:
    """The prompts already in the output CSV (to keep and skip), or none when it does not exist."""
    if not out_path.exists():
        return {}
    try:
        return read_prompt_csv(out_path)
    except UserError as error:
        if overwrite:
            return {}
        raise UserError(f"{error} (fix or move the file, or pass --overwrite)") from None


def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for http_logger in HTTP_LOGGERS:  # one line per request buries the progress bar; the SDK still logs retries
        logging.getLogger(http_logger).setLevel(logging.WARNING)
    out_path = Path(args.outdir) / args.out_filename
    num_prompts = args.prompts_per_class

    # 1. the classes, and those a previous run already finished (resume; a killed write left only a temporary)
    class_names = load_class_names(args.dataset, args.data_dir)
    classes = select_classes(class_names, args.classes)
    remove_interrupted_writes(out_path)
    prompts = load_finished(out_path, args.overwrite)
    todo = [name for name in classes if args.overwrite or len(prompts.get(name, ())) != num_prompts]
    logger.info("%s: %d classes, %d to do, %d prompts each (%s), model %s -> %s", args.dataset, len(classes),
                len(todo), num_prompts, args.content, args.model, out_path)
    if not todo:
        return

    # 2. ask the language model class by class; the CSV is rewritten atomically after every finished class
    llm = create_llm(args.model, base_url=args.base_url, device=args.device, dtype=args.dtype, timeout=args.timeout,
                     max_retries=args.max_retries)
    failed = []
    for class_name in tqdm(todo, desc="classes", unit="class"):
        try:
            class_prompts = generate_class_prompts(llm, class_name, num_prompts, args.content, args.seed,
                                                   args.max_tries)
        except UserError as error:  # the model's backend gave up: say where, and that finished classes are kept
            raise UserError(f"class {class_name}: {error} (finished classes are kept in {out_path}; rerun to "
                            f"resume)") from None
        if len(class_prompts) < num_prompts:
            failed.append(f"{class_name} ({len(class_prompts)}/{num_prompts})")
            continue
        prompts[class_name] = class_prompts
        ordered = {name: prompts[name] for name in class_names if name in prompts}
        ordered.update({name: values for name, values in prompts.items() if name not in ordered})
        write_prompt_csv(ordered, out_path)

    # 3. every class has exactly num_prompts prompts, or the run fails naming those it could not fill
    if failed:
        raise UserError(f"{args.model} gave too few distinct prompts after {args.max_tries} tries for: "
                        f"{', '.join(failed)}; the other classes are in {out_path}. Rerun with more --max-tries, "
                        f"another --seed or a larger --model")
    logger.info("wrote %d prompts for %d classes to %s", num_prompts * len(todo), len(todo), out_path)


if __name__ == "__main__":
    run_cli(main, parse_args)

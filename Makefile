# lorafleet — the two set-up commands are `make demo` and `make test`; both install everything first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Without an NVIDIA GPU, install the CPU build of torch (a plain `pip install torch` pulls
# several GB of CUDA packages). pip finds torch 2.13.0+cpu in its find-links on these
# machines; elsewhere set TORCH_INDEX=https://download.pytorch.org/whl/cpu.
TORCH_CPU ?= torch==2.13.0+cpu
TORCH_GPU ?= torch>=2.4,<=2.14.1
TORCH_INDEX ?=
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
COMMA  := ,
EXTRAS := dev$(if $(HAS_GPU),$(COMMA)gpu)

.PHONY: install demo up down status samples test reliability audit lint format toy-world quality train tune evaluate serve bench-train bench-tune bench-eval bench-serve bench-gpu browser clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) "$(if $(HAS_GPU),$(TORCH_GPU),$(TORCH_CPU))"
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	$(BIN)/python -c "import torch; print('torch', torch.__version__, 'cuda' if torch.cuda.is_available() else 'cpu')"
	touch $(STAMP)

# The main job on the embedded default: a local cluster on 127.0.0.1, the toy dataset, the pipeline as a Ray job
# (tune -> evaluate -> gate -> register -> serve -> smoke test), then SDK images: runs/demo/before_after.png.
# MODEL=toy-sdxl runs it on models/toy-sdxl (SDXL's architecture): the tune trials' base model, served by the pipeline,
# registered as toy-sks-sdxl-lora (a registered model holds one base model's adapters), grid before_after-toy-sdxl.png
# (README, "The toy world": ~7.5 min on 2 cores).
MODEL ?=
demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m cluster.demo $(if $(MODEL),"tune.overrides=[trial.base_model=models/$(MODEL)]" \
	  name=toy-sks-$(subst toy-,,$(MODEL)) --out runs/demo/before_after-$(MODEL).png) $(ARGS)

# A local Ray head (dashboard 127.0.0.1:8265) + MLflow server (127.0.0.1:5000); state in runs/cluster. `make down` stops both.
up: $(STAMP)
	$(BIN)/lorafleet up

down: $(STAMP)
	$(BIN)/lorafleet down

status: $(STAMP)
	$(BIN)/lorafleet status

# Sample seeded images from the shipped toy model (runs/samples/grid.png).
samples: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m training.toy_world sample --model models/toy-sd --out runs/samples --n 12

# Fine-tune a LoRA on the toy dataset with Ray Train (local Ray on loopback) -> runs/train/adapter
train: $(STAMP)
	@test -d data/toy-sks || $(BIN)/python -m training.toy_world dataset data/toy-sks
	HF_HUB_OFFLINE=1 $(BIN)/python -m training.train --config configs/train.yaml $(if $(RESUME),--resume)

# Search rank / lr / optimizer / epochs with Ray Tune + Optuna + ASHA -> runs/tune/toy-sks/best.json (RESUME=1 continues)
tune: $(STAMP)
	@test -d data/toy-sks || $(BIN)/python -m training.toy_world dataset data/toy-sks
	@test -d data/toy-sks/heldout || { echo "data/toy-sks has no heldout/ (written by older versions): move it away and rerun"; exit 1; }
	HF_HUB_OFFLINE=1 $(BIN)/python -m tuning.tune --config configs/tune.yaml $(if $(RESUME),--resume)

# Score an adapter on the toy suite, gate it, register it (champion on a pass). ADAPTER=dir|runs:/…|models:/…
# MLflow: $MLFLOW_TRACKING_URI, else `lorafleet up`'s server while it runs, else runs/eval/mlflow.db (view: mlflow ui --backend-store-uri sqlite:///runs/eval/mlflow.db)
ADAPTER ?= runs/train/adapter
evaluate: $(STAMP)
	@test -d data/toy-sks || $(BIN)/python -m training.toy_world dataset data/toy-sks
	HF_HUB_OFFLINE=1 $(BIN)/python -m evaluation.evaluate --adapter $(ADAPTER) --config configs/eval.yaml

# Serve the registry's champion + the base model: http://127.0.0.1:8000 (web page /, API docs /docs).
# Needs the MLflow server of configs/serve.yaml (tracking_uri) holding a toy-sks-lora champion (make evaluate).
serve: $(STAMP)
	RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 HF_HUB_OFFLINE=1 $(BIN)/serve run --address local configs/serve.yaml

bench-serve: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/serve_throughput.py

# Headless Chromium + its driver for the web-page test (Debian packages; needs root, skipped when present).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }

bench-tune: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/tune_efficiency.py

bench-eval: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/eval_gate.py $(if $(wildcard runs/train/adapter),--adapter runs/train/adapter)

bench-train: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/train_throughput.py --epochs 12

# SD-1.5-scale training + serving speed with random weights (GPU; on CPU: ARGS=--tiny) -> runs/benchmarks/gpu_bench/
bench-gpu: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/gpu_bench.py --out runs/benchmarks/gpu_bench $(ARGS)

test: $(STAMP) lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q --durations=25

# Load, soak, fault and churn scenarios too long for `make test` (35+ min on 2 cores: churn, e2e stop/resume and a second dataset's whole pipeline,
# the gate's calibration on the `framed` concept, Tune resume after a killed driver, fuzzing, soak;
# plus the fine-tuning API's gate failure and Serve restart, and the queue burst of 20 jobs from 4 tenants: LORAFLEET_QUEUE_JOBS/LORAFLEET_QUEUE_TENANTS
# for fewer, tests/cluster/test_finetune_queue.py); figures go into docs/reliability.md.
reliability: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -s -m reliability -p no:cacheprovider
	HF_HUB_OFFLINE=1 LORAFLEET_FUZZ_EXAMPLES=200 $(BIN)/python -m pytest -q -s -p no:cacheprovider \
	  tests/serving/test_app.py -k fuzzing
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/serve_reliability.py

# Known vulnerabilities in the installed dependencies (pip-audit; the report goes to the log).
audit: $(STAMP)
	$(BIN)/python .ci/audit.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Rebuild models/toy-sd and models/toy-clip from scratch (~25 min on 2 CPU cores).
toy-world: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m training.toy_world build --config configs/toy_world.yaml

# Measure the toy world's quality bar; refreshes the README's sample grid.
quality: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m evaluation.toy_quality --grid docs/toy_sd_samples.png

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache *.egg-info

# Every target sets itself up: a virtualenv with the pinned CPU torch and kineflow. The main
# job installs only what kineflow needs; `make test` / `make lint` add the dev extras (pytest,
# ruff, and transformers / diffusers as parity references: ~1 GB more).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
BASE   := $(VENV)/.kineflow-base
DEV    := $(VENV)/.kineflow-dev
# Pinned: an unpinned torch, asked for by any package, pulls a multi-GB CUDA build.
PIN    := $(VENV)/constraints.txt

.PHONY: demo demo-flow reproduce compare claims claims-fudoki test bench lint clean finetune-example

$(BASE): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	echo "torch==2.13.0" > $(PIN)
	$(PY) -m pip install --quiet -c $(PIN) torch==2.13.0
	$(PY) -m pip install --quiet -c $(PIN) -e .
	touch $@

# The browser test of `kineflow serve` drives Debian's chromium (playwright's own browser
# download is not used); installed here only when missing, with sudo only when not root.
$(DEV): $(BASE)
	$(PY) -m pip install --quiet -c $(PIN) -e '.[dev]'
	[ -x /usr/bin/chromium ] || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }
	touch $@

# The main job: the tiny FUDOKI and UniFluid models shipped in checkpoints/ generate, answer
# and (UniFluid) edit ShapesWorld pictures (< 1 min). float64: the same pictures on every CPU
# (in float32 a few of FUDOKI's depend on the instruction set; README, "Scores and the CPU").
demo: $(BASE)
	$(PY) -m kineflow showcase --model checkpoints/fudoki-shapes --out outputs/showcase/fudoki \
		--dtype float64
	$(PY) -m kineflow showcase --model checkpoints/unifluid-shapes \
		--out outputs/showcase/unifluid --dtype float64

# The flow core alone: metric / uniform / masked paths with an exact denoiser.
demo-flow: $(BASE)
	$(PY) -m kineflow demo --out outputs/demo

# Everything behind the shipped checkpoints, from scratch: the encoders, then each shipped
# model's recipe stage by stage (~3 h on 2 CPU cores, estimated from the stages' times;
# resumable; README "Reproduction on ShapesWorld").
reproduce: $(BASE)
	$(PY) -m kineflow reproduce --config configs/reproduce.yaml --ship checkpoints

# The compared models at equal training compute, one seed (~105 min on 2 CPU cores).
compare: $(BASE)
	$(PY) -m kineflow reproduce --config configs/compare.yaml

# The papers' claims on three training seeds (resumable; docs/reproduction/claims/results.md).
claims: $(BASE)
	$(PY) -m kineflow reproduce --config configs/claims.yaml

# The discrete models' claims on three seeds at 2400 steps each, where the flow models draw
# something (resumable; docs/reproduction/claims_fudoki/results.md).
claims-fudoki: $(BASE)
	$(PY) -m kineflow reproduce --config configs/claims_fudoki.yaml

# LoRA fine-tuning of the shipped FUDOKI model on Fashion-MNIST (docs/finetune.md); installs
# Debian's dataset-fashion-mnist when its files are missing (needs root or sudo).
# One thread unless OMP_NUM_THREADS says otherwise: on a 2-core machine shared with other jobs,
# torch's 2 threads made each step 6-10x slower (measured, docs/finetune.md).
FASHION := /usr/share/datasets/fashion-mnist
finetune-example: $(BASE)
	@test -e $(FASHION)/t10k-labels-idx1-ubyte.gz || test -e $(FASHION)/t10k-labels-idx1-ubyte || \
		{ SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); $$SUDO apt-get update -q && \
		  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist; }
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m kineflow.apps.finetune_example --root $(FASHION) \
		--out outputs/finetune_example

# Two pytest workers (pytest-xdist), one test file each at a time: most tests run one torch
# thread, so a second worker uses the second core (8 min on a clean clone of a 2-core machine).
TEST_WORKERS ?= 2
test: $(DEV)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile
	$(PY) -m ruff check kineflow tests bench

bench: $(BASE)
	$(PY) bench/solver_speed.py
	$(PY) bench/solver_quality.py
	$(PY) bench/detector_robustness.py
	$(PY) bench/inference.py
	$(PY) bench/ar_decoding.py
	$(PY) bench/unifluid_decoding.py

lint: $(DEV)
	$(PY) -m ruff check kineflow tests bench
	$(PY) -m ruff format --check kineflow tests bench

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache

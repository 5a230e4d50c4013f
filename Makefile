# Every target sets itself up: a virtualenv with the pinned CPU torch and kineflow[dev].
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kineflow-installed

.PHONY: demo demo-flow reproduce test bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# Pinned: an unpinned torch pulls a multi-GB CUDA build on CPU-only machines.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# The main job: the tiny FUDOKI and UniFluid models shipped in checkpoints/ generate, answer
# and (UniFluid) edit ShapesWorld pictures (< 1 min).
demo: $(STAMP)
	$(PY) -m kineflow showcase --model checkpoints/fudoki-shapes --out outputs/showcase/fudoki
	$(PY) -m kineflow showcase --model checkpoints/unifluid-shapes --out outputs/showcase/unifluid

# The flow core alone: metric / uniform / masked paths with an exact denoiser.
demo-flow: $(STAMP)
	$(PY) -m kineflow demo --out outputs/demo

# Everything behind the shipped checkpoints, from scratch (~105 min on 2 CPU cores).
reproduce: $(STAMP)
	$(PY) -m kineflow reproduce --config configs/reproduce.yaml --ship checkpoints

test: $(STAMP)
	$(PY) -m pytest -q
	$(PY) -m ruff check kineflow tests bench

bench: $(STAMP)
	$(PY) bench/solver_speed.py
	$(PY) bench/solver_quality.py
	$(PY) bench/detector_robustness.py
	$(PY) bench/inference.py
	$(PY) bench/ar_decoding.py
	$(PY) bench/unifluid_decoding.py

lint: $(STAMP)
	$(PY) -m ruff check kineflow tests bench
	$(PY) -m ruff format --check kineflow tests bench

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache

# Two set-up commands: `make install`, then `make test` (what CI runs, see .ci/run).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install test test-all test-browser mutants data benchmark-data benchmark perf perf-gpu clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# Fast offline suite: tiny random models on CPU, no network.
test: install
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -q

# Everything, including tests marked `slow`.
test-all: install
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -q -m ''

# The app in a real browser (selenium + Debian's chromium/chromedriver, installed with apt-get when
# missing; nothing downloaded at run time). Screenshot: outputs/test-browser/app.png.
test-browser: install
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update && $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y chromium chromium-driver; }
	DREAMMIX_BROWSER_TEST=1 DREAMMIX_SCREENSHOT_DIR=outputs/test-browser HF_HUB_OFFLINE=1 WANDB_MODE=offline \
		GRADIO_ANALYTICS_ENABLED=False $(PY) -m pytest -q -rs tests/test_browser.py

# Mutation testing of the method's core ([tool.mutmut] in pyproject.toml): hours on 2 CPU cores, not
# part of CI. MUTANTS='dreammix.losses*' limits a run; a stopped run resumes where it was. Scores per
# module against the targets, and the survivors, go to outputs/mutants/report.md (exit 1 while a
# target is unmet or the run incomplete).
MUTANTS ?=
mutants: install
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(VENV)/bin/mutmut run $(MUTANTS)
	$(PY) scripts/mutation_report.py --out outputs/mutants/report.md

# DreamBooth + COCO val2017 (+ test2017 for FID, Inception weights) into data/, checksummed, resumable.
# Standard library only: works before `make install`.
data:
	$(PYTHON) scripts/download_data.py

# The §4.1 benchmark (COCO backgrounds x 30 subjects) into data/benchmark/.
benchmark-data: install
	$(PY) src/build_benchmark.py

# The whole reproduction (paper Tables 1 and 3) on the paper's base (model=fooocus): benchmark -> LoRAs
# (+ADM) -> generation -> scores -> outputs/benchmark/<preset>/table1.md, table3.md. PRESET=paper (the
# paper's text) | reference (the public code; conf/preset/). BENCH=tiny: the same chain offline on CPU
# in a minute or two (tiny models, 2 subjects from ../shared/data/coco_mini) -> outputs/benchmark/tiny/<preset>/.
# EXECUTOR=local|ray|slurm runs the jobs (manifest, ADM, trainings, evaluations) in this process, on
# Ray (WORKERS=N jobs at once on a local instance; RAY_ADDRESS=auto joins a cluster) or on SLURM;
# ARGS='...' adds overrides (e.g. ARGS='bench.dry_run=true' lists every job and its command).
BENCH ?= full
PRESET ?= paper
EXECUTOR ?= local
WORKERS ?=
RAY_ADDRESS ?=
ARGS ?=
benchmark: install
	$(if $(filter tiny,$(BENCH)),HF_HUB_OFFLINE=1 )WANDB_MODE=$${WANDB_MODE:-offline} $(PY) src/benchmark.py bench=$(BENCH) preset=$(PRESET) \
		bench.executor=$(EXECUTOR)$(if $(WORKERS), bench.ray.num_workers=$(WORKERS))$(if $(RAY_ADDRESS), bench.ray.address=$(RAY_ADDRESS)) $(ARGS)

# Performance report (ours vs same-run baselines) into outputs/perf/: tiny model on CPU ...
perf: install
	HF_HUB_OFFLINE=1 $(PY) -m dreammix.perf --model tiny --out outputs/perf

# ... and the real SDXL architectures (random weights) on a CUDA GPU.
perf-gpu: install
	HF_HUB_OFFLINE=1 $(PY) -m dreammix.perf --model sdxl_arch --out outputs/perf-gpu

clean:
	rm -rf $(VENV) .pytest_cache mutants

# terrafm-lightning make targets. `make test` and `make demo` work on a fresh clone.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint docs demo eval data-synthetic data-majortom data-majortom-remote data-geotiff data-worldcover data-stats data-validate data-benchmarks

install: $(STAMP)

# Reinstall when the dependency list or the pins change.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# The filter drops this machine's noisy "index location ignored" warnings; pipefail keeps
	# pip's exit status.
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,docs]' 2>&1 | { grep -v "is ignored: it is neither" || true; }
	$(BIN)/python -c "import terrafm_lightning, torch, torchvision, timm"
	touch $(STAMP)

# The whole method on one CPU machine in minutes: synthetic store -> `terrafm fit --config
# experiments/demo.yaml` -> kNN / linear probes vs random init -> report in DEMO_OUT (README.md +
# PNGs). DUAL_CENTERING=0 runs the plain-DINO-centring ablation into its own folder.
DUAL_CENTERING ?= 1
DEMO_OUT ?= $(if $(filter 0,$(DUAL_CENTERING)),reports/demo-dino-centering,reports/demo)

demo: install
	$(BIN)/python -m terrafm_lightning.demo.run --out $(DEMO_OUT) \
		$(if $(filter 0,$(DUAL_CENTERING)),--no-dual-centering)

# Downstream evaluation: the paper's tables (kNN 100% / 1%, frozen probes, fine-tuning with
# FINETUNE_EPOCHS > 0, segmentation probes, UPerNet with UPERNET=1) on every benchmark found
# under DATA, next to the random-init baseline and the paper's TerraFM-B column; results.md /
# .json / .png in EVAL_OUT (docs/evaluation.md). CKPT = pretraining checkpoint (teacher), or
# RELEASED = TerraFM-B.pth (with BACKBONE=terrafm_large for TerraFM-L.pth). Each variable below
# maps to one option of the report and is passed only when set: the defaults live in the report
# (`python -m terrafm_lightning.eval.report --help` prints them).
# $(call option,VAR,--flag): "--flag $(VAR)" when VAR is set; $(call switch,VAR,--flag): "--flag"
# when VAR=1.
option = $(if $($(1)),$(2) $($(1)))
switch = $(if $(filter 1,$($(1))),$(2))

eval: install
	$(BIN)/python -m terrafm_lightning.eval.report $(call option,CKPT,--ckpt) \
		$(call option,RELEASED,--released) $(call option,BACKBONE,--backbone) \
		$(if $(BACKBONE_KWARGS),--backbone-kwargs '$(BACKBONE_KWARGS)') \
		$(call option,DATA,--data) $(call option,EVAL_OUT,--out) \
		$(call option,EVAL_EPOCHS,--epochs) $(call option,PROBE_STEPS,--probe-steps) \
		$(call option,FINETUNE_EPOCHS,--finetune-epochs) $(call switch,UPERNET,--upernet) \
		$(call option,SEEDS,--seeds) $(call option,EVAL_BATCH_SIZE,--batch-size) \
		$(call option,EVAL_WORKERS,--num-workers) $(call option,SPLIT_SEED,--split-seed) \
		$(call option,MIN_TEST_SAMPLES,--min-test-samples) $(call switch,DEBUG,--debug)

test: install
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check src tests benchmarks data_prep
	$(BIN)/ruff format --check src tests benchmarks data_prep

# The documentation site (MkDocs Material + mkdocstrings) into site/; --strict fails on a broken
# link, nav entry or API reference.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# Data preparation (terrafm-data; see docs/data_store.md). STORE is the output store path or URL;
# OPTS adds options to the command, e.g. OPTS="--match '(?P<key>.+)_s[12]_(?P<p>.+)\.tif'".
STORE ?= data/store.zarr
OPTS ?=
SAMPLES ?= 256
TILE_SIZE ?= 534
GEOTIFF ?= ../shared/data/terramind_examples
WORLDCOVER ?= ../shared/data/worldcover
MAJORTOM ?= data/majortom

data-synthetic: install
	$(BIN)/terrafm-data synthetic $(STORE) --samples $(SAMPLES) --tile-size $(TILE_SIZE) $(OPTS)

# MAJORTOM holds Core-S1RTC, Core-S2L1C and Core-S2L2A folders (metadata.parquet + images/).
data-majortom: install
	$(BIN)/terrafm-data majortom $(STORE) --s1 $(MAJORTOM)/Core-S1RTC \
		--s2-l1c $(MAJORTOM)/Core-S2L1C --s2-l2a $(MAJORTOM)/Core-S2L2A --tile-size $(TILE_SIZE) $(OPTS)

# A Major-TOM Core subset read straight from the published parquets (only the selected rows),
# e.g. OPTS="--bbox 8 54.5 13 58 --max-cloud 10 --cells 100" (add --dry-run to see its cost).
# BASE_URL: a mirror, a local copy or s3:// instead of Hugging Face (docs/getting_data.md).
BASE_URL ?=
data-majortom-remote: install
	$(BIN)/terrafm-data majortom-remote $(STORE) --tile-size $(TILE_SIZE) \
		$(if $(BASE_URL),--base-url $(BASE_URL)) $(OPTS)

# The paper's benchmarks fetched, verified and laid out for `make eval DATA=...`
# (data_prep/benchmarks.py; NAMES: e.g. "geobench copernicus landslide4sense", default all).
NAMES ?=
data-benchmarks: install
	@test -n "$(DATA)" || { echo "make data-benchmarks: give DATA=<folder for the benchmarks>"; exit 2; }
	$(BIN)/python data_prep/benchmarks.py $(DATA) $(NAMES) $(OPTS)

data-geotiff: install
	$(BIN)/terrafm-data geotiff $(GEOTIFF) $(STORE) $(OPTS)

data-worldcover: install
	$(BIN)/terrafm-data worldcover $(STORE) $(WORLDCOVER) $(OPTS)

data-stats: install
	$(BIN)/terrafm-data stats $(STORE) $(OPTS)

data-validate: install
	$(BIN)/terrafm-data validate $(STORE) $(OPTS)

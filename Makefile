# cars_tl: the study as a pipeline of real file targets.
#   make demo   the whole chain offline on generated data (random weights, small settings)
#   make test   the test suite
#   make all    the study: download -> features -> B, C -> A, D -> predict -> sparsity -> report
#   make all PRESET=tuned   our best settings: squash 288 px features, tuned head, CV-tuned SVM, tuned finetune
#   make help   every variable
# `make` reruns only what is stale: each stage depends on its inputs and on a stamp file of its
# options, rewritten only when the options change (so SVM_KERNEL=rbf reruns just the SVM and the report).

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CARS := $(BIN)/cars-tl
# This machine keeps torch/torchvision on disk (pip is capped there by /etc/xdg/pip); elsewhere the ranges in pyproject.toml apply.
TORCH_LOCAL := $(shell test -e /etc/xdg/pip && echo "torch==2.14.1 torchvision==0.29.1")

DATA ?= data
SOURCE ?= auto
ARTIFACTS ?= artifacts
BACKBONE ?= resnet50
WEIGHTS ?= imagenet
PRESET ?= study
DEVICE ?= auto
PRECISION ?= auto
EPOCHS ?=
BATCH ?=
TUNED := $(filter tuned,$(PRESET))
# PRESET=tuned: the resize mode and size measured best in benchmarks/bench_accuracy.py (README).
RESIZE ?= $(if $(TUNED),squash,crop)
IMAGE_SIZE ?= $(if $(TUNED),288,)
CROP ?= full
WORKERS ?=
SVM_KERNEL ?= poly
# study: scikit-learn's defaults (C=1, gamma=scale); tuned: both chosen by 5-fold CV on train.
SVM_C ?= $(if $(TUNED),auto,1.0)
SVM_GAMMA ?= $(if $(TUNED),cv,scale)
SVM_SCALE ?= l2
UNFREEZE_D ?= $(if $(findstring timm/,$(BACKBONE)),blocks.6,layer4)
SPARSITY_IMAGES ?= 32

RUNS := $(ARTIFACTS)/runs
OPTS := $(ARTIFACTS)/.options
MANIFEST := $(DATA)/stanford_cars/manifest.json
FEATURES_TAG := $(subst /,-,$(BACKBONE))-$(notdir $(basename $(WEIGHTS)))$(if $(filter-out crop,$(RESIZE)),-$(RESIZE))$(if $(IMAGE_SIZE),-$(IMAGE_SIZE))
FEATURES := $(ARTIFACTS)/features/$(FEATURES_TAG).h5
HEAD_B := $(RUNS)/B-head-$(PRESET)/metrics.json
SVM_TAG := $(if $(TUNED),-tuned)
SVM_C1 := $(RUNS)/C-svm-$(SVM_KERNEL)$(SVM_TAG)/metrics.json
SVM_ALL := $(RUNS)/C-svm-all-kernels$(SVM_TAG)/metrics.json
FT_A := $(RUNS)/A-scratch-$(PRESET)/metrics.json
FT_D := $(RUNS)/D-$(UNFREEZE_D)-$(PRESET)/metrics.json
PREDICT := $(ARTIFACTS)/predict/predictions.json
SPARSITY := $(ARTIFACTS)/sparsity/sparsity.json
REPORT := $(ARTIFACTS)/report/report.html
TEST_IMAGE := $(DATA)/stanford_cars/cars_test/00001.jpg

RESIZE_OPT := $(if $(filter-out crop,$(RESIZE)),--resize $(RESIZE))
COMMON := $(if $(IMAGE_SIZE),--image-size $(IMAGE_SIZE)) $(RESIZE_OPT) --crop $(CROP) --device $(DEVICE) --precision $(PRECISION) $(if $(WORKERS),--workers $(WORKERS))
# Empty EPOCHS/BATCH: the preset's own (study: 15 epochs, batch 32).
TRAIN := --preset $(PRESET) $(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(BATCH),--batch-size $(BATCH))
# What changes a stage's output (not WORKERS or DEVICE).
SHAPE := $(if $(IMAGE_SIZE),--image-size $(IMAGE_SIZE)) $(RESIZE_OPT) --crop $(CROP) --precision $(PRECISION)
SVM_OPTS := --C $(SVM_C) $(if $(filter-out scale,$(SVM_GAMMA)),--gamma $(SVM_GAMMA)) --scale $(SVM_SCALE)

# The demo: generated images, random weights, 64 px, 2 epochs. A WEIGHTS or BACKBONE given on the
# command line (e.g. a local pretrained file with timm) is kept, at the weights' own image size.
DEMO_WEIGHTS := $(if $(filter command line,$(origin WEIGHTS)),$(WEIGHTS),random)
DEMO_BACKBONE := $(if $(filter command line,$(origin BACKBONE)),$(BACKBONE),resnet50)
DEMO_IMAGE_SIZE := $(if $(filter command line,$(origin WEIGHTS)),,64)

# A stage that fails leaves no target behind: the next make reruns it.
.DELETE_ON_ERROR:

.PHONY: help install test test-fast demo all features B C C-all A D predict sparsity report clean-demo FORCE

help:
	@echo "cars_tl make targets:"
	@echo "  make demo       whole chain offline on generated data (random weights; numbers only show the chain works)"
	@echo "  make test       run the test suite (creates $(VENV) when missing)"
	@echo "  make all        the study end to end: download, features, B, C, A, D, predict, sparsity, report"
	@echo "  make all PRESET=tuned   the same chain with our best settings (squash 288 px, tuned head/SVM/finetune)"
	@echo "  make features | B | C | C-all | A | D | predict | sparsity | report   one stage (and what it needs)"
	@echo ""
	@echo "variables (current value):"
	@echo "  DATA=$(DATA)  SOURCE=$(SOURCE)  ARTIFACTS=$(ARTIFACTS)"
	@echo "  BACKBONE=$(BACKBONE)  WEIGHTS=$(WEIGHTS)  PRESET=$(PRESET)  EPOCHS=$(EPOCHS)  BATCH=$(BATCH)"
	@echo "  DEVICE=$(DEVICE)  PRECISION=$(PRECISION)  IMAGE_SIZE=$(IMAGE_SIZE)  RESIZE=$(RESIZE)  CROP=$(CROP)  WORKERS=$(WORKERS)"
	@echo "  SVM_KERNEL=$(SVM_KERNEL)  SVM_C=$(SVM_C)  SVM_GAMMA=$(SVM_GAMMA)  SVM_SCALE=$(SVM_SCALE)  UNFREEZE_D=$(UNFREEZE_D)  SPARSITY_IMAGES=$(SPARSITY_IMAGES)"

# ----------------------------------------------------------------------------- environment

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(if $(TORCH_LOCAL),$(BIN)/pip install -q $(TORCH_LOCAL))
	$(BIN)/pip install -q -e '.[timm,test]'
	@touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m "not slow"

# ----------------------------------------------------------------------------- option stamps

define stamp
@mkdir -p $(dir $@)
@echo '$(1)' | cmp -s - $@ || echo '$(1)' > $@
endef

# One stamp per output, holding only what changes it: switching PRESET or SVM_KERNEL back and
# forth reuses the runs already made for each value.
$(OPTS)/download: FORCE ; $(call stamp,$(SOURCE))
$(OPTS)/features-$(FEATURES_TAG): FORCE ; $(call stamp,$(BACKBONE) $(WEIGHTS) $(SHAPE))
$(OPTS)/head-$(PRESET): FORCE ; $(call stamp,$(TRAIN))
$(OPTS)/svm-$(SVM_KERNEL)$(SVM_TAG): FORCE ; $(call stamp,$(SVM_C) $(SVM_SCALE)$(if $(filter-out scale,$(SVM_GAMMA)), $(SVM_GAMMA)))
$(OPTS)/svm-all$(SVM_TAG): FORCE ; $(call stamp,$(SVM_C) $(SVM_SCALE)$(if $(filter-out scale,$(SVM_GAMMA)), $(SVM_GAMMA)))
$(OPTS)/A-$(PRESET): FORCE ; $(call stamp,$(BACKBONE) $(TRAIN) $(SHAPE))
$(OPTS)/D-$(UNFREEZE_D)-$(PRESET): FORCE ; $(call stamp,$(BACKBONE) $(WEIGHTS) $(TRAIN) $(SHAPE))
$(OPTS)/sparsity: FORCE ; $(call stamp,$(SPARSITY_IMAGES))

# ----------------------------------------------------------------------------- the study

$(MANIFEST): | $(VENV)/.installed
$(MANIFEST): $(OPTS)/download
	$(CARS) download --data-dir $(DATA) --source $(SOURCE)
	@touch $@

$(FEATURES): $(MANIFEST) $(OPTS)/features-$(FEATURES_TAG)
	$(CARS) extract-features --data-dir $(DATA) --backbone $(BACKBONE) --weights $(WEIGHTS) $(COMMON) --out $@
	@touch $@

$(HEAD_B): $(FEATURES) $(OPTS)/head-$(PRESET)
	$(CARS) train-head --features $(FEATURES) $(TRAIN) --out $(@D)

$(SVM_C1): $(FEATURES) $(OPTS)/svm-$(SVM_KERNEL)$(SVM_TAG)
	$(CARS) fit-svm --features $(FEATURES) --kernel $(SVM_KERNEL) $(SVM_OPTS) --out $(@D)

$(SVM_ALL): $(FEATURES) $(OPTS)/svm-all$(SVM_TAG)
	$(CARS) fit-svm --features $(FEATURES) --kernel all $(SVM_OPTS) --out $(@D)

$(FT_A): $(MANIFEST) $(OPTS)/A-$(PRESET)
	$(CARS) finetune --data-dir $(DATA) --backbone $(BACKBONE) --weights random --unfreeze all $(TRAIN) $(COMMON) --force --out $(@D)

$(FT_D): $(MANIFEST) $(HEAD_B) $(OPTS)/D-$(UNFREEZE_D)-$(PRESET)
	$(CARS) finetune --data-dir $(DATA) --backbone $(BACKBONE) --weights $(WEIGHTS) --unfreeze $(UNFREEZE_D) \
		--init-head $(dir $(HEAD_B)) $(TRAIN) $(COMMON) --force --out $(@D)

# As in the study: one test image through A, B and D (an SVM run can be added with --model too).
$(PREDICT): $(FT_A) $(HEAD_B) $(FT_D)
	@mkdir -p $(@D)
	$(CARS) predict $(TEST_IMAGE) --model $(dir $(FT_A)) --model $(dir $(HEAD_B)) --model $(dir $(FT_D)) --top-k 3
	$(CARS) predict $(TEST_IMAGE) --model $(dir $(FT_A)) --model $(dir $(HEAD_B)) --model $(dir $(FT_D)) --top-k 3 --json > $@.tmp && mv $@.tmp $@

$(SPARSITY): $(FT_A) $(HEAD_B) $(FT_D) $(OPTS)/sparsity
	$(CARS) sparsity --model $(dir $(FT_A)) --model $(dir $(HEAD_B)) --model $(dir $(FT_D)) \
		--split test --limit $(SPARSITY_IMAGES) --data-dir $(DATA) --out $(@D)

$(REPORT): $(HEAD_B) $(SVM_C1) $(SVM_ALL) $(FT_A) $(FT_D) $(PREDICT) $(SPARSITY)
	$(CARS) report --artifacts $(ARTIFACTS)

features: $(FEATURES)
B: $(HEAD_B)
C: $(SVM_C1)
C-all: $(SVM_ALL)
A: $(FT_A)
D: $(FT_D)
predict: $(PREDICT)
sparsity: $(SPARSITY)
report: $(REPORT)
all: $(REPORT)

demo: $(VENV)/.installed
	@echo "== cars_tl demo: generated images, $(DEMO_BACKBONE) with $(DEMO_WEIGHTS) weights."
	@echo "== With random weights and generated images the numbers only show that the chain works."
	$(MAKE) --no-print-directory all DATA=data/demo SOURCE=demo ARTIFACTS=artifacts/demo \
		BACKBONE=$(DEMO_BACKBONE) WEIGHTS=$(DEMO_WEIGHTS) IMAGE_SIZE=$(DEMO_IMAGE_SIZE) EPOCHS=2 BATCH=16 SPARSITY_IMAGES=16 WORKERS=2
	@echo "== demo report: artifacts/demo/report/report.html (and report.md)"

clean-demo:
	rm -rf data/demo artifacts/demo

# cars_tl: the study as a pipeline of real file targets.
#   make demo   the whole chain offline on generated data (random weights, small settings)
#   make test   the test suite
#   make all    the study: download -> features -> B, C, kNN -> A, D -> predict -> sparsity -> report
#   make all SEEDS="0 1 2"   B, A and D once per seed (run names gain -s<seed>); the report shows mean +- std
#   make all PRESET=tuned   our best settings: squash 288 px features, tuned head, CV-tuned SVM, tuned finetune
#   make study  the study exactly as it was: IMAGENET1K_V1 weights, fp32, the study presets
#   make help   every variable
# `make` reruns only what is stale: each stage depends on its inputs and on a stamp file of its
# options, rewritten only when the options change (so SVM_KERNEL=rbf reruns just the SVM and the report).
# make never touches a stage's output: a stage that finds it up to date leaves the file (and its
# time) alone, and the image stages depend on the dataset's content, not on the manifest's time.

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
# Empty: the preset's (study: crop at the weights' size; tuned: squash 288 px, the best measured in
# benchmarks/bench_accuracy.py, README); extract-features --preset tuned adds flip averaging and the
# two-stage features. `cars-tl paths` resolves them from cars_tl/stages/presets.py, as every image
# stage (extract-features, build-trunk, finetune) resolves its --preset.
RESIZE ?=
IMAGE_SIZE ?=
CROP ?= full
WORKERS ?=
# Prefix of the image stages (extract-features, finetune), e.g. LAUNCH="$(BIN)/torchrun --nproc_per_node=8": --batch-size stays global.
LAUNCH ?=
SVM_KERNEL ?= poly
# Empty: the preset's (study: scikit-learn's defaults C=1, gamma=scale; tuned: both chosen by 5-fold CV
# on train; l2 scaling).
SVM_C ?=
SVM_GAMMA ?=
SVM_SCALE ?=
UNFREEZE_D ?= $(if $(findstring timm/,$(BACKBONE)),blocks.6,layer4)
# D trains on the trunk cache (the frozen part's maps, built once for D and all its seeds) where that
# is exact: not under PRESET=tuned, which augments. TRUNK_CACHE=off runs D on the images.
TRUNK_CACHE ?= $(if $(TUNED),off,on)
SPARSITY_IMAGES ?= 32
KNN_K ?= 20
KNN_T ?= 0.07
# Empty or one value: one run per stage, under the usual names. Several: one run per seed, named -s<seed>.
# fit-svm and knn are deterministic (nothing to seed): they run once.
SEEDS ?=
DEMO_SEEDS ?= 0 1
# A folder: every training stage (train-head, finetune) also logs its epochs there for `tensorboard --logdir` (not a stamp option: it changes no output).
TENSORBOARD ?=
TB := $(if $(TENSORBOARD),--tensorboard $(TENSORBOARD))

OPTS := $(ARTIFACTS)/.options
MANIFEST := $(DATA)/stanford_cars/manifest.json
# The dataset's content (the manifest's fingerprint line): what the image stages depend on.
DATASET := $(OPTS)/dataset
USE_TRUNK := $(filter on,$(TRUNK_CACHE))
SEED_LIST := $(or $(strip $(SEEDS)),0)
seed_sfx = $(if $(word 2,$(SEED_LIST)),-s$(1))
empty :=
space := $(empty) $(empty)
comma := ,
seed_opt = $(if $(strip $(SEEDS)),$(space)--seed $(1))

# Every file and run name, and the preset's settings left empty above, come from the CLI
# (`cars-tl paths`: KEY=value lines, no torch imported; the names live in cars_tl/artifacts/names.py),
# read once per make into $(OPTS)/paths.mk: RESIZE, IMAGE_SIZE, SVM_C, SVM_GAMMA, SVM_SCALE,
# FEATURES_TAG, FEATURES, INIT_FEATURES, TRUNK, HEAD_RUN_<seed>, INIT_HEAD_RUN_<seed>, SCRATCH_RUN_<seed>,
# PARTIAL_RUN_<seed>, SVM_RUN, SVM_ALL_RUN, KNN_RUN, PREDICT, SPARSITY, REPORT. Goals that run no stage skip it.
STAGE_GOALS := $(filter-out help install lint test test-slow test-all demo study clean-demo,$(or $(MAKECMDGOALS),$(.DEFAULT_GOAL)))
ifneq ($(STAGE_GOALS),)
ifeq ($(wildcard $(CARS)),)
ifneq ($(findstring n,$(firstword -$(MAKEFLAGS))),)
$(error cars-tl is not installed in $(VENV) yet, and make -n installs nothing: run make install first)
endif
$(info cars-tl is not installed in $(VENV) yet: installing it first (make install))
$(shell $(MAKE) --no-print-directory install >&2)
endif
PATHS_MK := $(OPTS)/paths.mk
# `cars-tl paths` checks every value as its stage would, and that make can carry it as a name (a `$`
# would run a $(shell ...) from paths.mk even under make -n), before anything is written. `quote`
# hands a value to bash as one word, whatever it holds; a newline, which make drops on the way to
# bash, is refused here. The backbone's check imports torch: once per combination that passed (a
# file in $(OPTS)/checked).
quote = '$(subst ','\'',$(1))'
define newline


endef
NEWLINED := $(strip $(foreach v,ARTIFACTS BACKBONE WEIGHTS PRESET RESIZE IMAGE_SIZE SVM_KERNEL SVM_C SVM_GAMMA SVM_SCALE UNFREEZE_D,$(if $(findstring $(newline),$($(v))),$(v))))
# Folders and plain values that never go through `cars-tl paths` are refused here when they hold
# what bash or make would read as code or as two words (LAUNCH and the lists are commands and
# words by design).
UNSAFE := $(strip $(foreach v,DATA SOURCE TENSORBOARD CROP DEVICE PRECISION WORKERS EPOCHS BATCH SPARSITY_IMAGES KNN_T,\
	$(if $(or $(findstring $$,$($(v))),$(findstring ',$($(v))),$(findstring ",$($(v))),$(findstring `,$($(v))),$(findstring \,$($(v))),$(word 2,$($(v)))),$(v))))
ifneq ($(UNSAFE),)
$(error $(firstword $(UNSAFE))='$($(firstword $(UNSAFE)))' holds a space, quote, backslash or $$, which make or bash would split or run: \
	give $(firstword $(UNSAFE)) a value without them (rename the folder, e.g. my_data); nothing was run or written)
endif
ifneq ($(NEWLINED),)
$(error $(firstword $(NEWLINED)) holds a newline, which ends a make line (what follows would be read as a line of its own): \
	give $(firstword $(NEWLINED)) on one line; nothing was run or written)
endif
CHECKED := $(OPTS)/checked/$(subst /,-,$(BACKBONE))-$(UNFREEZE_D)-$(RESIZE)-$(IMAGE_SIZE)
$(shell names=$$($(CARS) paths --artifacts $(call quote,$(ARTIFACTS)) --backbone $(call quote,$(BACKBONE)) --weights $(call quote,$(WEIGHTS)) \
	--preset $(call quote,$(PRESET)) $(if $(RESIZE),--resize $(call quote,$(RESIZE))) $(if $(IMAGE_SIZE),--image-size $(call quote,$(IMAGE_SIZE))) \
	--kernel $(call quote,$(SVM_KERNEL)) $(if $(SVM_C),--C $(call quote,$(SVM_C))) $(if $(SVM_GAMMA),--gamma $(call quote,$(SVM_GAMMA))) \
	$(if $(SVM_SCALE),--scale $(call quote,$(SVM_SCALE))) --unfreeze $(call quote,$(UNFREEZE_D)) $(foreach s,$(SEED_LIST),--seed $(call quote,$(s))) \
	$(if $(wildcard $(CHECKED)),--no-check-backbone)) && mkdir -p $(call quote,$(OPTS)/checked) && touch $(call quote,$(CHECKED)) && \
	printf '%s\n' "$$names" > $(call quote,$(PATHS_MK).$$$$) && mv $(call quote,$(PATHS_MK).$$$$) $(call quote,$(PATHS_MK)) || \
	{ rm -f $(call quote,$(PATHS_MK).$$$$); false; })
ifneq ($(.SHELLSTATUS),0)
$(error stopped before any stage ran: the message above says which value and why (--unfreeze is UNFREEZE_D, --kernel SVM_KERNEL, \
	--C/--gamma/--scale SVM_C/SVM_GAMMA/SVM_SCALE, --seed SEEDS, the others are named alike))
endif
include $(PATHS_MK)
endif
head_run = $(HEAD_RUN_$(1))/metrics.json
init_head_run = $(INIT_HEAD_RUN_$(1))/metrics.json
a_run = $(SCRATCH_RUN_$(1))/metrics.json
d_run = $(PARTIAL_RUN_$(1))/metrics.json
# predict and sparsity look at the first seed's runs.
HEAD_B := $(call head_run,$(firstword $(SEED_LIST)))
FT_A := $(call a_run,$(firstword $(SEED_LIST)))
FT_D := $(call d_run,$(firstword $(SEED_LIST)))
HEADS_B := $(foreach s,$(SEED_LIST),$(call head_run,$(s)))
FTS_A := $(foreach s,$(SEED_LIST),$(call a_run,$(s)))
FTS_D := $(foreach s,$(SEED_LIST),$(call d_run,$(s)))
SVM_TAG := $(if $(TUNED),-tuned)
SVM_C1 := $(SVM_RUN)/metrics.json
SVM_ALL := $(SVM_ALL_RUN)/metrics.json
KNN := $(KNN_RUN)/metrics.json
TEST_IMAGE := $(DATA)/stanford_cars/cars_test/00001.jpg

# Left out only for crop under study, where it is the stages' own default (study commands and stamps
# stay as they were); another preset's stages would take that preset's mode instead.
RESIZE_OPT := $(if $(filter-out crop,$(RESIZE))$(filter-out study,$(PRESET)),--resize $(RESIZE))
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

.PHONY: help install lint test test-slow test-all demo all study features B C C-all kNN A D predict sparsity report clean-demo FORCE

help:
	@echo "cars_tl make targets:"
	@echo "  make demo       whole chain offline on generated data (random weights; numbers only show the chain works)"
	@echo "  make test       run the test suite without the slow tests (creates $(VENV) when missing)"
	@echo "  make test-slow  the tests marked slow; make test-all: both"
	@echo "  make all        the study end to end: download, features, B, C, kNN, A, D, predict, sparsity, report"
	@echo "  make all SEEDS=\"0 1 2\"   B, A and D once per seed; the report groups them (mean +- std, n)"
	@echo "  make all PRESET=tuned   the same chain with our best settings (squash 288 px, tuned head/SVM/finetune)"
	@echo "  make study      the study exactly: IMAGENET1K_V1 weights, fp32, study presets (fetch the weights first:"
	@echo "                  cars-tl download --weights resnet50:IMAGENET1K_V1)"
	@echo "  make features | B | C | C-all | kNN | A | D | predict | sparsity | report   one stage (and what it needs)"
	@echo ""
	@echo "variables (current value):"
	@echo "  DATA=$(DATA)  SOURCE=$(SOURCE)  ARTIFACTS=$(ARTIFACTS)"
	@echo "  BACKBONE=$(BACKBONE)  WEIGHTS=$(WEIGHTS)  PRESET=$(PRESET)  EPOCHS=$(EPOCHS)  BATCH=$(BATCH)"
	@echo "  DEVICE=$(DEVICE)  PRECISION=$(PRECISION)  IMAGE_SIZE=$(or $(IMAGE_SIZE),(the preset's))  RESIZE=$(or $(RESIZE),(the preset's))  CROP=$(CROP)  WORKERS=$(WORKERS)  LAUNCH=$(LAUNCH)"
	@echo "  SVM_KERNEL=$(SVM_KERNEL)  SVM_C=$(or $(SVM_C),(the preset's))  SVM_GAMMA=$(or $(SVM_GAMMA),(the preset's))  SVM_SCALE=$(or $(SVM_SCALE),(the preset's))  UNFREEZE_D=$(UNFREEZE_D)  SPARSITY_IMAGES=$(SPARSITY_IMAGES)"
	@echo "  TRUNK_CACHE=$(TRUNK_CACHE)  KNN_K=$(KNN_K)  KNN_T=$(KNN_T)  SEEDS=$(SEEDS)  DEMO_SEEDS=$(DEMO_SEEDS)  TENSORBOARD=$(TENSORBOARD) (a folder: live TensorBoard logs of train-head and finetune)"

# ----------------------------------------------------------------------------- environment

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(if $(TORCH_LOCAL),$(BIN)/pip install -q $(TORCH_LOCAL))
	$(BIN)/pip install -q -e '.[timm,test]'
	@touch $@

install: $(VENV)/.installed

# make test: the suite without the tests marked slow (multi-process, kill-and-resume, full-disk: each
# 10 s or more here), under 10 minutes on 2 cores; make test-slow runs those; CI runs both.
test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m slow

test-all: $(VENV)/.installed
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

# ----------------------------------------------------------------------------- option stamps

define stamp
@mkdir -p $(dir $@)
@echo '$(1)' | cmp -s - $(call quote,$@) || echo '$(1)' > $(call quote,$@)
endef

# One stamp per output, holding only what changes it: switching PRESET or SVM_KERNEL back and
# forth reuses the runs already made for each value.
$(OPTS)/download: FORCE ; $(call stamp,$(SOURCE))
$(OPTS)/features-$(FEATURES_TAG): FORCE ; $(call stamp,$(BACKBONE) $(WEIGHTS) $(SHAPE) --preset $(PRESET))
$(OPTS)/svm-$(SVM_KERNEL)$(SVM_TAG): FORCE ; $(call stamp,$(SVM_C) $(SVM_SCALE)$(if $(filter-out scale,$(SVM_GAMMA)), $(SVM_GAMMA)))
$(OPTS)/svm-all$(SVM_TAG): FORCE ; $(call stamp,$(SVM_C) $(SVM_SCALE)$(if $(filter-out scale,$(SVM_GAMMA)), $(SVM_GAMMA)))
$(OPTS)/trunk-$(FEATURES_TAG)-$(UNFREEZE_D): FORCE ; $(call stamp,$(BACKBONE) $(WEIGHTS) $(UNFREEZE_D) $(SHAPE))
$(OPTS)/knn: FORCE ; $(call stamp,$(KNN_K) $(KNN_T))
$(OPTS)/sparsity: FORCE ; $(call stamp,$(SPARSITY_IMAGES))

# ----------------------------------------------------------------------------- the study

# The stages' rules need the names above: only goals that run a stage define them.
ifneq ($(STAGE_GOALS),)
$(MANIFEST): | $(VENV)/.installed
# The manifest's time says when download last ran for this SOURCE (it skips work that is done);
# nothing downstream depends on that time, only on the content below.
$(MANIFEST): $(OPTS)/download
	$(CARS) download --data-dir $(DATA) --source $(SOURCE)
	@touch $@

# Rewritten only when the fingerprint changes: a manifest rewritten with the same content
# (download --verify, a SOURCE switched back and forth) reruns nothing.
$(DATASET): $(MANIFEST)
	@mkdir -p $(dir $@)
	@grep -m1 '"fingerprint"' $(call quote,$<) | cmp -s - $(call quote,$@) || grep -m1 '"fingerprint"' $(call quote,$<) > $(call quote,$@)

$(FEATURES): $(DATASET) $(OPTS)/features-$(FEATURES_TAG)
	$(LAUNCH) $(CARS) extract-features --data-dir $(DATA) --backbone $(BACKBONE) --weights $(WEIGHTS) --preset $(PRESET) $(COMMON) --out $@

# B, A and D for one seed ($(1)); D starts from that seed's B.
$(TRUNK): $(DATASET) $(OPTS)/trunk-$(FEATURES_TAG)-$(UNFREEZE_D)
	$(LAUNCH) $(CARS) build-trunk --data-dir $(DATA) --backbone $(BACKBONE) --weights $(WEIGHTS) --unfreeze $(UNFREEZE_D) $(COMMON) --out $@

define seeded_stages
$$(OPTS)/head-$$(PRESET)$(call seed_sfx,$(1)): FORCE ; $$(call stamp,$$(TRAIN)$(call seed_opt,$(1)))
$$(OPTS)/A-$$(PRESET)$(call seed_sfx,$(1)): FORCE ; $$(call stamp,$$(BACKBONE) $$(TRAIN) $$(SHAPE)$(call seed_opt,$(1)))
$$(OPTS)/D-$$(UNFREEZE_D)-$$(PRESET)$(call seed_sfx,$(1)): FORCE ; $$(call stamp,$$(BACKBONE) $$(WEIGHTS) $$(TRAIN) $$(SHAPE)$(call seed_opt,$(1)))

$(call head_run,$(1)): $$(FEATURES) $$(OPTS)/head-$$(PRESET)$(call seed_sfx,$(1))
	$$(CARS) train-head --features $$(FEATURES) $$(TRAIN)$(call seed_opt,$(1)) $$(TB) --force --out $$(@D)

$(call a_run,$(1)): $$(DATASET) $$(OPTS)/A-$$(PRESET)$(call seed_sfx,$(1))
	$$(LAUNCH) $$(CARS) finetune --data-dir $$(DATA) --backbone $$(BACKBONE) --weights random --unfreeze all $$(TRAIN) $$(COMMON)$(call seed_opt,$(1)) $$(TB) --force --out $$(@D)

$(call d_run,$(1)): $$(DATASET) $(call init_head_run,$(1)) $$(OPTS)/D-$$(UNFREEZE_D)-$$(PRESET)$(call seed_sfx,$(1)) $$(if $$(USE_TRUNK),$$(TRUNK))
	$$(LAUNCH) $$(CARS) finetune --data-dir $$(DATA) --backbone $$(BACKBONE) --weights $$(WEIGHTS) --unfreeze $$(UNFREEZE_D) \
		--init-head $$(dir $(call init_head_run,$(1))) $$(TRAIN) $$(COMMON)$(call seed_opt,$(1)) $$(TB) --trunk-cache $$(if $$(USE_TRUNK),$$(TRUNK),off) --force --out $$(@D)
endef
$(foreach s,$(SEED_LIST),$(eval $(call seeded_stages,$(s))))

define init_head_stage
$(call init_head_run,$(1)): $$(INIT_FEATURES) $$(OPTS)/head-$$(PRESET)$(call seed_sfx,$(1))
	$$(CARS) train-head --features $$(INIT_FEATURES) $$(TRAIN)$(call seed_opt,$(1)) --force --out $$(@D)
endef
ifneq ($(TUNED),)
$(foreach s,$(SEED_LIST),$(eval $(call init_head_stage,$(s))))
$(INIT_FEATURES): $(DATASET) $(OPTS)/features-$(FEATURES_TAG)
	$(LAUNCH) $(CARS) extract-features --data-dir $(DATA) --backbone $(BACKBONE) --weights $(WEIGHTS) --preset $(PRESET) --layers final $(COMMON) --out $@
endif

$(SVM_C1): $(FEATURES) $(OPTS)/svm-$(SVM_KERNEL)$(SVM_TAG)
	$(CARS) fit-svm --features $(FEATURES) --kernel $(SVM_KERNEL) $(SVM_OPTS) --force --out $(@D)

$(SVM_ALL): $(FEATURES) $(OPTS)/svm-all$(SVM_TAG)
	$(CARS) fit-svm --features $(FEATURES) --kernel all $(SVM_OPTS) --force --out $(@D)

$(KNN): $(FEATURES) $(OPTS)/knn
	$(CARS) knn --features $(FEATURES) --k $(subst $(space),$(comma),$(strip $(KNN_K))) --temperature $(KNN_T) --force --out $(@D)

# As in the study: one test image through A, B and D (an SVM run can be added with --model too).
$(PREDICT): $(FT_A) $(HEAD_B) $(FT_D)
	@mkdir -p $(@D)
	$(CARS) predict $(TEST_IMAGE) --model $(dir $(FT_A)) --model $(dir $(HEAD_B)) --model $(dir $(FT_D)) --top-k 3
	$(CARS) predict $(TEST_IMAGE) --model $(dir $(FT_A)) --model $(dir $(HEAD_B)) --model $(dir $(FT_D)) --top-k 3 --json > $(call quote,$@.tmp) && mv $(call quote,$@.tmp) $(call quote,$@)

$(SPARSITY): $(FT_A) $(HEAD_B) $(FT_D) $(OPTS)/sparsity
	$(CARS) sparsity --model $(dir $(FT_A)) --model $(dir $(HEAD_B)) --model $(dir $(FT_D)) \
		--split test --limit $(SPARSITY_IMAGES) --data-dir $(DATA) --out $(@D)

$(REPORT): $(HEADS_B) $(SVM_C1) $(SVM_ALL) $(KNN) $(FTS_A) $(FTS_D) $(PREDICT) $(SPARSITY)
	$(CARS) report --artifacts $(ARTIFACTS) --data-dir $(DATA)

features: $(FEATURES)
B: $(HEADS_B)
C: $(SVM_C1)
C-all: $(SVM_ALL)
kNN: $(KNN)
A: $(FTS_A)
D: $(FTS_D)
predict: $(PREDICT)
sparsity: $(SPARSITY)
report: $(REPORT)
all: $(REPORT)
endif

# The study exactly as it was: torchvision's pretrained=True (IMAGENET1K_V1, resize 256), fp32, the
# study presets, in artifacts/study so it never mixes with `make all` runs. The weights must be in the
# torch cache: cars-tl download --weights resnet50:IMAGENET1K_V1
study:
	$(MAKE) --no-print-directory all PRESET=study WEIGHTS=IMAGENET1K_V1 PRECISION=fp32 RESIZE=crop IMAGE_SIZE= \
		ARTIFACTS=$(if $(filter command line,$(origin ARTIFACTS)),$(ARTIFACTS),artifacts/study)

demo: $(VENV)/.installed
	@echo "== cars_tl demo: generated images, $(DEMO_BACKBONE) with $(DEMO_WEIGHTS) weights."
	@echo "== With random weights and generated images the numbers only show that the chain works."
	$(MAKE) --no-print-directory all DATA=data/demo SOURCE=demo ARTIFACTS=artifacts/demo \
		BACKBONE=$(DEMO_BACKBONE) WEIGHTS=$(DEMO_WEIGHTS) IMAGE_SIZE=$(DEMO_IMAGE_SIZE) EPOCHS=2 BATCH=16 SPARSITY_IMAGES=16 WORKERS=2 \
		SEEDS="$(DEMO_SEEDS)"
	@echo "== demo report: artifacts/demo/report/report.html (and report.md)"

clean-demo:
	rm -rf data/demo artifacts/demo

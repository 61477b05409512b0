# gemma4-onnx — every target sets up .venv itself on first use. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CLI := $(BIN)/gemma4-onnx
STAMP := $(VENV)/.installed

VARIANT ?= e2b
RECIPE ?= int4
SOURCE = $(if $(CHECKPOINT),$(CHECKPOINT),$(VARIANT))
OUT ?= build/$(VARIANT)
MODEL ?= build/$(VARIANT)
QOUT ?= build/$(VARIANT)-$(RECIPE)
REPORT ?= build/reports/$(VARIANT)
VARIANTS := e2b e4b 31b 26b-a4b tiny-e2b tiny-e4b tiny-31b tiny-26b-a4b

# $(call STAGE,command,what it wrote): a stage that later work fills in exits 3 with "not built yet";
# the target reports that and succeeds, any other failure fails it.
STAGE = status=0; $(1) || status=$$?; if [ $$status -eq 3 ]; then echo "(stage not built yet: nothing written)"; \
        elif [ $$status -ne 0 ]; then exit $$status; else echo "$(2)"; fi
# RECIPE given on the command line makes `make export` quantize in the same streaming pass.
EXPORT_RECIPE = $(if $(filter command line,$(origin RECIPE)),--recipe $(RECIPE))
TYPECHECK := build/typecheck/gemma4_onnx

.PHONY: help setup test test-long test-slow lint demo export quantize parity report mobile verify bench clean \
        export-all $(addprefix export-,$(VARIANTS))

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_%-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | awk -F'\t' '{printf "  %-18s %s\n", $$1, $$2}'
	@echo "  export-<variant>   export one variant from random weights ($(VARIANTS))"
	@echo "variables: VARIANT=$(VARIANT) CHECKPOINT=DIR RECIPE=$(RECIPE) OUT=DIR MODEL=DIR"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[export,dev]"
	$(BIN)/python -m pip install -q --no-deps onnxruntime-genai==0.18.0
	touch $(STAMP)

setup: $(STAMP) ## create .venv and install everything (torch from the local CPU wheel)

test: $(STAMP) ## run the test suite (unit, op, block, fixtures; under 15 minutes)
	$(BIN)/pytest -m "not slow and not long" -q

test-long: $(STAMP) ## quality gates on the trained fixtures, interrupted and resumed runs (CI runs them after make test)
	$(BIN)/pytest -m long -q

test-slow: $(STAMP) ## full-size and torture tests
	$(BIN)/pytest -m slow -q

lint: $(STAMP) ## ruff and mypy
	$(BIN)/ruff check .
	@# mypy cannot follow the package-dir mapping: give it the installed layout as a link tree.
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)
	ln -s $(CURDIR)/gemma4_onnx/*.py $(TYPECHECK)/
	for p in exporter graphs quantize runtime mobile; do ln -s $(CURDIR)/$$p $(TYPECHECK)/$$p; done
	$(BIN)/mypy $(TYPECHECK)
	MYPYPATH=bench $(BIN)/mypy bench  # bench modules import each other by file name

demo: $(STAMP) ## tiny-e2b end to end: checkpoint → export → int4 → parity → tokens
	$(BIN)/python -m gemma4_onnx.demo build/demo

export: $(STAMP) ## export VARIANT or CHECKPOINT to OUT (default build/<variant>)
	@$(call STAGE,$(CLI) export $(SOURCE) $(OUT) --force $(EXPORT_RECIPE),export: $(OUT))

$(addprefix export-,$(VARIANTS)): export-%:
	$(MAKE) export VARIANT=$* OUT=build/$*

export-all: $(addprefix export-,$(VARIANTS)) ## export every variant

quantize: $(STAMP) ## quantize MODEL with RECIPE into QOUT
	@$(call STAGE,$(CLI) quantize $(MODEL) $(QOUT) --recipe $(RECIPE) --force,quantize: $(QOUT))

parity: $(STAMP) ## parity of MODEL against CHECKPOINT (writes REPORT/parity.json)
	@$(call STAGE,$(CLI) parity $(MODEL) --checkpoint $(or $(CHECKPOINT),build/checkpoints/$(VARIANT)) --out $(REPORT),parity: $(REPORT)/parity.json)

report: $(STAMP) ## float + every recipe side by side for tiny-e2b and the fixtures (build/reports/*/report.html)
	$(BIN)/python -m gemma4_onnx.report_run build/reports

mobile: $(STAMP) ## ORT-format mobile package of MODEL
	@$(call STAGE,$(CLI) mobile $(MODEL) build/$(VARIANT)-mobile,mobile: build/$(VARIANT)-mobile)

verify: $(STAMP) ## verify MODEL's files, checksums and graphs
	@$(call STAGE,$(CLI) verify $(MODEL),verify: $(MODEL) passed)

bench: $(STAMP) ## speed, memory and size side by side (bench/results.json)
	@if [ -f bench/run.py ]; then $(BIN)/python bench/run.py; else echo "bench: not built yet"; fi

clean: ## remove build outputs (keeps .venv)
	rm -rf build

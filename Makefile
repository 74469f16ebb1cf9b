# Each target creates .venv when it is absent and installs hwcompress into it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export XLA_FLAGS ?= --xla_cpu_multi_thread_eigen=true
export PYTHONHASHSEED := 0

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,postgres]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/hwcompress search --model lenet300 --dataset digits --profile mobile-cpu --study demo

test: $(STAMP)
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || bash .ci/chromium.sh
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist loadfile -m "not timing" tests
	$(BIN)/python -m pytest -q -m timing tests

bench: $(STAMP)
	$(BIN)/python -m bench.run_all

clean:
	rm -rf $(VENV) results/cache

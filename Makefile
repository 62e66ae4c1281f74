# The README's two commands: `make demo` and `make test`. Both build their own virtualenv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test install guest bench clean

$(STAMP): pyproject.toml setup.py hv/binding/build.py
	@command -v gcc >/dev/null || (apt-get update -qq && apt-get install -y -qq gcc make)
	@# the peer the tests and benchmarks compare against (boots the same built-in guest)
	@command -v qemu-system-x86_64 >/dev/null || (apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-system-x86)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	@touch $@

install: $(STAMP) guest

# the built-in guest's image (hv run's default guest); make decides whether it is stale
guest:
	$(MAKE) -s -C tools/guests

demo: install
	$(VENV)/bin/migrate demo

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) tools/bench/bench_hv.py

clean:
	rm -rf $(VENV) build *.egg-info hv/binding/_kvm*.so hv/binding/_kvm.c tools/guests/build

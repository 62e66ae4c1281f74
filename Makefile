# The README's two commands: `make demo` and `make test`. Both build their own virtualenv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test typecheck install guest bench clean host-tools

# Debian packages the build, the tests and the benchmarks need, by the command each provides:
# gcc builds the cffi binding and the built-in guest, QEMU is the peer the tests and benchmarks
# compare against (it boots the same guest), iasl (acpica-tools) checks our ACPI tables, and the
# migration data path is built against the system's zstd and xxhash (by header file); iperf3 is the
# loopback ceiling tools/bench/bench_throughput.py compares round 0 with.
HOST_TOOLS := gcc:gcc make:make qemu-system-x86_64:qemu-system-x86 iasl:acpica-tools \
              /usr/include/zstd.h:libzstd-dev /usr/include/xxhash.h:libxxhash-dev iperf3:iperf3

# checked on every run (cheap), so a checkout whose venv predates a new tool still gets it
host-tools:
	@missing=$$(for t in $(HOST_TOOLS); do [ -e $${t%%:*} ] || command -v $${t%%:*} >/dev/null || echo $${t#*:}; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(STAMP): pyproject.toml setup.py hv/binding/build.py hv/binding/uart.c hv/binding/vcpu_loop.c hv/binding/userfault.c hv/binding/write_protect.c \
          hv/binding/write_protect.h hv/binding/uart.h hv/binding/vcpu_loop.h hv/binding/userfault.h hv/binding/net.c hv/binding/net.h \
          migrate/datapath/_build.py migrate/datapath/pages.c migrate/datapath/pages.h | host-tools
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test,plot]'  # plot: the test of migrate plot runs, never skips
	@touch $@

install: host-tools $(STAMP) guest

# the built-in guest's image (hv run's default guest); make decides whether it is stale
guest:
	$(MAKE) -s -C tools/guests

demo: install
	$(VENV)/bin/migrate demo

# the type check first: its failure is mypy's own list of file:line errors, not a test's traceback
typecheck: install
	$(PY) -m mypy

test: install typecheck
	$(PY) -m pytest -q --durations=12

bench: install
	$(PY) tools/bench/bench_hv.py

clean:
	rm -rf $(VENV) build *.egg-info hv/binding/_kvm*.so hv/binding/_kvm.c migrate/datapath/_datapath*.so \
	  migrate/datapath/_datapath.c tools/guests/build

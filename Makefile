# The two set-up commands (README): `make demo` and `make test`. Both install what is missing first.
#   make demo      compile the demo models for the CPU, serve 2 core groups behind nginx, benchmark, stop
#   make test      the whole test suite, end-to-end, systemd and packaging tests included, and the unit tests
#                  again with every declared dependency at its floor (make mindeps, in .venv-min)
#   make packages  build dist/neuronserve_<ver>_<arch>.deb and dist/neuronserve-<ver>.<arch>.rpm
#   make image     the container image neuronserve:<ver> (CPU) from that .deb, for `neuronserve pod` (root, podman)
#   make bench     side-by-side performance run (in-process ceiling, neuronserve, baseline server; each route)
#   make docs      regenerate docs/neuronserve.1, neuronserve.toml.5, cli.md, configuration.md from the code

PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.neuronserve-installed
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages the tests drive for real: nginx in front, systemd-nspawn for the unit tests, rpm/lintian
# for the package checks, tmux for `top`'s screen, wrk for the baseline load, podman with runc for the container
# image, prometheus (with promtool) for the scrape config, rules and alerts, haproxy and iproute2 for the
# three-host fleet; nginx's njs module (no command: checked by its file) routes OpenAI requests by model.
DEB_TOOLS := nginx:nginx systemd-nspawn:systemd-container rpm:rpm rpmbuild:rpm lintian:lintian \
             tmux:tmux wrk:wrk systemd-analyze:systemd debootstrap:debootstrap rpmlint:rpmlint \
             podman:podman runc:runc prometheus:prometheus haproxy:haproxy ip:iproute2
PYTEST_ARGS ?=
# `make bench` compares the serving CPU per request with this commit's, side by side (bench/versus.py): the
# round's starting point
BENCH_BEFORE ?= 6870ceb
# `make mindeps`: a second venv with each dependency setup.cfg declares pinned at its floor (tests/min_deps.py)
MIN_VENV  := .venv-min
MIN_STAMP := $(MIN_VENV)/.neuronserve-installed
# test_grpc's comparison with tritonclient's and kserve's gRPC stubs: they need a newer grpcio and protobuf than
# the floors, so the min venv has neither
MIN_DESELECT := --deselect tests/unit/test_grpc.py::test_the_messages_are_the_clients_wire

.PHONY: demo test unit mindeps packages image bench docs sysdeps clean
.DEFAULT_GOAL := help

help:
	@sed -n '1,9p' Makefile | sed 's/^# \{0,1\}//'

sysdeps:
	@missing=""; for pair in $(DEB_TOOLS); do cmd=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$cmd >/dev/null 2>&1 || [ -x /usr/sbin/$$cmd ] || missing="$$missing $$pkg"; done; \
	[ -e /usr/lib/nginx/modules/ngx_http_js_module.so ] || missing="$$missing libnginx-mod-http-js"; \
	if [ -n "$$missing" ]; then echo "installing Debian packages:$$missing"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing \
	  || { $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive \
	       apt-get install -y -q --no-install-recommends $$missing; }; fi

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU build lies on disk; asking for plain `torch` would fetch a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(STAMP)

demo: sysdeps $(STAMP)
	$(BIN)/python -m dev.demo

test: sysdeps $(STAMP) mindeps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

unit: $(STAMP)
	$(BIN)/python -m pytest -m 'not e2e and not systemd and not packaging' $(PYTEST_ARGS)

# made anew whenever the floors change, so nothing newer lingers from an earlier set
$(MIN_STAMP): setup.cfg pyproject.toml tests/min_deps.py
	rm -rf $(MIN_VENV)
	$(PYTHON) -m venv $(MIN_VENV)
	$(PYTHON) tests/min_deps.py > $(MIN_VENV)/requirements.txt
	# torch==2.13.0 as in $(STAMP): the CPU build on disk
	$(MIN_VENV)/bin/pip install -q torch==2.13.0 -r $(MIN_VENV)/requirements.txt
	$(MIN_VENV)/bin/pip install -q --no-deps -e .
	touch $@

mindeps: $(MIN_STAMP)
	$(MIN_VENV)/bin/python -m pytest tests/unit -q -p no:cacheprovider $(MIN_DESELECT)

packages: sysdeps $(STAMP)
	$(BIN)/python packaging/build.py dist

# debootstrap's root and the ML environment are cached under build/image; tests/packaging/test_image.py runs it
image: packages
	$(BIN)/python packaging/image.py

bench: sysdeps $(STAMP)
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m bench
	$(BIN)/python -m bench.routes
	$(BIN)/python -m bench.versus $(BENCH_BEFORE)
	$(BIN)/python -m bench.memory $(BENCH_BEFORE)
	$(BIN)/python -m bench.load_shapes

# generated from neuronserve/cli.py and config.py, and committed: tests/unit/test_docs.py fails until they match
docs: $(STAMP)
	$(BIN)/python -m dev.manpage docs

clean:
	rm -rf build dist demo-run bench-results *.egg-info
	git worktree prune

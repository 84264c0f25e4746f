# Every target sets itself up: a fresh clone needs only python3 (>= 3.11) and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTO := protos/aggregator/v1/aggregator.proto

# apt waits up to 5 minutes for a lock another process holds (unattended upgrades) instead of failing.
.PHONY: screenshots install demo test lint proto proto-check proto-release bench clean redis chromium \
	image image-smoke image-tools soak

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: install
	$(BIN)/aggregator demo

lint: install
	$(BIN)/ruff check aggregator tests examples
	$(BIN)/ruff format --check aggregator tests examples
	$(BIN)/mypy
	$(BIN)/mypy examples
	$(BIN)/ruff check deploy/image
	$(BIN)/mypy --strict deploy/image
	$(BIN)/lint-imports

# The cache tests run a real redis-server; install it from Debian's packages if missing.
redis:
	@command -v redis-server >/dev/null || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get -o DPkg::Lock::Timeout=300 install -y -q redis-server >/dev/null 2>&1 || \
		{ $$SUDO apt-get -o DPkg::Lock::Timeout=300 update -q >/dev/null && $$SUDO apt-get -o DPkg::Lock::Timeout=300 install -y -q redis-server >/dev/null; }; }

# The admin page's browser tests drive Debian's chromium (through playwright); install it if
# missing. They skip, saying so, without it.
chromium:
	@command -v chromium >/dev/null || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get -o DPkg::Lock::Timeout=300 install -y -q chromium >/dev/null 2>&1 || \
		{ $$SUDO apt-get -o DPkg::Lock::Timeout=300 update -q >/dev/null && $$SUDO apt-get -o DPkg::Lock::Timeout=300 install -y -q chromium >/dev/null; }; } || true

# buf (npm @bufbuild/buf, a static binary) for the interop tests; they skip, saying so, without it.
BUF := $(VENV)/node/node_modules/.bin/buf
$(BUF): $(STAMP)
	-command -v npm >/dev/null && npm install --silent --prefix $(VENV)/node @bufbuild/buf >/dev/null

# The contract: buf lint (rules and deliberate departures in protos/buf.yaml) and buf breaking
# against the image of the released contract, so an accidental incompatible change fails.
RELEASED := protos/aggregator.v1.json
proto-check: $(BUF)
	@test -x $(BUF) || { echo "proto-check: buf is missing (npm install --prefix $(VENV)/node @bufbuild/buf)"; exit 1; }
	$(BUF) lint protos
	$(BUF) breaking protos --against $(RELEASED)

# Only when a break is meant (a new major version) or an addition is released: rewrites the image.
proto-release: $(BUF)
	$(BUF) build protos --exclude-source-info -o $(RELEASED)

test: lint proto-check redis chromium $(BUF)
	$(BIN)/pytest

# The admin page's screenshots in docs/, made by the browser tests (make test writes them to a
# temporary directory).
screenshots: install chromium
	SCREENSHOTS=$(CURDIR)/docs $(BIN)/pytest -q tests/e2e/test_admin_browser.py

proto: install
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=generated \
		--grpc_python_out=generated --pyi_out=generated $(PROTO)
	touch generated/aggregator/v1/__init__.py

# The container image (docs/operations.md, "Image"): podman (docker where podman is absent),
# with only the flags this host needs; a base made from Debian's packages (mmdebstrap) when
# no registry can be reached. COLD=1 remakes the base and uses no layer cache.
IMAGE ?= localhost/aggregator:0.1.0
IMAGE_FLAGS = --tag $(IMAGE) $(if $(COLD),--cold)
image: image-tools
	$(PYTHON) deploy/image/build.py $(IMAGE_FLAGS)

# Builds the image, runs it on a free loopback port and checks health, one aggregate, /metrics
# and a drained stop. Not part of `make test`.
image-smoke: image-tools install
	$(BIN)/python deploy/image/smoke.py $(IMAGE_FLAGS)

# podman and runc when there is neither podman nor a docker engine, and mmdebstrap (needed only
# when no base image can be pulled, so its install may fail), from Debian's packages; waits for
# an apt lock another process holds.
APT_GET = $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get -o DPkg::Lock::Timeout=300 -q
APT_INSTALL = { $(APT_GET) install -y $(1) >/dev/null 2>&1 || \
	{ $(APT_GET) update >/dev/null && $(APT_GET) install -y $(1) >/dev/null; }; }
image-tools:
	@{ command -v podman || docker info; } >/dev/null 2>&1 || $(call APT_INSTALL,podman runc)
	@command -v mmdebstrap >/dev/null || $(call APT_INSTALL,mmdebstrap) || \
		echo "image-tools: no mmdebstrap (needed only when no base image can be pulled)"

# The chaos soak (docs/operations.md, "Chaos soak"): SOAK_SECONDS of 5-target aggregates at
# c32 on uvloop while a REST upstream is killed and restarted and a gRPC upstream stopped and
# continued, then SIGTERM under load. Prints the report; fails when a promise did not hold.
# A 30 s version of it runs in `make test` (tests/e2e/test_soak.py).
SOAK_SECONDS ?= 120
soak: install
	$(BIN)/python -m bench.soak --seconds $(SOAK_SECONDS)

# The harness (bench-results.json), then the CPU budget of one aggregate part by part, merged
# into the same file (docs/performance.md, "CPU budget"), then the admin page's cost.
bench: install
	$(BIN)/python -m bench
	$(BIN)/python -m bench.budget --output bench-results.json
	$(BIN)/python -m bench.admin

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

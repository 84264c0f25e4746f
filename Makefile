# Every target sets itself up: a fresh clone needs only python3 (>= 3.11) and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTO := protos/aggregator/v1/aggregator.proto

.PHONY: install demo test lint proto proto-check proto-release bench clean redis chromium

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
	$(BIN)/lint-imports

# The cache tests run a real redis-server; install it from Debian's packages if missing.
redis:
	@command -v redis-server >/dev/null || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get install -y -q redis-server >/dev/null 2>&1 || \
		{ $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q redis-server >/dev/null; }; }

# The admin page's browser tests drive Debian's chromium (through playwright); install it if
# missing. They skip, saying so, without it.
chromium:
	@command -v chromium >/dev/null || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get install -y -q chromium >/dev/null 2>&1 || \
		{ $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q chromium >/dev/null; }; } || true

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

proto: install
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=generated \
		--grpc_python_out=generated --pyi_out=generated $(PROTO)
	touch generated/aggregator/v1/__init__.py

bench: install
	$(BIN)/python -m bench
	$(BIN)/python -m bench.admin

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

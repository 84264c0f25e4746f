# syntax=docker/dockerfile:1
#
# The aggregator as a container image. `make image` builds it (podman, or docker where podman is
# absent) and works out the flags a host needs; by hand on an ordinary docker or podman host:
#
#   docker build -t aggregator:0.1.0 .
#   docker run --rm -p 50051:50051 -p 9464:9464 \
#     -v "$PWD/my-config.yaml:/etc/aggregator/config.yaml:ro" aggregator:0.1.0
#
# Two stages: `build` installs the checkout and its dependencies into a virtualenv; `runtime` is
# the Python base with that virtualenv and nothing else (no compiler, no pip, no source tree),
# running as an unprivileged user. Both bases are build arguments, so a machine that reaches no
# registry can build from an image made of Debian's packages (docs/operations.md, "Image").
# Any base with python3 >= 3.11 at the same path in both stages works; the build stage also
# needs its venv module (Debian: python3-venv).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG RUNTIME_IMAGE=${PYTHON_IMAGE}

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# The dependencies first, in their own layer: it is rebuilt only when pyproject.toml changes,
# so a change to the code re-runs no download. setuptools is the build backend (pyproject.toml's
# build-system), installed here so the project's own install below needs no network.
COPY pyproject.toml ./
RUN python3 -m venv /opt/aggregator \
    && python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && /opt/aggregator/bin/pip install --quiet -r /tmp/requirements.txt "setuptools>=69"
# aggregator/v1 is a symlink to ../generated/aggregator/v1: both trees are copied so it resolves,
# and setuptools writes the files it points at into the package (real files, not a link).
COPY README.md ./
COPY generated/ generated/
COPY aggregator/ aggregator/
# Then the virtualenv loses its installers: the runtime stage copies it as it is.
RUN /opt/aggregator/bin/pip install --quiet --no-deps --no-build-isolation . \
    && /opt/aggregator/bin/pip uninstall --quiet --yes setuptools pip \
    && /opt/aggregator/bin/python -c "import aggregator.v1.aggregator_pb2_grpc" \
    && /opt/aggregator/bin/aggregator --help > /dev/null

FROM ${RUNTIME_IMAGE} AS runtime
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="aggregator" \
      org.opencontainers.image.description="gRPC aggregation service: fans a batch of REST and gRPC calls out at once and streams each result back as it completes" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# The base may carry an installer (python:*-slim has pip in site-packages and ensurepip's
# wheels, Debian's python3-venv brings pip's wheel): remove whichever is there, then check that
# no pip is left, nor a way to get one (a new venv would bootstrap it), nor a compiler. A fixed numeric uid/gid (the Helm chart's runAsUser), so
# runAsNonRoot can check it.
RUN if python3 -m pip --version > /dev/null 2>&1; then \
        python3 -m pip uninstall --quiet --yes pip setuptools wheel; \
    fi \
    && rm -rf /usr/share/python-wheels \
       "$(python3 -c 'import ensurepip, os; print(os.path.dirname(ensurepip.__file__))')/_bundled" \
    && ! python3 -m pip --version > /dev/null 2>&1 \
    && ! python3 -m venv /tmp/venv-with-pip > /dev/null 2>&1 \
    && rm -rf /tmp/venv-with-pip \
    && ! { command -v cc || command -v gcc || command -v clang; } > /dev/null \
    && groupadd --system --gid 10001 aggregator \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin aggregator
# The same path as in the build stage: a virtualenv's scripts name their interpreter by path.
COPY --from=build /opt/aggregator /opt/aggregator
# A config that starts (no upstreams): mount yours over it, or point AGGREGATOR_CONFIG elsewhere.
COPY deploy/docker/config.yaml /etc/aggregator/config.yaml
ENV PATH=/opt/aggregator/bin:/usr/local/bin:/usr/bin:/bin \
    AGGREGATOR_CONFIG=/etc/aggregator/config.yaml \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
# The root filesystem may be read-only (the chart's is): /tmp is the only place written, and
# the chart mounts an emptyDir there (podman's `--read-only` mounts a tmpfs there by itself,
# docker's needs `--tmpfs /tmp`).
WORKDIR /tmp
# 50051: gRPC (server.address): Aggregate, Collect, health, reflection; TLS when server.tls is set.
# 9464:  Prometheus /metrics over HTTP (server.metrics_address).
# 50052: plaintext grpc.health.v1 only (server.health_address, off unless set): for Kubernetes
#        gRPC probes when the main port speaks TLS.
EXPOSE 50051 9464 50052
# `aggregator serve` reads $AGGREGATOR_CONFIG; it handles SIGTERM itself (NOT_SERVING, drain
# within server.shutdown_grace, exit 0), so it runs as PID 1 without an init. Other commands:
# `docker run IMAGE check-config /etc/aggregator/config.yaml`, `docker run IMAGE call ...`.
ENTRYPOINT ["aggregator"]
CMD ["serve"]

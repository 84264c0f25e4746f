# syntax=docker/dockerfile:1
#
# The aggregator as a container image: `docker build -t aggregator:0.1.0 .`
#
#   docker run --rm -p 50051:50051 -p 9464:9464 \
#     -v "$PWD/my-config.yaml:/etc/aggregator/config.yaml:ro" aggregator:0.1.0
#
# Two stages: `build` turns the checkout into a wheel and installs it with its dependencies
# into a virtualenv; `runtime` is a slim Python with that virtualenv and nothing else (no
# compiler, no pip, no source tree), running as an unprivileged user.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# aggregator/v1 is a symlink to ../generated/aggregator/v1: both trees are copied so it resolves,
# and setuptools writes the files it points at into the wheel (real files, not a link).
COPY pyproject.toml README.md ./
COPY generated/ generated/
COPY aggregator/ aggregator/
RUN python -m pip wheel --no-deps --wheel-dir /dist . \
    && python -m venv /opt/aggregator \
    && /opt/aggregator/bin/pip install /dist/aggregator-*.whl \
    && /opt/aggregator/bin/pip uninstall --yes pip \
    && /opt/aggregator/bin/python -c "import aggregator.v1.aggregator_pb2_grpc" \
    && /opt/aggregator/bin/aggregator --help > /dev/null

FROM ${PYTHON_IMAGE} AS runtime
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="aggregator" \
      org.opencontainers.image.description="gRPC aggregation service: fans a batch of REST and gRPC calls out at once and streams each result back as it completes" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed numeric uid/gid (the Helm chart's runAsUser), so runAsNonRoot can check it.
RUN groupadd --system --gid 10001 aggregator \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin aggregator
# The same path as in the build stage: a virtualenv's scripts name their interpreter by path.
COPY --from=build /opt/aggregator /opt/aggregator
# A config that starts (no upstreams): mount yours over it, or point AGGREGATOR_CONFIG elsewhere.
COPY deploy/docker/config.yaml /etc/aggregator/config.yaml
ENV PATH=/opt/aggregator/bin:$PATH \
    AGGREGATOR_CONFIG=/etc/aggregator/config.yaml \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
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

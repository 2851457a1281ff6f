# syntax=docker/dockerfile:1.7
#
# imfast: one image for every role.
#   docker build -t imfast:0.1.0 .
#   docker run --rm -p 8080:8080 imfast:0.1.0              # embedded: imfast serve
#   Kubernetes runs it with args gateway | service | offline-worker (deploy/k8s).
#
# Stage 1 compiles the Cython core into a wheel and collects wheels of every
# dependency; stage 2 installs those wheels and carries no compiler.
# Health checks are Kubernetes probes (/health, /health/live): no HEALTHCHECK.

FROM python:3.11-slim-bookworm AS builder

# gcc and the libc headers build the Cython extension (and any dependency that
# has no binary wheel for the target platform). Debian's point releases carry
# security fixes, so the packages follow bookworm rather than a pinned version.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src
COPY . .

# Backend extras the cluster roles need (Redis, Kafka, etcd, MySQL); the
# embedded mode needs none of them.
ARG IMFAST_EXTRAS=redis,kafka,etcd,mysql

# 1. The project's wheel, built from pyproject.toml; this compiles the Cython
#    core. A pure-Python wheel (*-none-any) means the extension did not build:
#    fail rather than ship the slow fallback.
# 2. Wheels of all dependencies, extras included, next to it.
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && set -- /wheels/imfast-*.whl \
 && case "$1" in *-none-any.whl) echo "imfast wheel has no compiled extension: $1" >&2; exit 1;; esac \
 && pip wheel --wheel-dir /wheels "$1[${IMFAST_EXTRAS}]"


FROM python:3.11-slim-bookworm AS runtime

LABEL org.opencontainers.image.title="imfast" \
      org.opencontainers.image.description="Instant-messaging WebSocket gateway (uvloop + picows + Cython)"

# Tools the runbooks run inside the pods with `kubectl exec`:
#   curl (curl localhost:8080/health, /stats), nc (netcat-openbsd: nc -zv HOST PORT),
#   redis-cli (redis-tools), mysql (mariadb-client-core), nslookup
#   (bind9-dnsutils), jq. Unpinned for the same reason as above.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      bind9-dnsutils \
      ca-certificates \
      curl \
      jq \
      mariadb-client-core \
      netcat-openbsd \
      redis-tools \
 && rm -rf /var/lib/apt/lists/*

# Fixed ids: the Kubernetes manifests set runAsUser/runAsGroup 10001.
RUN groupadd --system --gid 10001 imfast \
 && useradd --system --uid 10001 --gid imfast --home-dir /var/lib/imfast \
      --create-home --shell /usr/sbin/nologin imfast

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# Install from the builder's wheels only (no index): the image gets exactly
# what was built. The bind mount keeps the wheels out of the image layers.
# `imfast --help` proves the entry point imports.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels /wheels/*.whl \
 && imfast --help > /dev/null

# Working directory for the embedded mode's local files; writable by imfast.
WORKDIR /var/lib/imfast
USER 10001:10001

# 8080 HTTP (/ws, /health, /health/live, /stats, /metrics), 9093 gateway push,
# 9094 im-service.
EXPOSE 8080 9093 9094

# Exec form: imfast is PID 1 and receives SIGTERM itself, which starts the
# drain (and it must reap its own worker processes when GATEWAY_WORKERS > 1).
ENTRYPOINT ["imfast"]
CMD ["serve"]

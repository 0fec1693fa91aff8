# The sidecar image: `docker build -t sidecar:0.1.0 .` from the repository root.
#
# Two stages on the same base (so the virtualenv's interpreter path stays valid when copied):
# `build` turns the project and its dependencies (uvloop included) into wheels and installs them
# into /opt/venv; the final stage gets only that venv and the default config: no compiler, no
# source tree, no wheel or pip cache. Every dependency ships manylinux wheels for CPython 3.11, so
# no compiler is needed in either stage. Pin the base by digest (`python:3.11-slim-trixie@sha256:...`)
# in a release pipeline for byte-for-byte rebuilds.

FROM python:3.11-slim-trixie AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# Only what the wheel is built from (.dockerignore keeps the rest of the repository out).
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar

# Wheels for the project and every dependency, then an offline install from exactly those wheels:
# --no-index keeps an unrelated "sidecar" on PyPI from ever being picked. The venv has no pip of
# its own; the base image's pip installs into it (--python). Bytecode is compiled at install time,
# so the read-only root filesystem the container runs with never needs to be written.
RUN python -m pip wheel --wheel-dir /wheels '.[uvloop]' \
    && python -m venv --without-pip /opt/venv \
    && python -m pip --python /opt/venv/bin/python install --no-index --find-links /wheels 'sidecar[uvloop]' \
    && /opt/venv/bin/sidecar --version


FROM python:3.11-slim-trixie

LABEL org.opencontainers.image.title="sidecar" \
      org.opencontainers.image.description="A resilience proxy that runs next to every service: timeouts, retries, circuit breakers, metrics." \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed, unprivileged UID/GID, so Kubernetes can check runAsNonRoot / runAsUser: 10001.
RUN groupadd --system --gid 10001 sidecar \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin sidecar

COPY --from=build /opt/venv /opt/venv
# The default config (deploy/sidecar.yaml). Kubernetes and compose mount their own over it.
COPY deploy/sidecar.yaml /etc/sidecar/sidecar.yaml

# glibc's malloc, set for a proxy. asyncio reads sockets into 256 KiB buffers, above glibc's
# adaptive mmap threshold, and freed buffers trimmed the heap: under load with 64 KiB responses
# the sidecar kept faulting in fresh pages (3 to 10 page faults per response, up to 40% more CPU
# per request, see README "Performance"). Blocks under 1 MiB now come from the heap, and up to
# 4 MiB of free heap is kept rather than handed back. Idle memory is unchanged. bench/ runs the
# Python proxies with this same value, read from here.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1048576:glibc.malloc.trim_threshold=4194304

# Durable delivery keeps its queue (an SQLite file) here, owned by the image's user: mount a
# volume over it (docs/delivery.md says what each kind of volume keeps). SIDECAR_STATE_DIR is
# what `sidecar run` reads when --state-dir is not given.
RUN install -d -o 10001 -g 10001 -m 0750 /var/lib/sidecar
ENV SIDECAR_STATE_DIR=/var/lib/sidecar

USER 10001:10001

# 15001: the shared traffic listener (`listen`): the app calls http://127.0.0.1:15001/<route>/...
# 15002: a route's dedicated traffic listener (`routes[].listen`; `inventory` in the default config)
# 9901:  the admin API (`admin.listen`): keep it on 127.0.0.1, never publish it
# 9902:  health and metrics only (`metrics.listen`: /metrics, /healthz, /readyz) for probes and Prometheus
EXPOSE 15001 15002 9901 9902

# Docker's own health check (Kubernetes ignores it and uses the pod's probes). The image has no
# curl: Python asks the admin listener of the default config (admin.listen 127.0.0.1:9901).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9901/healthz', timeout=2)"]

# Add `--loop uvloop` to the command to run on uvloop (installed in this image).
ENTRYPOINT ["sidecar"]
CMD ["run", "--config", "/etc/sidecar/sidecar.yaml"]

# pullgate: verifying pull-through OCI registry mirror (one per node, as a DaemonSet).
#
# Dependencies are installed only from deploy/requirements-image.txt, pinned with
# hashes (regenerate with deploy/lock-image.sh). Build from the repository root:
#   docker build -t pullgate:0.1.0 .

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/pullgate
COPY deploy/requirements-image.txt ./
RUN /opt/pullgate/bin/pip install --require-hashes --no-deps -r requirements-image.txt
COPY pyproject.toml README.md ./
COPY proxy ./proxy
# Every dependency is already in the venv: pullgate itself, built with the pinned setuptools.
RUN /opt/pullgate/bin/pip install --no-deps --no-build-isolation --no-index . \
 && /opt/pullgate/bin/pip check

FROM python:3.11-slim-bookworm
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="pullgate" \
      org.opencontainers.image.description="Node-level verifying pull-through OCI registry mirror for Kubernetes" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/example/pullgate" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim-bookworm"
# uid/gid 10001: an unprivileged user no node account is likely to share. The serving
# container runs as it: the DaemonSet gives it the cache hostPath first (init container
# `cache-owner`, root with CAP_CHOWN), and everything else it writes is an emptyDir.
# Root is needed only by the init container `install-hosts`, which writes the node's
# root-owned /etc/containerd/certs.d, and by the CRI image service (a node service, not
# this DaemonSet: deploy/README.md), which connects to containerd's root-only socket.
RUN groupadd --system --gid 10001 pullgate \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin pullgate \
 && mkdir -p /etc/pullgate /var/lib/pullgate/cache /run/pullgate \
 && chown 10001:10001 /var/lib/pullgate/cache /run/pullgate
COPY --from=build /opt/pullgate /opt/pullgate
ENV PATH=/opt/pullgate/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
EXPOSE 5050 5051
ENTRYPOINT ["pullgate"]
CMD ["serve", "--config", "/etc/pullgate/config.yaml"]

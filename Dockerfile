# pullgate: verifying pull-through OCI registry mirror (one per node, as a DaemonSet).
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim-bookworm
COPY --from=build /install /usr/local
# Runs as root only because the cache is a hostPath and hosts.toml lives in the node's
# /etc/containerd; the DaemonSet drops every capability it does not need.
ENV PYTHONUNBUFFERED=1
EXPOSE 5050 5051
ENTRYPOINT ["pullgate"]
CMD ["serve", "--config", "/etc/pullgate/config.yaml"]

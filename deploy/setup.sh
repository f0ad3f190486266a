#!/usr/bin/env bash
# Install everything pullgate's demo, tests and benchmarks need on a fresh Debian
# machine, as root: Debian packages (real peers) and a virtualenv in .venv.
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(docker-registry containerd skopeo nginx-light ca-certificates git prometheus)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
# kubectl renders deploy/daemonset (its embedded kustomize); Debian's kubernetes-client
# unless the machine already has a kubectl.
if ! command -v kubectl >/dev/null 2>&1; then
  missing+=(kubernetes-client)
fi
if ! command -v python3 >/dev/null 2>&1; then
  missing+=(python3 python3-venv python3-pip)
elif ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
  missing+=(python3-venv)
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
stamp=.venv/.pullgate-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing Python packages into .venv"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  touch "$stamp"
fi
echo "setup: ready ($(.venv/bin/python --version), $(containerd --version | awk '{print $3}'), docker-registry $(docker-registry --version 2>/dev/null | awk '{print $3}'))"

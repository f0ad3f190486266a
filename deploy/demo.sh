#!/usr/bin/env bash
# The demo: installs what it needs, then pulls signed and unsigned content through
# pullgate with a real registry and a real containerd. Run as root on Debian.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
exec .venv/bin/python deploy/demo.py "$@"

#!/usr/bin/env bash
# Install everything (idempotent), then run the demo: real traffic between
# network namespaces, metered by the standalone agent and exported as IPFIX
# to kipfix's built-in collector, which prints the flows it received.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python scripts/demo.py "$@"

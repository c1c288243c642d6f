#!/usr/bin/env bash
# Install everything the tests need (idempotent), then run the whole suite.
# Usage: scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test
status=0
.venv/bin/pytest "$@" tests || status=$?
# pytest exits 5 when it collected nothing: that is a failure here, not a pass.
exit "$status"

#!/usr/bin/env bash
# Runs fleetgate on its embedded demo fleet, set-up included: ./scripts/demo.sh [demo args]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/fleetgate demo "$@"

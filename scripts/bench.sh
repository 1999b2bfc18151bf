#!/usr/bin/env bash
# The relay benchmark, set-up included: ./scripts/bench.sh [bench/relay.py args]
# Default: 1 GiB scp up and down via relay, jump and direct, 3 rounds, written to docs/benchmarks.md.
# Quick run while developing: ./scripts/bench.sh --size 64MiB --repeat 1 --no-docs
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export FLEETGATE_BENCH_COMMAND="./scripts/bench.sh${*:+ $*}"
exec .venv/bin/python bench/relay.py "$@"

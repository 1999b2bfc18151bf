#!/usr/bin/env bash
# The benchmarks, set-up included.
#   ./scripts/bench.sh [bench/relay.py args]   the relay benchmark: 1 GiB scp up and down via
#                                              direct, relay, jump and an OpenSSH bastion, 3 rounds,
#                                              written to docs/benchmarks.md
#   ./scripts/bench.sh --all [--quick]         every benchmark under bench/, in sequence (bench/all.py)
# Quick run while developing: ./scripts/bench.sh --size 64MiB --repeat 1 --no-docs
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export FLEETGATE_BENCH_COMMAND="./scripts/bench.sh${*:+ $*}"
if [[ "${1:-}" == "--all" ]]; then
    shift
    exec .venv/bin/python bench/all.py "$@"
fi
exec .venv/bin/python bench/relay.py "$@"

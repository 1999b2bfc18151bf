#!/usr/bin/env bash
# Refreshes requirements.lock (and requirements-runtime.lock, its runtime part, for the
# container image) on purpose: every runtime, test and build dependency of
# pyproject.toml resolved to today's newest allowed versions, with hashes, for Linux x86_64
# and Python 3.11 (Debian 12's). Then rebuilds .venv from the new lock and runs the fast
# tier, so an upgrade is one reviewed diff of requirements.lock plus a green fast tier:
#   ./scripts/lock.sh                 refresh and test
#   ./scripts/lock.sh --check         only say whether pyproject.toml and the lock agree
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--check" ]]; then
    exec python3 scripts/lockcheck.py
fi
./scripts/setup.sh    # a venv with the locked uv in it
.venv/bin/uv pip compile pyproject.toml --quiet --native-tls --extra test --extra dev --generate-hashes \
    --python-version 3.11 --python-platform x86_64-manylinux_2_36 \
    --index-url https://pypi.org/simple --upgrade \
    --custom-compile-command ./scripts/lock.sh -o requirements.lock
# The image's lock: the runtime dependencies alone, at the versions of the full lock.
.venv/bin/uv pip compile pyproject.toml --quiet --native-tls --generate-hashes \
    --python-version 3.11 --python-platform x86_64-manylinux_2_36 \
    --index-url https://pypi.org/simple -c requirements.lock \
    --custom-compile-command ./scripts/lock.sh -o requirements-runtime.lock
git --no-pager diff --stat -- requirements.lock requirements-runtime.lock || true
./scripts/setup.sh    # the lock changed: .venv is rebuilt from it
exec .venv/bin/python -m pytest -m "not e2e" -q

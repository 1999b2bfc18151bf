#!/bin/sh
# Runs inside `docker build` (see the Dockerfile): installs fleetgate into the virtualenv
# /opt/fleetgate (made without pip) exactly as locked, on any Debian 12 base with python3
# and python3-venv (the official python image or a plain debootstrap root alike).
#   image-install.sh deps   the runtime dependencies: /src/requirements-runtime.lock, hash-checked
#   image-install.sh app    fleetgate itself, from /src (pyproject.toml, fleetgate/), --no-deps
# The tools that install (pip, setuptools, wheel) come hash-checked from /src/requirements.lock
# into a throw-away venv, so the base's own pip (whatever version) never installs anything.
set -eu
# The build's secret pip-ca, if given: the CA bundle of a TLS-intercepting proxy (not kept in the image).
if [ -s /run/secrets/pip-ca ]; then
  export PIP_CERT=/run/secrets/pip-ca
fi
tools=/tmp/build-venv
python3 -m venv "$tools"
awk '/^[A-Za-z0-9]/{keep = ($1 ~ /^(pip|setuptools|wheel)==/)} keep' /src/requirements.lock > /tmp/build.lock
pip="$tools/bin/python -m pip"
$pip install -q --no-deps --require-hashes -r /tmp/build.lock
case "$1" in
  deps)
    python3 -m venv --without-pip /opt/fleetgate
    $pip --python /opt/fleetgate/bin/python install -q --no-deps --require-hashes \
      -r /src/requirements-runtime.lock
    ;;
  app)
    $pip wheel -q --no-deps --no-build-isolation --no-index --wheel-dir /tmp/dist /src
    $pip --python /opt/fleetgate/bin/python install -q --no-deps --no-index /tmp/dist/fleetgate-*.whl
    rm -rf /tmp/dist
    ;;
  *) echo "usage: image-install.sh deps|app" >&2; exit 2 ;;
esac
rm -rf "$tools" /tmp/build.lock

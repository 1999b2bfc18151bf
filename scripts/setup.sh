#!/usr/bin/env bash
# Installs everything fleetgate and its tests need on a fresh Debian 12 machine, and nothing
# else: the Debian packages below with apt-get, and a virtualenv in .venv holding exactly
# requirements.lock (hash-checked, no resolver, no build tool fetched from outside the lock)
# plus fleetgate itself, editable. Safe to run again: it skips what is there, and rebuilds
# .venv from scratch whenever the lock changed, so .venv never keeps a version the lock
# dropped. Upgrading dependencies is ./scripts/lock.sh, a deliberate step.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(python3 python3-venv openssh-server openssh-client rsync tmux procps
  prometheus prometheus-alertmanager qemu-system-x86 linux-image-amd64 busybox-static
  dropbear-bin openssh-sftp-server cpio kmod xz-utils zstd curl git libvirt-daemon
  libvirt-daemon-driver-qemu libvirt-clients libvirt-dev pkg-config gcc python3-dev socat
  etcd-server etcd-client iproute2 util-linux mount passwd
  podman buildah runc debootstrap uidmap slirp4netns fuse-overlayfs putty-tools)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "setup: installing Debian packages: ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY="${PYTHON:-python3}"
# A lock that no longer matches pyproject.toml is refused before anything is installed.
"$PY" scripts/lockcheck.py

stamp=.venv/.fleetgate-lock
want="$(sha256sum requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x .venv/bin/python ]; then
  exit 0
fi
echo "setup: building .venv from requirements.lock" >&2
rm -rf .venv
"$PY" -m venv .venv
# No pip configuration of this machine's (extra indexes, constraints) takes part: the lock's
# hashes decide what is installed, and PyPI is the only index.
export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
unset PIP_FIND_LINKS PIP_EXTRA_INDEX_URL PIP_INDEX_URL PIP_CONSTRAINT PIP_REQUIRE_VIRTUALENV
# The system's CA bundle (Debian's, plus whatever the site added: an intercepting proxy's CA)
# rather than pip's own copy, unless one was given.
if [ -z "${PIP_CERT:-}" ] && [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  export PIP_CERT=/etc/ssl/certs/ca-certificates.crt
fi
pipi() { .venv/bin/python -m pip install -q --no-deps --require-hashes --index-url https://pypi.org/simple "$@"; }
# First pip, setuptools and wheel from the lock: they build what has no wheel
# (libvirt-python, fleetgate itself) without fetching an unlocked build backend.
boot=$(mktemp)
trap 'rm -f "$boot"' EXIT
awk '/^[A-Za-z0-9]/{keep = ($1 ~ /^(pip|setuptools|wheel)==/)} keep' requirements.lock > "$boot"
pipi -r "$boot"
pipi --no-build-isolation -r requirements.lock
.venv/bin/python -m pip install -q --no-deps --no-build-isolation --no-index -e .
echo "$want" > "$stamp"

#!/usr/bin/env bash
# Does the README hold on a fresh machine? Runs the README's test command in a clean
# Debian 12 root and prints pytest's summary:
#   ./scripts/fresh-check.sh                  the whole suite
#   ./scripts/fresh-check.sh -m "not e2e"     the fast tier (any pytest arguments pass through)
#   FRESH_KEEP=1 ./scripts/fresh-check.sh ... keep the root afterwards (its path is printed)
# What it does: a debootstrap root (minbase, cached by scripts/debian-root.sh, from this
# machine's Debian mirror), a `git clone` of this checkout's HEAD in /root/fleetgate (commit it
# first: uncommitted changes are not part of the check), then `./scripts/test.sh ARGS` run
# there as root in a chroot inside its own mount and pid namespaces (unshare), with /proc,
# /sys, /dev and resolv.conf, and a clean environment. The debootstrap cache
# (/var/cache/fleetgate-test) is shared with the root, so the image test inside reuses it. setup.sh installs every Debian and
# Python package itself, as on a new machine. Packages' daemons are not started while they
# are installed (policy-rc.d, as in any container build): the tests start what they need, on
# loopback. The network is the host's (apt's mirror and PyPI); where the host trusts an extra
# CA for them (PIP_CERT / SSL_CERT_FILE, e.g. a TLS-intercepting proxy), that bundle is passed
# in too. Needs root. Exit status: pytest's.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
if [ "$(id -u)" -ne 0 ]; then
  echo "fresh-check: needs root (debootstrap, chroot, mount namespaces)" >&2
  exit 2
fi
for tool in unshare chroot git mount tar; do
  command -v "$tool" >/dev/null || { echo "fresh-check: $tool is missing" >&2; exit 2; }
done
head="$(git rev-parse HEAD)"
if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
  echo "fresh-check: note: uncommitted changes are not checked (the clone is of HEAD $head)" >&2
fi

tarball="$(./scripts/debian-root.sh)"
cache="$(dirname "$tarball")"   # shared with the root: the image test's base is built once
work="$(mktemp -d /var/tmp/fleetgate-fresh.XXXXXX)"
root="$work/root"
cleanup() {
  # The mounts live in the namespace that ran the tests and ended with it; never delete
  # through a mount that is somehow still there.
  if findmnt -rn -o TARGET | grep -q "^$work/"; then
    echo "fresh-check: mounts remain under $work; not deleting it" >&2
  elif [ -n "${FRESH_KEEP:-}" ]; then
    echo "fresh-check: root kept in $root" >&2
  else
    rm -rf --one-file-system "$work"
  fi
}
trap cleanup EXIT
mkdir "$root"
tar --numeric-owner --xattrs -xpf "$tarball" -C "$root"
git clone -q --no-hardlinks "$repo" "$root/root/fleetgate"
git -C "$root/root/fleetgate" checkout -q --detach "$head"
cp /etc/resolv.conf "$root/etc/resolv.conf"
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod 755 "$root/usr/sbin/policy-rc.d"

envs=(HOME=/root USER=root LOGNAME=root LANG=C.UTF-8 TERM="${TERM:-dumb}"
      PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin)
ca="${PIP_CERT:-${SSL_CERT_FILE:-}}"
if [ -n "$ca" ] && [ -f "$ca" ]; then
  mkdir -p "$root/usr/local/share/fleetgate-fresh"
  cp "$ca" "$root/usr/local/share/fleetgate-fresh/host-ca.crt"
  c=/usr/local/share/fleetgate-fresh/host-ca.crt
  envs+=(PIP_CERT="$c" SSL_CERT_FILE="$c" REQUESTS_CA_BUNDLE="$c")
fi

args=""
[ "$#" -eq 0 ] || args="$(printf ' %q' "$@")"
echo "fresh-check: $head in a fresh Debian root ($root): ./scripts/test.sh$args" >&2
log="$work/test.log"
set +e
# shellcheck disable=SC2016  # expanded by the inner bash
unshare --mount --pid --fork --propagation private bash -ec '
  root=$1; cache=$2; shift 2
  # The root a mount point of its own, as / is on a machine: mount propagation changes
  # (unshare, libvirtd, podman storage) refuse a / that is not one.
  mount --bind "$root" "$root"
  mount -t proc proc "$root/proc"
  mount --rbind /sys "$root/sys"
  mount --rbind /dev "$root/dev"
  mount -t tmpfs -o mode=1777 tmpfs "$root/dev/shm"
  mkdir -p "$root$cache"
  mount --bind "$cache" "$root$cache"
  cd "$root"
  exec chroot "$root" /usr/bin/env -i "$@"
' fresh "$root" "$cache" "${envs[@]}" /root/fleetgate/scripts/test.sh "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
echo
echo "fresh-check: HEAD $head, ./scripts/test.sh$args in a fresh Debian root: exit $status after ${SECONDS} s"
# pytest's closing lines: the short summary if there is one, and the final counts.
if grep -q '^=* short test summary info =*$' "$log"; then
  awk '/^=+ short test summary info =+$/ {p = 1} p' "$log" | tail -n 60
else
  tail -n 1 "$log"
fi
exit "$status"

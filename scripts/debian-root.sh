#!/usr/bin/env bash
# A clean Debian 12 root made by debootstrap, cached: prints the path of a tarball of it.
#   scripts/debian-root.sh                      minbase only (what scripts/fresh-check.sh starts from)
#   scripts/debian-root.sh python3 python3-venv minbase plus these packages (the image tests' base)
# The root comes from the same Debian mirror(s) this machine's apt uses (/etc/apt/sources.list
# and /etc/apt/sources.list.d/*.sources|*.list, the entries signed by the Debian archive
# keyring); the root's own apt sources are those same entries. The tarball is cached in
# $FLEETGATE_TEST_CACHE (default /var/cache/fleetgate-test, outside any checkout, so a clean
# clone reuses it), named by a hash of its inputs: suite, variant, packages and the apt
# sources. Delete the directory to rebuild. Needs root (debootstrap does).
set -euo pipefail
CACHE="${FLEETGATE_TEST_CACHE:-/var/cache/fleetgate-test}"
SUITE=bookworm
VARIANT=minbase
FORMAT=1   # bump when what this script puts in the root changes

# The Debian entries of this machine's apt sources, as deb822 stanzas.
debian_sources() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk -v RS= -v ORS='\n\n' '/debian-archive-keyring/' "$f"
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    awk '$1 == "deb" && $0 ~ /\/debian(-security)?\/? / {
           uri = ""; for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i !~ /\]$/) { uri = $i; break }
           rest = ""; for (j = i + 1; j <= NF; j++) rest = rest " " $j
           split(substr(rest, 2), w, " "); comps = ""
           for (k = 2; k in w; k++) comps = comps " " w[k]
           printf "Types: deb\nURIs: %s\nSuites: %s\nComponents:%s\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n", uri, w[1], comps }' "$f"
  done
}
sources="$(debian_sources)"
# The mirror for debootstrap: the first entry that serves the suite itself (not -security).
mirror="$(awk -v RS= -v s="$SUITE" '{
    uri = ""; ok = 0
    n = split($0, l, "\n")
    for (i = 1; i <= n; i++) {
      if (l[i] ~ /^URIs:/) { split(l[i], u, " "); uri = u[2] }
      if (l[i] ~ /^Suites:/) { m = split(l[i], t, " "); for (j = 2; j <= m; j++) if (t[j] == s) ok = 1 }
    }
    if (ok && uri != "") { print uri; exit }
  }' <<<"$sources")"
if [ -z "$mirror" ]; then
  echo "debian-root: no Debian mirror for $SUITE in /etc/apt/sources.list{,.d/}" >&2
  exit 1
fi
packages="$(printf '%s\n' "$@" | sed '/^$/d' | sort -u | paste -sd, -)"
key="$(printf '%s\n' "$FORMAT" "$SUITE" "$VARIANT" "$packages" "$sources" | sha256sum | cut -c1-16)"
out="$CACHE/debian-$SUITE-$key.tar"
if [ -f "$out" ]; then
  echo "$out"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "debian-root: debootstrap needs root (and $out is not cached yet)" >&2
  exit 1
fi
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9       # two runs at once: the second waits and then finds the first one's tarball
if [ -f "$out" ]; then
  echo "$out"
  exit 0
fi
work="$(mktemp -d "$CACHE/build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
echo "debian-root: debootstrap $SUITE ($VARIANT${packages:+, $packages}) from $mirror" >&2
debootstrap --variant="$VARIANT" ${packages:+--include="$packages"} "$SUITE" "$work/root" "$mirror" \
  >"$work/debootstrap.log" 2>&1 || { tail -n 30 "$work/debootstrap.log" >&2; exit 1; }
rm -f "$work/root/etc/apt/sources.list"
printf '%s\n' "$sources" >"$work/root/etc/apt/sources.list.d/debian.sources"
rm -rf "$work/root/var/cache/apt/archives/"*.deb "$work/root/var/lib/apt/lists/"*
: >"$work/root/etc/resolv.conf"
tar --numeric-owner --xattrs -C "$work/root" -cf "$work/root.tar" .
mv "$work/root.tar" "$out"
echo "$out"

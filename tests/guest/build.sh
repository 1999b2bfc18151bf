#!/bin/bash
# tests/guest/build.sh OUTDIR AUTHORIZED_KEYS
#
# Builds the test guest for fleetgate's QEMU backend, from Debian packages only: Debian's
# stock kernel plus a tiny initramfs (busybox, dropbear with sftp-server) that brings up
# QEMU's user-mode network, accepts SSH logins as root with the keys in AUTHORIZED_KEYS,
# and powers off cleanly on the ACPI power button (so QMP system_powerdown works).
# Takes 1-2 s. tests/guest_helpers.py caches the result; this script never reads a cache.
#
# Debian 12 packages it needs (scripts/setup.sh installs them):
#   linux-image-amd64 busybox-static dropbear-bin openssh-sftp-server cpio kmod xz-utils zstd
#
# Outputs in OUTDIR:
#   vmlinux            uncompressed kernel (PVH entry): skips the bzImage decompressor,
#                      ~3.5 s faster per boot under TCG. vmlinuz is kept too.
#   vmlinuz            /boot/vmlinuz-$KVER
#   initramfs.cpio     the root file system (uncompressed: faster to boot under TCG)
#   host_ed25519.pub   the guest's SSH host key (generated here, so it can be pinned)
#   kernel-version     $KVER
#
# Guest behaviour, driven by the kernel command line:
#   fleetvm.hostname=NAME   hostname (default fleetvm), so tests can tell guests apart
#   fleetvm.delay=SECONDS   wait before starting sshd (to make a slow boot on purpose)
# With a virtio-vsock device (and socat on the build machine), SSH also answers on
# VSOCK port 22 (socat relays it to dropbear), for fleetgate's VSOCK transport.
# It prints "FLEETVM-READY <uptime>" on the serial console once port 22 listens.
#
# Environment: KVER (default: newest /boot/vmlinuz-* with modules installed).
set -euo pipefail

OUT=${1:?usage: $0 OUTDIR AUTHORIZED_KEYS}
AUTHKEYS=$(readlink -f "${2:?usage: $0 OUTDIR AUTHORIZED_KEYS}")
[ -s "$AUTHKEYS" ] || { echo "build.sh: $AUTHKEYS is empty or missing" >&2; exit 1; }
# virtio_pci/net/rng: the devices the QEMU backend gives every guest; button + evdev:
# the ACPI power button that busybox acpid turns into a clean poweroff.
# vmw_vsock_virtio_transport: sshd over AF_VSOCK when the guest has a virtio-vsock device.
MODULES="virtio_pci virtio_net virtio_rng button evdev vmw_vsock_virtio_transport"

if [ -z "${KVER:-}" ]; then
    for k in $(ls /boot/vmlinuz-* 2>/dev/null | sed 's|/boot/vmlinuz-||' | sort -V); do
        [ -f "/lib/modules/$k/modules.dep" ] && KVER=$k
    done
fi
[ -n "${KVER:-}" ] || { echo "build.sh: no /boot/vmlinuz-* with /lib/modules/<ver>/modules.dep; apt-get install linux-image-amd64" >&2; exit 1; }

for bin in /bin/busybox /usr/sbin/dropbear /usr/bin/dropbearkey /usr/lib/openssh/sftp-server cpio modprobe xz; do
    command -v "$bin" >/dev/null || { echo "build.sh: missing $bin; run scripts/setup.sh" >&2; exit 1; }
done

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
STAGE=$(mktemp -d "$OUT/stage.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
cd "$STAGE"

mkdir -p bin sbin usr/bin usr/sbin usr/lib etc/dropbear etc/acpi/PWRF root/.ssh \
         proc sys dev tmp run var/log lib/modules
chmod 1777 tmp
chmod 700 root root/.ssh

# --- busybox (static) and its applets ----------------------------------------------
cp /bin/busybox bin/busybox
for a in $(bin/busybox --list); do
    [ "$a" = busybox ] || ln -sf busybox "bin/$a"
done
for a in poweroff reboot halt init; do ln -sf ../bin/busybox "sbin/$a"; done

# --- dynamically linked binaries with the libraries ldd names ------------------------
copy_with_libs() {  # $1 = binary on this machine, $2 = path inside the image
    install -D -m 0755 "$1" "./$2"
    ldd "$1" | grep -o '/[^ ]*' | while read -r lib; do
        [ -e "./$lib" ] || install -D -m 0755 "$(readlink -f "$lib")" "./$lib"
    done
}
copy_with_libs /usr/sbin/dropbear usr/sbin/dropbear
# Debian's dropbear looks for the SFTP subsystem at /usr/lib/sftp-server; OpenSSH 9's
# scp speaks SFTP, so without it scp fails.
copy_with_libs /usr/lib/openssh/sftp-server usr/lib/sftp-server
# socat relays VSOCK port 22 to dropbear, for fleetgate's VSOCK transport. It doubles the
# image (its libraries), so it is packed only where guests can have vsock at all: on a host
# with /dev/vhost-vsock (or WITH_SOCAT=1).
if [ -x /usr/bin/socat ] && { [ "${WITH_SOCAT:-}" = 1 ] || [ -e /dev/vhost-vsock ]; }; then
    copy_with_libs /usr/bin/socat usr/bin/socat
fi

# --- kernel modules in dependency order (kmod resolves them against $KVER) ------------
: > etc/modules.load
# shellcheck disable=SC2086
modprobe -S "$KVER" --show-depends -a $MODULES | awk '$1=="insmod"{print $2}' |
while read -r ko; do
    name=$(basename "$ko")
    case $ko in
        *.ko.xz)  name=${name%.xz};  grep -qx "$name" etc/modules.load || xz -dc "$ko" > "lib/modules/$name" ;;
        *.ko.zst) name=${name%.zst}; grep -qx "$name" etc/modules.load || zstd -dcq "$ko" > "lib/modules/$name" ;;
        *)        grep -qx "$name" etc/modules.load || cp "$ko" "lib/modules/$name" ;;
    esac
    grep -qx "$name" etc/modules.load || echo "$name" >> etc/modules.load
done

# --- accounts and keys ---------------------------------------------------------------
# Shadow "*" means "no password login"; dropbear refuses '!'-locked accounts even for keys.
echo 'root:x:0:0:root:/root:/bin/sh' > etc/passwd
echo 'root:*:19000:0:99999:7:::'     > etc/shadow
echo 'root:x:0:'                     > etc/group
printf '/bin/sh\n/bin/ash\n'          > etc/shells
chmod 600 etc/shadow
install -m 0600 "$AUTHKEYS" root/.ssh/authorized_keys

# The host key is made here, not at boot: no entropy wait in the guest, and a known
# key that the gateway's config pins (machines.NAME.host_key = "OUTDIR/host_ed25519.pub").
dropbearkey -t ed25519 -f etc/dropbear/dropbear_ed25519_host_key >/dev/null 2>&1
dropbearkey -y -f etc/dropbear/dropbear_ed25519_host_key | awk '/^ssh-/{print $1, $2, "fleetvm"}' > "$OUT/host_ed25519.pub.new"

# --- ACPI power button -> poweroff --------------------------------------------------
# busybox acpid maps KEY_POWER to the action PWRF/00000080 under its -c directory.
printf '#!/bin/sh\nexec /sbin/poweroff\n' > etc/acpi/PWRF/00000080
chmod 755 etc/acpi/PWRF/00000080

# --- /init: mounts, modules, network, then busybox init ------------------------------
cat > init <<'INIT'
#!/bin/busybox sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t devtmpfs devtmpfs /dev
exec 0<>/dev/console 1>&0 2>&0
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /dev/pts && mount -t devpts -o gid=0,mode=620,ptmxmode=666 devpts /dev/pts
while read -r m; do insmod "/lib/modules/$m" 2>/dev/null; done < /etc/modules.load
name=fleetvm delay=0
for arg in $(cat /proc/cmdline); do
    case $arg in
        fleetvm.hostname=*) name=${arg#*=} ;;
        fleetvm.delay=*)    delay=${arg#*=} ;;
    esac
done
hostname "$name"
ip link set lo up
if ip link set eth0 up 2>/dev/null; then   # QEMU user-mode network (slirp) defaults
    ip addr add 10.0.2.15/24 dev eth0
    ip route add default via 10.0.2.2
    echo 'nameserver 10.0.2.3' > /etc/resolv.conf
    # Speak to slirp once so it learns our MAC now; otherwise the first forwarded SYN
    # waits ~1 s for slirp's next ARP attempt.
    arping -q -c 1 -w 1 -I eth0 10.0.2.2 &
fi
[ "$delay" = 0 ] || sleep "$delay"
exec /bin/busybox init
INIT
chmod 755 init

cat > etc/inittab <<'TAB'
::respawn:/usr/sbin/dropbear -F -E -s -p 22 -r /etc/dropbear/dropbear_ed25519_host_key
::respawn:/bin/busybox acpid -f -c /etc/acpi
::once:/etc/ready.sh
::respawn:/etc/vsock-ssh.sh
::askfirst:-/bin/sh
::ctrlaltdel:/sbin/poweroff
::shutdown:/bin/sync
TAB

cat > etc/ready.sh <<'READY'
#!/bin/sh
i=0
while [ $i -lt 500 ] && ! netstat -ltn 2>/dev/null | grep -q ':22 '; do usleep 10000; i=$((i+1)); done
echo "FLEETVM-READY $(cut -d' ' -f1 /proc/uptime)" > /dev/console
READY
# SSH over AF_VSOCK port 22 (the host connects to this guest's CID), relayed to dropbear.
# Without a bound virtio-vsock device or socat, idle forever (respawn must not spin).
cat > etc/vsock-ssh.sh <<'VSOCK'
#!/bin/sh
if [ -x /usr/bin/socat ] && ls /sys/bus/virtio/drivers/vmw_vsock_virtio_transport/ 2>/dev/null | grep -q '^virtio'; then
    exec /usr/bin/socat VSOCK-LISTEN:22,reuseaddr,fork TCP:127.0.0.1:22
fi
exec sleep 2147483647
VSOCK
chmod 755 etc/ready.sh etc/vsock-ssh.sh

# --- kernel ---------------------------------------------------------------------------
cp "/boot/vmlinuz-$KVER" "$OUT/vmlinuz.new"
# Extract the ELF vmlinux from the bzImage: QEMU boots it through the PVH entry point
# (Debian sets CONFIG_PVH=y), which skips decompression, slow when emulated.
extract() {  # $1 = magic (grep -P syntax), $2.. = decompressor
    local magic=$1 off; shift
    off=$(LC_ALL=C grep -m1 -aboP "$magic" "/boot/vmlinuz-$KVER" | cut -d: -f1)
    [ -n "$off" ] || return 1
    tail -c +$((off + 1)) "/boot/vmlinuz-$KVER" | "$@" > "$OUT/vmlinux.new" 2>/dev/null || true
    [ "$(head -c 4 "$OUT/vmlinux.new" | od -An -c | tr -d ' ')" = '177ELF' ]
}
extract '\xfd7zXZ\x00' xz -dc --single-stream ||
extract '\x28\xb5\x2f\xfd' zstd -dcq ||
extract '\x1f\x8b\x08' gzip -dc ||
{ echo "build.sh: could not extract vmlinux from /boot/vmlinuz-$KVER" >&2; exit 1; }

# --- pack; rename last so OUTDIR never holds a half-written image -----------------------
find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet > "$OUT/initramfs.cpio.new"
for f in vmlinux vmlinuz initramfs.cpio host_ed25519.pub; do mv -f "$OUT/$f.new" "$OUT/$f"; done
echo "$KVER" > "$OUT/kernel-version"
echo "build.sh: $OUT: kernel $KVER, initramfs $(stat -c %s "$OUT/initramfs.cpio") bytes, host key $(cat "$OUT/host_ed25519.pub")"

"""The test guest (tests/guest/build.sh), built once and cached between test runs.

The cache key is a hash of the build script, the kernel and the tools it packs, and the
client key the guest accepts. That key is generated once and kept in the cache too:
a key made per test run would change the hash and rebuild the image every time.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from fleetgate.keys import ensure_key

REPO = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO / "tests" / "guest" / "build.sh"
# Inputs whose change must rebuild the image, besides the script and the kernel.
TOOLS = ("/bin/busybox", "/usr/sbin/dropbear", "/usr/lib/openssh/sftp-server")
# The guest's VSOCK-to-dropbear relay, packed only where /dev/vhost-vsock exists (build.sh).
OPTIONAL_TOOLS = ("/usr/bin/socat", "/dev/vhost-vsock")
KEEP_DAYS = 7


def cache_root() -> Path:
    override = os.environ.get("FLEETGATE_GUEST_CACHE")
    return Path(override) if override else REPO / ".cache" / "guest"


@dataclass(frozen=True)
class GuestImage:
    dir: Path
    kernel: Path          # the uncompressed vmlinux (PVH boot: faster under TCG)
    initrd: Path
    host_key_pub: Path    # pin this in machines.NAME.host_key
    client_key: Path      # the private key the guest's root accepts
    kernel_version: str


def newest_kernel() -> str:
    """The kernel build.sh picks: the newest /boot/vmlinuz-* whose modules are installed."""
    found = []
    for p in Path("/boot").glob("vmlinuz-*"):
        ver = p.name[len("vmlinuz-"):]
        if (Path("/lib/modules") / ver / "modules.dep").is_file():
            found.append(ver)
    if not found:
        raise RuntimeError("no kernel in /boot with modules; run scripts/setup.sh (linux-image-amd64)")
    key = lambda v: [int(x) if x.isdigit() else x for x in v.replace("-", ".").split(".")]  # noqa: E731
    return sorted(found, key=key)[-1]


def _fingerprint(kver: str, client_pub: bytes) -> str:
    h = hashlib.sha256()
    h.update(BUILD_SCRIPT.read_bytes())
    h.update(kver.encode())
    for f in (f"/boot/vmlinuz-{kver}", *TOOLS):
        st = os.stat(f)
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    for f in OPTIONAL_TOOLS:   # packed only if present: installing one later rebuilds the image
        h.update(f"{f}:{os.path.exists(f)}".encode())
    h.update(client_pub)
    return h.hexdigest()[:16]


def _image(d: Path, client_key: Path, kver: str) -> GuestImage:
    return GuestImage(d, d / "vmlinux", d / "initramfs.cpio", d / "host_ed25519.pub", client_key, kver)


def build_guest(timeout: float = 120) -> GuestImage:
    """Build the guest image, or reuse the cached one; safe when several test runs race."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ensure_key(root / "client_key", "fleetgate-test-guest")
        client_key = root / "client_key"
        kver = newest_kernel()
        d = root / _fingerprint(kver, (root / "client_key.pub").read_bytes())
        if not (d / "kernel-version").is_file():
            tmp = root / f"{d.name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            p = subprocess.run(["bash", str(BUILD_SCRIPT), str(tmp), str(root / "client_key.pub")],
                               capture_output=True, text=True, timeout=timeout, env={**os.environ, "KVER": kver})
            if p.returncode != 0:
                raise RuntimeError(f"tests/guest/build.sh failed ({p.returncode}):\n{p.stderr[-2000:]}")
            tmp.rename(d)
            _prune(root, keep=d)
        os.utime(d)  # mark as recently used
        return _image(d, client_key, kver)


def _prune(root: Path, keep: Path) -> None:
    """Drop images of older scripts or kernels that no run used for a week (~80 MB each)."""
    cutoff = time.time() - KEEP_DAYS * 86400
    for d in root.iterdir():
        if d.is_dir() and d != keep and d.stat().st_mtime < cutoff:
            shutil.rmtree(d, ignore_errors=True)

"""A real, private libvirtd for the tests: `virtlogd -d` and `libvirtd -d`, no systemd.

Privacy: the daemons run as root (the qemu:///system driver) inside their own mount
namespace (`unshare --mount`), where /etc/libvirt, /run/libvirt, /var/lib/libvirt and
/var/log/libvirt are bind mounts of directories under the test's own temporary
directory; so are /etc/passwd and /etc/group, with the `libvirt-qemu` account Debian's
libvirt expects (its libvirt-daemon-system package would create it; we do not need that
package nor touch the host's files). Domains, their state and logs live and die in the
test's directory; the client socket is in that directory too (`unix_sock_dir`), reached as
`qemu:///system?socket=...`. Only /var/cache/libvirt (QEMU capability probes, ~4 s to
redo) is kept between runs, under .cache/libvirt in the checkout.

Stopping: every domain is destroyed and undefined, then libvirtd and virtlogd get SIGTERM.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0

DOMAIN_XML = """<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <devices>
    <emulator>{qemu}</emulator>
    <controller type='usb' model='none'/>
    <serial type='file'>
      <source path='{console}'/>
      <target port='0'/>
    </serial>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
    <memballoon model='none'/>{extra_devices}
  </devices>{commandline}
</domain>
"""

HOSTFWD = """
  <qemu:commandline>
    <qemu:arg value='-netdev'/>
    <qemu:arg value='user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22'/>
    <qemu:arg value='-device'/>
    <qemu:arg value='virtio-net-pci,netdev=n0,bus=pci.0,addr=0x10'/>
  </qemu:commandline>"""

VSOCK_DEVICE = """
    <vsock model='virtio'><cid auto='yes'/></vsock>"""


def domain_xml(name: str, kernel: Path, initrd: Path, console: Path, *, cmdline: str = "console=ttyS0 quiet",
               port: int | None = None, vsock: bool = False) -> str:
    """The reference domain (type qemu = TCG, direct kernel boot, user-net with a hostfwd to :22)."""
    return DOMAIN_XML.format(
        name=name, kernel=kernel, initrd=initrd, cmdline=cmdline, console=console,
        qemu=shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64",
        extra_devices=VSOCK_DEVICE if vsock else "",
        commandline=HOSTFWD.format(port=port) if port is not None else "")


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@dataclass
class Libvirtd:
    root: Path
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def sock_dir(self) -> Path:
        return self.root / "sock"

    @property
    def uri(self) -> str:
        return f"qemu:///system?socket={self.sock_dir}/libvirt-sock"

    def virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["virsh", "-c", self.uri, *args], capture_output=True, text=True, timeout=60,
                              check=check)

    def start(self) -> "Libvirtd":
        r = self.root
        dirs = {"etc": "/etc/libvirt", "run": "/run/libvirt", "lib": "/var/lib/libvirt", "log": "/var/log/libvirt"}
        for d in (*dirs, "sock", "console"):
            (r / d).mkdir(parents=True, exist_ok=True)
        cache = REPO / ".cache" / "libvirt"
        cache.mkdir(parents=True, exist_ok=True)
        (r / "etc" / "libvirtd.conf").write_text(
            f'unix_sock_dir = "{self.sock_dir}"\nunix_sock_rw_perms = "0700"\n'
            'auth_unix_rw = "none"\nauth_unix_ro = "none"\n'
            f'log_outputs = "3:file:{r}/libvirtd.log"\n')
        (r / "etc" / "virtlogd.conf").write_text(f'log_outputs = "3:file:{r}/virtlogd.log"\n')
        # QEMU as root, no per-domain namespaces or labels: this is a test sandbox.
        (r / "etc" / "qemu.conf").write_text(
            'user = "root"\ngroup = "root"\ndynamic_ownership = 0\nsecurity_driver = "none"\nnamespaces = []\n')
        passwd = Path("/etc/passwd").read_text()
        if not any(line.startswith("libvirt-qemu:") for line in passwd.splitlines()):
            passwd += "libvirt-qemu:x:64055:64055:Libvirt Qemu:/var/lib/libvirt:/usr/sbin/nologin\n"
        group = Path("/etc/group").read_text()
        if not any(line.startswith("libvirt-qemu:") for line in group.splitlines()):
            group += "libvirt-qemu:x:64055:\n"
        (r / "passwd").write_text(passwd)
        (r / "group").write_text(group)
        binds = [(r / src, dst) for src, dst in dirs.items()]
        binds += [(cache, "/var/cache/libvirt"), (r / "passwd", "/etc/passwd"), (r / "group", "/etc/group")]
        script = ["set -e"]
        for src, dst in binds:
            if not dst.startswith("/etc/") or dst == "/etc/libvirt":
                script.append(f"mkdir -p {dst}")
            script.append(f"mount --bind {src} {dst}")
        script.append(f"virtlogd -d -p {r}/virtlogd.pid")
        script.append(f"libvirtd -d -p {r}/libvirtd.pid")
        p = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(script)],
                           capture_output=True, text=True, timeout=START_TIMEOUT)
        if p.returncode != 0:
            raise RuntimeError(f"could not start libvirtd in a private mount namespace ({p.returncode}): "
                               f"{p.stderr.strip()}\n{self.log_tail()}")
        for name in ("virtlogd", "libvirtd"):
            self.pids[name] = int((r / f"{name}.pid").read_text())
        # `libvirtd -d` returns once its drivers are initialised; one call proves it answers.
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            v = self.virsh("list", "--all", check=False)
            if v.returncode == 0:
                return self
            if time.monotonic() > deadline or not _alive(self.pids["libvirtd"]):
                raise RuntimeError(f"libvirtd does not answer: {v.stderr.strip()}\n{self.log_tail()}")
            time.sleep(0.1)  # a daemon in another namespace: nothing to wait on but its socket

    def log_tail(self) -> str:
        try:
            return "\n".join((self.root / "libvirtd.log").read_text().splitlines()[-15:])
        except OSError:
            return ""

    def stop(self) -> None:
        """Destroy and undefine every domain (all are ours: the config dir is private), then the daemons."""
        try:
            names = self.virsh("list", "--all", "--name", check=False).stdout.split()
            for name in names:
                self.virsh("destroy", name, check=False)
                self.virsh("undefine", name, "--nvram", check=False)
        finally:
            for name in ("libvirtd", "virtlogd"):
                pid = self.pids.get(name)
                if pid is None:
                    continue
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
                deadline = time.monotonic() + STOP_TIMEOUT
                while _alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.05)  # not our child: no wait() to block on
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)

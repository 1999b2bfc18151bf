"""Relay benchmark: scp throughput and login latency through fleetgate vs direct OpenSSH.

One run, one sshd (the demo machine `alice`, a real OpenSSH sshd), four ways in:
  direct   ssh straight to the machine's sshd    (the baseline)
  relay    ssh alice@gateway                     (the gateway terminates SSH and relays channels)
  jump     ProxyCommand 'ssh -W alice:22 alice@gateway'  (end to end; the gateway splices bytes)
  bastion  ProxyCommand 'ssh -W 127.0.0.1:PORT root@bastion'  (the same, through a plain
           OpenSSH sshd that this benchmark starts: what jump mode must at least match)
Transfers go tmpfs → tmpfs, with the client's default cipher and with aes128-gcm on both
legs, interleaved round by round so that noise from other work on the machine hits every
mode alike; ratios are taken within a round, against the direct run of that round.
Latency: `ssh … true` with the client's default key exchange and with curve25519-sha256,
and an sftp session (`sftp -b` running `pwd`), per mode, interleaved.

Usage: ./scripts/bench.sh [--size 64MiB] [--repeat 3] [--set gateway.window=...] [--no-docs]
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GATEWAY_ALIAS = "fleetgate-bench"
BASTION_ALIAS = "fleetgate-bench-bastion"
SSHD = "/usr/sbin/sshd"  # sshd re-executes itself, so it must be started by absolute path
MODES = ("direct", "relay", "jump", "bastion")
# The latency rows: how the client logs in. "kex" pins the client's key exchange (on every
# leg the client itself runs) so that the direct baseline does not pay for sntrup761 alone.
KEX_SAME = ["-o", "KexAlgorithms=curve25519-sha256"]
LOGINS = {
    "ssh": "`ssh … true`, client's default key exchange",
    "ssh-kex": "`ssh … true`, `-o KexAlgorithms=curve25519-sha256`",
    "sftp": "`sftp -b` (`pwd`), client's default key exchange",
}
# Targets of issue 15, printed next to the measurements.
TARGET_RELAY_RATIO = 0.80        # relay and jump throughput ÷ direct, same round
TARGET_CPU_RATIO = 1.0           # gateway CPU per GiB ÷ the machine sshd's
TARGET_LATENCY_P50_MS = 10.0     # relay login latency above direct
TARGET_LATENCY_P90_MS = 20.0
CIPHERS = {"default": [], "aes128-gcm": ["-c", "aes128-gcm@openssh.com"]}
DOCS_BEGIN = "<!-- bench:relay:begin (written by bench/relay.py; edit outside these markers) -->"
DOCS_END = "<!-- bench:relay:end -->"
MIB = 1024 * 1024
# scp's own options: OpenSSH 9 scp speaks SFTP (64 outstanding 32 KiB requests, so it is
# bound by round trips as well as by CPU); "-O" selects the streaming legacy protocol.
SCP_OPTS: list[str] = []


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B?|)\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size like 64MiB or 1GiB")
    unit = m.group(2).upper()[:1]
    return int(float(m.group(1)) * {"": 1, "K": 1024, "M": MIB, "G": 1024 * MIB}[unit])


def human_size(n: int) -> str:
    return f"{n // (1024 * MIB)} GiB" if n % (1024 * MIB) == 0 else f"{n / MIB:g} MiB"


class Gateway:
    """bench/gateway.py as a subprocess: its own process and CPU, stopped with EOF on stdin."""

    def __init__(self, state_dir: Path, sets: Sequence[str], log: Path | None = None, script: Path | None = None):
        self.state_dir = state_dir
        self.log = open(log or state_dir.parent / "gateway.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(script or HERE / "gateway.py"), "--state-dir", str(state_dir),
             *[a for s in sets for a in ("--set", s)]],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        line = self._readline(60)
        info = json.loads(line)
        self.port: int = info["port"]
        self.pid: int = info["pid"]
        self.machines: dict[str, int] = info["machines"]
        self.package: str = info["fleetgate"]
        # The bench aliases the gateway's host key, as the tests do, so no port is baked in.
        host_line = (state_dir / "gateway_host_key.pub").read_text().strip()
        with open(state_dir / "known_hosts", "a") as f:
            f.write(f"{GATEWAY_ALIAS} {host_line}\n")

    def _readline(self, timeout: float) -> str:
        import selectors

        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise RuntimeError(f"gateway gave no answer within {timeout} s; see {self.log.name}")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"gateway exited: {Path(self.log.name).read_text()[-2000:]}")
        return line

    def stop_machine(self, name: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"stop {name}\n")
        self.proc.stdin.flush()
        answer = self._readline(60).strip()
        if answer != "ok":
            raise RuntimeError(f"gateway: stop {name}: {answer}")

    def cpu_seconds(self) -> float:
        """The gateway process's own user+system CPU time (not its children's: the sshds)."""
        return _proc_cpu(self.pid, children=False)

    def machine_cpu_seconds(self, name: str, before: set[str] | None = None) -> tuple[float, set[str]]:
        """CPU time of the machine's sshd (listener plus reaped sessions), and its live sessions."""
        pid = int((self.state_dir / "state" / "process" / name / "sshd.pid").read_text())
        return sshd_cpu_seconds(pid, before)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


def sshd_cpu_seconds(pid: int, before: set[str] | None = None) -> tuple[float, set[str]]:
    """CPU time of an sshd listener plus its reaped sessions, and the sessions still alive.

    With `before` (the sessions alive when the transfer started), waits, bounded, until
    every session started since has been reaped, since a child's time is added to its
    parent's only then. Sessions that outlive their client (see the jump-mode note in
    docs/benchmarks.md) are not waited for twice.
    """
    children = Path(f"/proc/{pid}/task/{pid}/children")
    live = set(children.read_text().split())
    if before is not None:
        deadline = time.monotonic() + 10
        while live - before and time.monotonic() < deadline:
            time.sleep(0.02)
            live = set(children.read_text().split())
    return _proc_cpu(pid, children=True), live


class Bastion:
    """A plain OpenSSH sshd on loopback, started by the benchmark: the jump host to beat.

    Why our own: the jump-mode target is "at least as fast as an OpenSSH bastion", and the
    comparison only means something if the bastion runs on the same cores, under the same
    noise, interleaved with the other modes. It accepts the bench client's key, forwards
    (`-W`) and nothing else; its CPU (listener plus session processes) is measured like the
    machine's sshd.
    """

    def __init__(self, work: Path, authorized_keys: Path, known_hosts: Path) -> None:
        self.dir = work / "bastion"
        self.dir.mkdir()
        host_key = self.dir / "host_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", BASTION_ALIAS, "-f", str(host_key)],
                       check=True, stdin=subprocess.DEVNULL)
        self.log = open(self.dir / "sshd.log", "wb")
        for attempt in range(3):  # a free port can be taken between our probe and sshd's bind
            self.port = _free_port()
            config = self.dir / "sshd_config"
            config.write_text(f"""# the benchmark's bastion (bench/relay.py --modes bastion)
ListenAddress 127.0.0.1:{self.port}
HostKey {host_key}
PidFile {self.dir / 'sshd.pid'}
AuthorizedKeysFile {authorized_keys}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowTcpForwarding yes
AllowAgentForwarding no
X11Forwarding no
PermitTTY no
PrintMotd no
LogLevel ERROR
MaxStartups 200:30:400
""")
            self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL,
                                         stdout=self.log, stderr=self.log)
            if self._wait_listening(10):
                break
            self.close()
            self.log = open(self.dir / "sshd.log", "ab")
        else:
            raise RuntimeError(f"bastion sshd did not start: {(self.dir / 'sshd.log').read_text()[-2000:]}")
        self.pid: int = self.proc.pid  # with -D the listener is the process we started
        with open(known_hosts, "a") as f:
            f.write(f"{BASTION_ALIAS} {host_key.with_suffix('.pub').read_text().strip()}\n")

    def _wait_listening(self, timeout: float) -> bool:
        import socket

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(64).startswith(b"SSH-"):
                        return True
            except OSError:
                time.sleep(0.05)
        return False

    def cpu_seconds(self, before: set[str] | None = None) -> tuple[float, set[str]]:
        """The bastion sshd's CPU time (listener plus reaped sessions), and its live sessions."""
        return sshd_cpu_seconds(self.pid, before)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _proc_cpu(pid: int, children: bool) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    ticks = int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if children else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@dataclass
class Ways:
    """The OpenSSH options and destination for each way in."""

    state_dir: Path
    gateway_port: int
    machine_port: int
    upstream_user: str
    bastion_port: int | None = None

    def base(self) -> list[str]:
        d = self.state_dir
        return ["-F", "/dev/null", "-i", str(d / "client_key"), "-o", f"UserKnownHostsFile={d / 'known_hosts'}",
                "-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                "-o", "ConnectTimeout=30", "-o", "ControlMaster=no", "-o", "ControlPath=none"]

    def to_gateway(self) -> list[str]:
        return [*self.base(), "-o", f"HostKeyAlias={GATEWAY_ALIAS}", "-o", f"Port={self.gateway_port}"]

    def opts(self, mode: str, cipher: str, extra: Sequence[str] = ()) -> tuple[list[str], str]:
        """Options and destination for `mode`; the cipher and `extra` go on every leg the client runs."""
        c = [*CIPHERS[cipher], *extra]
        if mode == "relay":
            return [*self.to_gateway(), *c], "alice@127.0.0.1"
        if mode == "jump":
            proxy = shlex.join(["ssh", *self.to_gateway(), *c, "-W", "%h:%p", "alice@127.0.0.1"])
            return [*self.base(), *c, "-o", f"ProxyCommand={proxy}", "-o", "HostKeyAlias=alice"], \
                f"{self.upstream_user}@alice"
        if mode == "direct":
            return [*self.base(), *c, "-o", f"Port={self.machine_port}", "-o", "HostKeyAlias=alice"], \
                f"{self.upstream_user}@127.0.0.1"
        if mode == "bastion":
            if self.bastion_port is None:
                raise ValueError("bastion mode without a bastion")
            proxy = shlex.join(["ssh", *self.base(), *c, "-o", f"HostKeyAlias={BASTION_ALIAS}",
                                "-W", "%h:%p", f"{self.upstream_user}@127.0.0.1", "-p", str(self.bastion_port)])
            return [*self.base(), *c, "-o", f"ProxyCommand={proxy}", "-o", f"Port={self.machine_port}",
                    "-o", "HostKeyAlias=alice"], f"{self.upstream_user}@127.0.0.1"
        raise ValueError(mode)

    def login(self, mode: str, kind: str, batch: Path) -> list[str]:
        """The argv of one latency row's login (see LOGINS); `batch` is sftp's batch file."""
        if kind == "sftp":
            opts, host = self.opts(mode, "default")
            return ["sftp", "-q", "-b", str(batch), *opts, host]
        opts, host = self.opts(mode, "default", KEX_SAME if kind == "ssh-kex" else ())
        return ["ssh", *opts, host, "true"]


def run(argv: list[str], timeout: float) -> float:
    """Run a real OpenSSH program; return its wall time, or raise with its stderr."""
    # Output goes to a file, not a pipe: in jump mode the ProxyCommand ssh inherits it, and
    # a pipe would make us wait for that process too, not for the command the user waits for.
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, timeout=timeout)
        dt = time.perf_counter() - t0
        if p.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{shlex.join(argv)} exited {p.returncode}: {err.read().decode(errors='replace')[-1500:]}")
    return dt


def make_file(path: Path, size: int) -> None:
    chunk = 4 * MIB
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n


def same_file(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(16 * MIB), fb.read(16 * MIB)
            if x != y:
                return False
            if not x:
                return True


@dataclass
class Sample:
    seconds: float
    gateway_cpu: float        # the party in the middle: the gateway process, or the bastion sshd
    client_cpu: float = 0.0   # scp and the ssh processes it ran
    machine_cpu: float = 0.0  # the machine's sshd (session processes included)


@dataclass
class Results:
    size: int
    transfers: dict[tuple[str, str, str], list[Sample]] = field(default_factory=dict)  # (cipher, dir, mode)
    latency: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # LOGINS kind -> mode -> s
    wake: list[float] = field(default_factory=list)
    loadavg: list[tuple[float, float, float]] = field(default_factory=list)


def transfer(ways: Ways, gw: Gateway, work: Path, src: Path, mode: str, cipher: str, direction: str,
             check: bool, timeout: float, bastion: Bastion | None = None) -> Sample:
    """One scp, checked; its wall time and the CPU each party spent on it."""
    opts, host = ways.opts(mode, cipher)
    local_dst = work / f"down-{mode}.bin"
    remote_dst = work / f"up-{mode}.bin"
    if direction == "upload":
        argv = ["scp", "-q", *SCP_OPTS, *opts, str(src), f"{host}:{remote_dst}"]
        produced = remote_dst  # the machine is a local sshd: its files are ours to check
    else:
        argv = ["scp", "-q", *SCP_OPTS, *opts, f"{host}:{src}", str(local_dst)]
        produced = local_dst
    middle = bastion if mode == "bastion" else None
    machine0, sessions = gw.machine_cpu_seconds("alice")
    bastion0, bastion_sessions = middle.cpu_seconds() if middle else (0.0, set())
    cpu0, client0 = gw.cpu_seconds(), _children_cpu()
    seconds = run(argv, timeout)
    cpu, client = gw.cpu_seconds() - cpu0, _children_cpu() - client0
    machine = gw.machine_cpu_seconds("alice", sessions)[0] - machine0
    if middle:
        cpu = middle.cpu_seconds(bastion_sessions)[0] - bastion0
    ok = same_file(src, produced) if check else produced.stat().st_size == src.stat().st_size
    produced.unlink()
    if not ok:
        raise RuntimeError(f"{direction} via {mode} ({cipher}) produced a different file")
    return Sample(seconds, cpu, client, machine)


def measure(args: argparse.Namespace) -> tuple[Results, dict[str, Any]]:
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK) else None
    work = Path(tempfile.mkdtemp(prefix="fleetgate-bench-", dir=base))
    res = Results(size=args.size)
    gw: Gateway | None = None
    bastion: Bastion | None = None
    try:
        state = work / "state"
        state.mkdir()
        print(f"bench: work dir {work} (tmpfs: {base is not None}); writing a {human_size(args.size)} random file",
              file=sys.stderr)
        src = work / "src.bin"
        make_file(src, args.size)
        gw = Gateway(state, args.set, args.gateway_log, args.gateway_script)
        print(f"bench: gateway pid {gw.pid} on 127.0.0.1:{gw.port}, fleetgate from {gw.package}", file=sys.stderr)
        if "bastion" in args.modes:
            bastion = Bastion(work, state / "client_key.pub", state / "known_hosts")
            print(f"bench: bastion sshd pid {bastion.pid} on 127.0.0.1:{bastion.port}", file=sys.stderr)
        ways = Ways(state, gw.port, gw.machines["alice"], getpass.getuser(), bastion.port if bastion else None)
        timeout = max(120.0, args.size / MIB)  # a floor of 1 MiB/s: anything slower is broken
        # Wake the machine (first login through the gateway), and warm every way in once.
        for mode in sorted(args.modes, key=lambda m: m != "relay"):  # relay first: it wakes alice
            opts, host = ways.opts(mode, "default")
            run(["ssh", *opts, host, "true"], 120)
        res.loadavg.append(os.getloadavg())

        for rnd in range(args.repeat):
            for cipher in args.ciphers:
                for direction in ("upload", "download"):
                    for mode in args.modes:
                        s = transfer(ways, gw, work, src, mode, cipher, direction, check=rnd == 0,
                                     timeout=timeout, bastion=bastion)
                        res.transfers.setdefault((cipher, direction, mode), []).append(s)
                        print(f"bench: round {rnd + 1}/{args.repeat} {cipher:>10} {direction:>8} {mode:>6}: "
                              f"{args.size / MIB / s.seconds:7.1f} MiB/s  CPU s: client {s.client_cpu:5.2f} "
                              f"{'bastion' if mode == 'bastion' else 'gateway'} {s.gateway_cpu:5.2f} "
                              f"sshd {s.machine_cpu:5.2f}",
                              file=sys.stderr)
        res.loadavg.append(os.getloadavg())

        batch = work / "sftp-batch"
        batch.write_text("pwd\n")
        for i in range(args.latency_runs):
            for kind in LOGINS:
                for mode in args.modes:
                    res.latency.setdefault(kind, {}).setdefault(mode, []).append(
                        run(ways.login(mode, kind, batch), 60))
        for kind, by_mode in res.latency.items():
            print(f"bench: latency {kind}: " + ", ".join(f"{m} {statistics.median(v) * 1000:.0f} ms"
                                                        for m, v in by_mode.items()), file=sys.stderr)

        for i in range(args.wake_runs):
            gw.stop_machine("alice")
            opts, host = ways.opts("relay", "default")
            res.wake.append(run(["ssh", *opts, host, "true"], 120))
        if res.wake:
            print(f"bench: wake-up {statistics.median(res.wake):.2f} s median", file=sys.stderr)
        res.loadavg.append(os.getloadavg())
        info = {"package": gw.package, "gateway_sets": list(args.set)}
        return res, info
    except BaseException:
        if gw is not None:  # the work dir goes away below: show why the gateway misbehaved
            gw.log.flush()
            tail = Path(gw.log.name).read_text(errors="replace")[-4000:]
            print(f"bench: failed; gateway log tail:\n{tail}", file=sys.stderr)
        if bastion is not None:
            bastion.log.flush()
            tail = (bastion.dir / "sshd.log").read_text(errors="replace")[-2000:]
            print(f"bench: bastion sshd log tail:\n{tail}", file=sys.stderr)
        raise
    finally:
        if bastion is not None:
            bastion.close()
        if gw is not None:
            gw.close()
        shutil.rmtree(work, ignore_errors=True)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def report(res: Results, args: argparse.Namespace, info: dict[str, Any], command: str) -> str:
    """The markdown section for docs/benchmarks.md: setting, command, every round, ratios, targets."""
    mib = res.size / MIB
    gib = res.size / (1024 * MIB)
    out = []
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out.append(f"Run {when} on {platform.node() or 'this machine'}: {os.cpu_count()} cores, "
               f"{platform.python_implementation()} {platform.python_version()}, "
               f"{_version(['ssh', '-V'])}, asyncssh {_asyncssh_version()}.")
    out.append("Load average (1 min) before/after transfers/at end: "
               + " / ".join(f"{l[0]:.2f}" for l in res.loadavg) + ".")
    out.append("")
    out.append("Command:")
    out.append("")
    out.append("```")
    out.append(command)
    out.append("```")
    out.append("")
    if info["gateway_sets"]:
        out.append("Gateway config changes: " + ", ".join(f"`{s}`" for s in info["gateway_sets"]) + ".")
        out.append("")
    proto = "legacy scp protocol (`scp -O`)" if SCP_OPTS else "scp's default SFTP protocol"
    out.append(f"scp of {human_size(res.size)} ({proto}), tmpfs to tmpfs, {args.repeat} round(s); MiB/s is the median; "
               "the ratio is the median over rounds of (mode ÷ direct in the same round); "
               "CPU is seconds per GiB (median) of the client (scp and its ssh processes), the party in the middle "
               "(the gateway process; in bastion mode the bastion's sshd, listener and sessions) and the "
               "machine's sshd; the last column is the middle party's CPU ÷ the machine sshd's, same row.")
    out.append("")
    out.append("| cipher | direction | mode | MiB/s (median) | all rounds | vs direct | "
               "CPU s/GiB client | gateway/bastion | sshd | gateway ÷ sshd CPU |")
    out.append("| --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for cipher in args.ciphers:
        for direction in ("upload", "download"):
            for mode in args.modes:
                ss = res.transfers[(cipher, direction, mode)]
                rates = [mib / s.seconds for s in ss]
                ratio = paired_ratio(res, cipher, direction, mode, "direct")
                cpu = [statistics.median(getattr(s, k) for s in ss) / gib
                       for k in ("client_cpu", "gateway_cpu", "machine_cpu")]
                cpu_ratio = cpu_vs_sshd(res, cipher, direction, mode)
                out.append(f"| {cipher} | {direction} | {mode} | {statistics.median(rates):.0f} | "
                           f"{', '.join(f'{r:.0f}' for r in rates)} | "
                           f"{'—' if ratio is None else f'{ratio * 100:.0f} %'} | "
                           + " | ".join(f"{c:.2f}" for c in cpu)
                           + f" | {'—' if cpu_ratio is None else f'{cpu_ratio:.2f}×'} |")
    out.append("")
    out.extend(transfer_targets(res, args))
    if res.latency:
        out.append(f"Login latency, {args.latency_runs} runs per row, all rows interleaved; Δ is the difference to "
                   f"direct with the same login (target for relay: ≤ +{TARGET_LATENCY_P50_MS:.0f} ms median, "
                   f"≤ +{TARGET_LATENCY_P90_MS:.0f} ms p90):")
        out.append("")
        out.append("| login | mode | median ms | p90 ms | Δ median ms | Δ p90 ms | vs direct (median) | target |")
        out.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
        for kind, by_mode in res.latency.items():
            base = by_mode.get("direct")
            for mode, v in by_mode.items():
                med, p90 = statistics.median(v), pct(v, 0.9)
                d50 = d90 = ratio = target = "—"
                if base and mode != "direct":
                    dm, dp = (med - statistics.median(base)) * 1000, (p90 - pct(base, 0.9)) * 1000
                    d50, d90, ratio = f"{dm:+.0f}", f"{dp:+.0f}", f"{med / statistics.median(base):.2f}×"
                    if mode == "relay":
                        target = _met(dm <= TARGET_LATENCY_P50_MS and dp <= TARGET_LATENCY_P90_MS)
                out.append(f"| {LOGINS[kind]} | {mode} | {med * 1000:.0f} | {p90 * 1000:.0f} | {d50} | {d90} | "
                           f"{ratio} | {target} |")
        out.append("")
    if res.wake:
        out.append(f"Wake-up latency (machine stopped → `ssh alice@gateway true` returns; process backend, "
                   f"{len(res.wake)} runs): median {statistics.median(res.wake) * 1000:.0f} ms, "
                   f"p90 {pct(res.wake, 0.9) * 1000:.0f} ms.")
        out.append("")
    return "\n".join(out)


def paired_ratio(res: Results, cipher: str, direction: str, mode: str, base: str) -> float | None:
    """Throughput of `mode` ÷ that of `base`: the median over rounds of the ratio within a round.

    Within a round, because the load from other work on the machine changes from one minute
    to the next, and the modes of one round run back to back.
    """
    a, b = res.transfers.get((cipher, direction, mode)), res.transfers.get((cipher, direction, base))
    if not a or not b or mode == base:
        return None
    return statistics.median(y.seconds / x.seconds for x, y in zip(a, b))


def cpu_vs_sshd(res: Results, cipher: str, direction: str, mode: str) -> float | None:
    """The middle party's CPU per byte ÷ the machine sshd's, medians of the same row (none for direct)."""
    ss = res.transfers.get((cipher, direction, mode))
    if not ss or mode == "direct":
        return None
    sshd = statistics.median(s.machine_cpu for s in ss)
    return statistics.median(s.gateway_cpu for s in ss) / sshd if sshd > 0 else None


def _met(ok: bool) -> str:
    return "met" if ok else "**unmet**"


def transfer_targets(res: Results, args: argparse.Namespace) -> list[str]:
    """Issue 15's throughput and CPU targets, each with the measured values and met/unmet."""
    rows = [(c, d) for c in ("aes128-gcm", "default") if c in args.ciphers for d in ("upload", "download")]
    lines: list[str] = []

    def line(title: str, items: list[tuple[str, float | None, bool]]) -> None:
        known = [(label, ok) for label, value, ok in items if value is not None]
        if not known:
            return
        verdict = _met(all(ok for _, ok in known))
        lines.append(f"- {title}: {verdict} — " + ", ".join(label for label, _ in known) + ".")

    if "relay" in args.modes:
        items = []
        for c, d in rows:
            r = paired_ratio(res, c, d, "relay", "direct")
            ok = r is not None and r >= TARGET_RELAY_RATIO
            items.append((f"{c} {d} {r * 100:.0f} %" if r is not None else "", r, ok))
        ciphers = " and ".join(c for c in ("aes128-gcm", "default") if c in args.ciphers)
        line(f"relay ≥ {TARGET_RELAY_RATIO * 100:.0f} % of direct, both ways, {ciphers}", items)
    if "jump" in args.modes:
        items = []
        for c, d in rows:
            r = paired_ratio(res, c, d, "jump", "direct")
            vb = paired_ratio(res, c, d, "jump", "bastion") if "bastion" in args.modes else None
            ok = r is not None and r >= TARGET_RELAY_RATIO and (vb is None or vb >= 1.0)
            label = f"{c} {d} {r * 100:.0f} % of direct" if r is not None else ""
            if vb is not None:
                label += f" and {vb * 100:.0f} % of bastion"
            items.append((label, r, ok))
        title = f"jump ≥ {TARGET_RELAY_RATIO * 100:.0f} % of direct" + (
            " and ≥ bastion (same round)" if "bastion" in args.modes else " (no bastion run)")
        line(title, items)
    for mode in ("relay", "jump"):
        if mode in args.modes:
            items = []
            for c, d in rows:
                r = cpu_vs_sshd(res, c, d, mode)
                items.append((f"{c} {d} {r:.2f}×" if r is not None else "", r,
                              r is not None and r <= TARGET_CPU_RATIO))
            line(f"gateway CPU ≤ {TARGET_CPU_RATIO:.1f}× the machine sshd's, {mode} mode", items)
    if lines:
        lines = ["Targets (issue 15):", "", *lines, ""]
    return lines


def _version(argv: list[str]) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (p.stderr or p.stdout).strip().split(",")[0]
    except OSError:
        return "?"


def _asyncssh_version() -> str:
    try:
        import asyncssh

        return asyncssh.__version__
    except ImportError:
        return "?"


def write_docs(path: Path, section: str, begin: str = DOCS_BEGIN, end: str = DOCS_END, heading: str = "") -> None:
    """Replace the text between a benchmark's markers (or append the block, under `heading`
    if given): the rest of the file is people's. Every bench/ script writes its section here."""
    block = f"{begin}\n{section.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if begin in text and end in text:
        head, _, rest = text.partition(begin)
        _, _, tail = rest.partition(end)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + (f"{heading}\n\n" if heading else "") + block + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=parse_size, default=1024 * MIB, help="file size, e.g. 64MiB (default 1GiB)")
    p.add_argument("--repeat", type=int, default=3, help="rounds of transfers (default 3)")
    p.add_argument("--latency-runs", type=int, default=20)
    p.add_argument("--wake-runs", type=int, default=5)
    p.add_argument("--modes", default=",".join(MODES), type=lambda s: s.split(","),
                   help="comma-separated subset of direct,relay,jump,bastion (direct is always run)")
    p.add_argument("--ciphers", default=",".join(CIPHERS), type=lambda s: s.split(","),
                   help="comma-separated subset of default,aes128-gcm")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="gateway config change, e.g. --set gateway.window=16777216")
    p.add_argument("--legacy-scp", action="store_true",
                   help="scp -O: the streaming scp protocol instead of SFTP (default: scp's own default, SFTP)")
    p.add_argument("--docs", type=Path, default=None,
                   help="write the results into this markdown file (default: docs/benchmarks.md for a 1 GiB run)")
    p.add_argument("--no-docs", action="store_true")
    p.add_argument("--json", type=Path, help="also write raw results as JSON")
    p.add_argument("--gateway-log", type=Path, help="keep the gateway's stderr in this file")
    p.add_argument("--gateway-script", type=Path,
                   help="experiments: another gateway runner speaking bench/gateway.py's stdin/stdout protocol")
    args = p.parse_args(argv)
    for m in args.modes:
        if m not in MODES:
            p.error(f"--modes: unknown mode {m!r}")
    for c in args.ciphers:
        if c not in CIPHERS:
            p.error(f"--ciphers: unknown cipher set {c!r}")
    if "direct" not in args.modes:
        args.modes.insert(0, "direct")  # every ratio needs its baseline from the same run

    if args.legacy_scp:
        SCP_OPTS.append("-O")
    command = os.environ.get("FLEETGATE_BENCH_COMMAND") or shlex.join(["python", "bench/relay.py", *(argv or sys.argv[1:])])
    res, info = measure(args)
    section = report(res, args, info, command)
    print(section)
    docs = None if args.no_docs else (args.docs or (REPO / "docs" / "benchmarks.md" if args.size == 1024 * MIB else None))
    if docs is not None:
        write_docs(docs, section)
        print(f"bench: results written to {docs}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({
            "size": res.size,
            "transfers": [{"cipher": c, "direction": d, "mode": m, "seconds": [s.seconds for s in ss],
                           "gateway_cpu": [s.gateway_cpu for s in ss], "client_cpu": [s.client_cpu for s in ss],
                           "machine_cpu": [s.machine_cpu for s in ss]} for (c, d, m), ss in res.transfers.items()],
            "latency": res.latency, "latency_logins": LOGINS, "wake": res.wake, "loadavg": res.loadavg, **info,
        }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

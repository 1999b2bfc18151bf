"""Passthrough benchmark: scp through a machine's `passthrough_listen` port vs straight to its sshd.

The passthrough never terminates SSH, so the gateway's whole job is to move ciphertext
between two sockets; anything short of direct speed, and any CPU beyond a small fraction
of a core, is the relay's own cost. One run starts two gateways (bench/gateway.py, each
in its own process on its own demo fleet, `passthrough_listen` set for `alice`):

  splice   the zero-copy relay (fleetgate/splice.py: splice(2) through a pipe), the default
  copy     the same gateway with FLEETGATE_PASSTHROUGH_COPY=1: the copy through Python
           (receive_some / send_all of 256 KiB), the relay before issue 15
  direct   scp straight to the machine's sshd: the baseline

and runs real scp up and down, tmpfs to tmpfs, with the client's default cipher and with
aes128-gcm@openssh.com, interleaved round by round; each ratio is taken against the direct
run of the same round. CPU is per party, from /proc: the gateway process (the relay's own
cost), the client (scp and its ssh) and the machine's sshd.

Usage: .venv/bin/python bench/passthrough.py [--size 1GiB] [--repeat 3] [--write-docs]
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import json
import os
import platform
import shlex
import shutil
import socket
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from relay import (MIB, Gateway, _children_cpu, _version, human_size, make_file,  # noqa: E402
                   parse_size, run, same_file, write_docs as write_section)

MODES = ("direct", "splice", "copy")
CIPHERS = {"default": [], "aes128-gcm": ["-c", "aes128-gcm@openssh.com"]}
COPY_ENV = "FLEETGATE_PASSTHROUGH_COPY"
DOCS_BEGIN = "<!-- bench:passthrough:begin -->"
DOCS_END = "<!-- bench:passthrough:end -->"


def free_port() -> int:
    """A loopback port for passthrough_listen (bench/gateway.py reports only the SSH port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Side:
    """One gateway and how scp reaches its machine alice: through the passthrough port or directly."""

    name: str
    gw: Gateway
    passthrough_port: int

    def opts(self, mode: str, cipher: str) -> tuple[list[str], str]:
        d = self.gw.state_dir
        port = self.gw.machines["alice"] if mode == "direct" else self.passthrough_port
        # The session is end to end with alice's sshd in both cases: its host key, its user.
        return ["-F", "/dev/null", "-i", str(d / "client_key"), "-o", f"UserKnownHostsFile={d / 'known_hosts'}",
                "-o", "HostKeyAlias=alice", "-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes",
                "-o", "BatchMode=yes", "-o", "ConnectTimeout=30", "-o", "ControlMaster=no",
                "-o", "ControlPath=none", "-o", f"Port={port}", *CIPHERS[cipher]], f"{getpass.getuser()}@127.0.0.1"


def start_side(name: str, work: Path, copy: bool, log_dir: Path | None) -> Side:
    base = work / name
    state = base / "state"
    state.mkdir(parents=True)
    port = free_port()
    sets = [f'machines.alice.passthrough_listen="127.0.0.1:{port}"',
            "passthrough.per_source_per_minute=100000"]   # the bench opens many connections a minute
    saved = os.environ.pop(COPY_ENV, None)
    if copy:
        os.environ[COPY_ENV] = "1"
    try:
        gw = Gateway(state, sets, (log_dir / f"gateway-{name}.log") if log_dir else None)
    finally:
        os.environ.pop(COPY_ENV, None)
        if saved is not None:
            os.environ[COPY_ENV] = saved
    return Side(name, gw, port)


@dataclass
class Sample:
    seconds: float
    gateway_cpu: float
    client_cpu: float
    machine_cpu: float


@dataclass
class Results:
    size: int
    transfers: dict[tuple[str, str, str], list[Sample]] = field(default_factory=dict)  # (cipher, direction, mode)
    loadavg: list[tuple[float, float, float]] = field(default_factory=list)
    relayed_by: dict[str, str] = field(default_factory=dict)


def transfer(side: Side, mode: str, cipher: str, direction: str, work: Path, src: Path, check: bool,
             timeout: float) -> Sample:
    opts, host = side.opts(mode, cipher)
    if direction == "upload":
        produced = work / f"up-{mode}.bin"     # the machine is a local sshd: its files are ours to check
        argv = ["scp", "-q", *opts, str(src), f"{host}:{produced}"]
    else:
        produced = work / f"down-{mode}.bin"
        argv = ["scp", "-q", *opts, f"{host}:{src}", str(produced)]
    gw = side.gw
    machine0, sessions = gw.machine_cpu_seconds("alice")
    cpu0, client0 = gw.cpu_seconds(), _children_cpu()
    seconds = run(argv, timeout)
    cpu, client = gw.cpu_seconds() - cpu0, _children_cpu() - client0
    machine = gw.machine_cpu_seconds("alice", sessions)[0] - machine0
    ok = same_file(src, produced) if check else produced.stat().st_size == src.stat().st_size
    produced.unlink()
    if not ok:
        raise RuntimeError(f"{direction} via {mode} ({cipher}) produced a different file")
    return Sample(seconds, cpu, client, machine)


def measure(args: argparse.Namespace) -> Results:
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK) else None
    work = Path(tempfile.mkdtemp(prefix="fleetgate-bench-pt-", dir=shm))
    res = Results(size=args.size)
    sides: dict[str, Side] = {}
    try:
        print(f"bench: work dir {work} (tmpfs: {shm is not None}); writing a {human_size(args.size)} random file",
              file=sys.stderr)
        src = work / "src.bin"
        make_file(src, args.size)
        sides["splice"] = start_side("splice", work, copy=False, log_dir=args.gateway_logs)
        if "copy" in args.modes:
            sides["copy"] = start_side("copy", work, copy=True, log_dir=args.gateway_logs)
        sides["direct"] = sides["splice"]   # the baseline is the splice gateway's alice, its sshd as is
        timeout = max(120.0, args.size / MIB)
        for name in ("splice", "copy"):
            if name not in sides:
                continue
            side = sides[name]
            opts, host = side.opts(name, "default")
            run(["ssh", *opts, host, "true"], 120)   # wakes alice through the passthrough port
            side.gw.log.flush()
            line = next((l for l in Path(side.gw.log.name).read_text().splitlines() if "bytes relayed by" in l), "")
            res.relayed_by[name] = line.rpartition("bytes relayed by ")[2].rstrip(")") or "?"
            print(f"bench: {name} gateway pid {side.gw.pid}, passthrough 127.0.0.1:{side.passthrough_port}, "
                  f"relays by {res.relayed_by[name]}", file=sys.stderr)
        if "copy" in sides and "splice(2)" in res.relayed_by.get("copy", ""):
            raise RuntimeError(f"the copy gateway splices: {COPY_ENV} did not reach it")
        opts, host = sides["direct"].opts("direct", "default")
        run(["ssh", *opts, host, "true"], 120)
        res.loadavg.append(os.getloadavg())
        for rnd in range(args.repeat):
            for cipher in args.ciphers:
                for direction in ("upload", "download"):
                    for mode in args.modes:
                        s = transfer(sides[mode], mode, cipher, direction, work, src, check=rnd == 0,
                                     timeout=timeout)
                        res.transfers.setdefault((cipher, direction, mode), []).append(s)
                        print(f"bench: round {rnd + 1}/{args.repeat} {cipher:>10} {direction:>8} {mode:>6}: "
                              f"{args.size / MIB / s.seconds:7.1f} MiB/s  CPU s: client {s.client_cpu:5.2f} "
                              f"gateway {s.gateway_cpu:5.2f} sshd {s.machine_cpu:5.2f}", file=sys.stderr)
        res.loadavg.append(os.getloadavg())
        return res
    except BaseException:
        for side in {id(s): s for s in sides.values()}.values():
            side.gw.log.flush()
            tail = Path(side.gw.log.name).read_text(errors="replace")[-3000:]
            print(f"bench: failed; {side.name} gateway log tail:\n{tail}", file=sys.stderr)
        raise
    finally:
        for side in {id(s): s for s in sides.values()}.values():
            side.gw.close()
        shutil.rmtree(work, ignore_errors=True)


def report(res: Results, args: argparse.Namespace, command: str) -> str:
    mib, gib = res.size / MIB, res.size / (1024 * MIB)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [f"Run {when} on {platform.node() or 'this machine'}: {os.cpu_count()} cores, Linux "
           f"{platform.release()}, {platform.python_implementation()} {platform.python_version()}, "
           f"{_version(['ssh', '-V'])}.",
           "Load average (1 min) before/after the transfers: "
           + " / ".join(f"{l[0]:.2f}" for l in res.loadavg) + ".",
           "", "Command:", "", "```", command, "```", "",
           "Relay per gateway, as it logged it: "
           + "; ".join(f"{k}: {v}" for k, v in res.relayed_by.items()) + ".", "",
           f"scp of {human_size(res.size)} (scp's default SFTP protocol), tmpfs to tmpfs, {args.repeat} round(s), "
           "modes interleaved within each round; MiB/s is the median; \"vs direct\" is the median over rounds of "
           "(direct time ÷ mode time) in the same round; CPU is seconds per GiB (median) of the gateway "
           "process, the client (scp and its ssh) and the machine's sshd.", "",
           "| cipher | direction | mode | MiB/s (median) | all rounds | vs direct | CPU s/GiB gateway | client | sshd |",
           "| --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for cipher in args.ciphers:
        for direction in ("upload", "download"):
            direct = res.transfers.get((cipher, direction, "direct"))
            for mode in args.modes:
                ss = res.transfers[(cipher, direction, mode)]
                rates = [mib / s.seconds for s in ss]
                ratio = "—"
                if direct and mode != "direct":
                    ratio = f"{statistics.median(d.seconds / s.seconds for d, s in zip(direct, ss)) * 100:.0f} %"
                cpu = [statistics.median(getattr(s, k) for s in ss) / gib
                       for k in ("gateway_cpu", "client_cpu", "machine_cpu")]
                out.append(f"| {cipher} | {direction} | {mode} | {statistics.median(rates):.0f} | "
                           f"{', '.join(f'{r:.0f}' for r in rates)} | {ratio} | "
                           + " | ".join(f"{c:.2f}" for c in cpu) + " |")
    out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=parse_size, default=1024 * MIB, help="file size, e.g. 256MiB (default 1GiB)")
    p.add_argument("--repeat", type=int, default=3, help="rounds (default 3)")
    p.add_argument("--modes", default=",".join(MODES), type=lambda s: s.split(","),
                   help="comma-separated subset of direct,splice,copy (direct is always run)")
    p.add_argument("--ciphers", default=",".join(CIPHERS), type=lambda s: s.split(","),
                   help="comma-separated subset of default,aes128-gcm")
    p.add_argument("--write-docs", action="store_true",
                   help="write the results between the bench:passthrough markers in --docs")
    p.add_argument("--docs", type=Path, default=REPO / "docs" / "benchmarks.md")
    p.add_argument("--json", type=Path, help="also write raw results as JSON")
    p.add_argument("--gateway-logs", type=Path, help="keep the gateways' stderr in this directory")
    args = p.parse_args(argv)
    for m in args.modes:
        if m not in MODES:
            p.error(f"--modes: unknown mode {m!r}")
    for c in args.ciphers:
        if c not in CIPHERS:
            p.error(f"--ciphers: unknown cipher set {c!r}")
    if "direct" not in args.modes:
        args.modes.insert(0, "direct")
    if args.gateway_logs:
        args.gateway_logs.mkdir(parents=True, exist_ok=True)
    command = shlex.join([".venv/bin/python", "bench/passthrough.py", *(argv if argv is not None else sys.argv[1:])])
    res = measure(args)
    section = report(res, args, command)
    print(section)
    if args.write_docs:
        write_section(args.docs, section, DOCS_BEGIN, DOCS_END)
        print(f"bench: results written to {args.docs}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({
            "size": res.size, "relayed_by": res.relayed_by, "loadavg": res.loadavg,
            "transfers": [{"cipher": c, "direction": d, "mode": m, "seconds": [s.seconds for s in ss],
                           "gateway_cpu": [s.gateway_cpu for s in ss], "client_cpu": [s.client_cpu for s in ss],
                           "machine_cpu": [s.machine_cpu for s in ss]} for (c, d, m), ss in res.transfers.items()],
        }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

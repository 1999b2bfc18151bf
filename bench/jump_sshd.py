"""What one login costs the machine's sshd, per gateway variant: jump-only logins and plain ones.

Why: a jump (`ssh -J alice@gateway alice@vm`, i.e. `-W vm:22`) is end to end; the gateway
only splices bytes. If the gateway also logs in to the machine itself at the user's
authentication (its upstream login, needed for sessions, -L, -R), every jump-only login
makes the machine's sshd do two SSH handshakes and keep an idle login: twice the work of
a direct login. This counts that work, and the latency a lazier upstream may add to a
plain `ssh alice@gateway true`.

For each variant (as bench/compare.py: NAME;env K=V;set K=V) it starts bench/gateway.py
with a metrics listener, wakes the machine, then, interleaved round by round:

  jump    `ssh -o ProxyCommand='ssh -W %h:%p alice@gateway' user@alice true`
  plain   `ssh alice@gateway true`
  direct  `ssh user@machine true` (the baseline: one login, straight to sshd)

and reports per login: the machine sshd's CPU (its own and its reaped children's, from
/proc), the gateway's upstream SSH logins (fleetgate_upstream_handshake_seconds_count)
and the machine's SSH connections (direct logins + jumps + upstream logins), and the
wall time of each kind (median, p90).

Example:
    .venv/bin/python bench/jump_sshd.py --logins 30 \\
        --variant 'before;env PYTHONPATH=/tmp/fg-jump-old' --variant after
"""

from __future__ import annotations

import argparse
import getpass
import shlex
import shutil
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import Variant, patched_env  # noqa: E402
from relay import Gateway, Ways, _proc_cpu, pct, run  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(port: int, name: str) -> float:
    """One unlabelled sample from the gateway's /metrics (0 if absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{}"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


class Machine:
    """The demo machine `alice`'s sshd: CPU seconds so far, counting only reaped children."""

    def __init__(self, gw: Gateway):
        self.pid = int((gw.state_dir / "state" / "process" / "alice" / "sshd.pid").read_text())
        self.children = Path(f"/proc/{self.pid}/task/{self.pid}/children")

    def settled_cpu(self, timeout: float = 10.0) -> float:
        """sshd's CPU once every session child has exited and been reaped (bounded wait)."""
        deadline = time.monotonic() + timeout
        while self.children.read_text().split() and time.monotonic() < deadline:
            time.sleep(0.01)
        return _proc_cpu(self.pid, children=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--logins", type=int, default=30, help="logins of each kind per variant")
    p.add_argument("--variant", action="append", required=True, type=Variant.parse)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fleetgate-jump-sshd-"))
    gws: dict[str, tuple[Gateway, Ways, int, Machine]] = {}
    kinds = ("jump", "plain", "direct")
    # (variant, kind) -> list of (seconds, sshd cpu, upstream logins)
    rows: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    try:
        for v in args.variant:
            state = work / v.name / "state"
            state.mkdir(parents=True)
            mport = free_port()
            with patched_env(v.env):
                gw = Gateway(state, [*v.sets, f'metrics.listen="127.0.0.1:{mport}"'], work / v.name / "gateway.log",
                             v.script)
            ways = Ways(state, gw.port, gw.machines["alice"], getpass.getuser())
            opts, host = ways.opts("relay", "default")
            run(["ssh", *opts, host, "true"], 120)  # wakes this variant's machine
            gws[v.name] = (gw, ways, mport, Machine(gw))
            print(f"jump_sshd: {v.name}: gateway pid {gw.pid}, fleetgate from {gw.package}", file=sys.stderr)
        for i in range(args.logins):
            for name, (gw, ways, mport, machine) in gws.items():
                for kind in kinds:
                    if kind == "direct" and name != next(iter(gws)):
                        continue  # one baseline is enough
                    opts, host = ways.opts("relay" if kind == "plain" else kind, "default")
                    cpu0, up0 = machine.settled_cpu(), metric(mport, "fleetgate_upstream_handshake_seconds_count")
                    seconds = run(["ssh", *opts, host, "true"], 60)
                    cpu = machine.settled_cpu() - cpu0
                    ups = metric(mport, "fleetgate_upstream_handshake_seconds_count") - up0
                    rows.setdefault((name, kind), []).append((seconds, cpu, ups))
        print(f"{args.logins} logins of each kind per variant, interleaved; sshd CPU from /proc "
              f"(utime+stime+cutime+cstime of the machine's listener, children reaped), clock tick "
              f"{1000 / _clk():.0f} ms, so per-login CPU is a mean over the run.\n")
        print("| variant | login | sshd CPU ms/login (mean) | gateway upstream logins/login | "
              "sshd SSH connections/login | wall ms (median) | wall ms (p90) |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
        for (name, kind), rs in rows.items():
            cpu = sum(r[1] for r in rs) / len(rs) * 1000
            ups = sum(r[2] for r in rs) / len(rs)
            conns = ups + (1 if kind in ("jump", "direct") else 0)
            walls = [r[0] for r in rs]
            print(f"| {name} | {kind} | {cpu:.1f} | {ups:.2f} | {conns:.2f} | "
                  f"{statistics.median(walls) * 1000:.0f} | {pct(walls, 0.9) * 1000:.0f} |")
        return 0
    finally:
        for gw, *_ in gws.values():
            gw.close()
        shutil.rmtree(work, ignore_errors=True)


def _clk() -> float:
    import os

    return float(os.sysconf("SC_CLK_TCK"))


if __name__ == "__main__":
    sys.exit(main())

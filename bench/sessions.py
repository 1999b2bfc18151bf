"""Sessions benchmark: gateway memory per idle relayed session, and authenticated logins per core.

    .venv/bin/python bench/sessions.py [--sessions 1000,5000] [--login-seconds 20] [--write-docs]

Why a machine of our own here: 5 000 idle sessions on one OpenSSH sshd are 10 000 sshd
processes (several GB), which measures the machine, not the gateway. The machine is an
asyncssh server in its own process (any session it is given runs until the client closes
it; `true` exits 0 at once), reached through a command-backend machine whose start is
`true`; the gateway is the real one (bench/gateway.py --config, its own process), with
every limit raised above the load (this is a capacity measurement, not an attack).

Measured:
- memory: the gateway's RSS (VmRSS) with one warm session, then with N idle sessions open
  (each its own client connection, a shell-less `exec` that never ends, so a front
  connection, an upstream connection and a relayed channel each); per session =
  (RSS_N − RSS_1) ÷ (N − 1). N = 1 000 and 5 000 by default;
- login rate: C client tasks each loop connect → authenticate → `exec true` → exit status →
  close, for T seconds; the gateway's CPU seconds over the window (from /proc) give
  logins per gateway CPU-second, i.e. per core. The clients are asyncssh (curve25519 key
  exchange, Ed25519 user key), in their own processes.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))


from relay import write_docs as write_section  # noqa: E402

DOCS_BEGIN = "<!-- bench:sessions:begin (written by bench/sessions.py; edit outside these markers) -->"
DOCS_END = "<!-- bench:sessions:end -->"


# -- the machine: an asyncssh server in its own process -------------------------------------

async def _serve_machine(port_file: Path, host_key: Path, authorized: Path) -> None:
    import asyncssh

    class Session(asyncssh.SSHServerSession):
        def connection_made(self, chan: asyncssh.SSHServerChannel) -> None:
            self.chan = chan

        def exec_requested(self, command: str) -> bool:
            self.command = command
            return True

        def shell_requested(self) -> bool:
            self.command = ""
            return True

        def session_started(self) -> None:
            if self.command == "true":
                self.chan.exit(0)

    class Server(asyncssh.SSHServer):
        def begin_auth(self, username: str) -> bool:
            return True

        def session_requested(self) -> asyncssh.SSHServerSession:
            return Session()

    acceptor = await asyncssh.listen("127.0.0.1", 0, server_host_keys=[str(host_key)],
                                     authorized_client_keys=str(authorized), server_factory=Server,
                                     backlog=4096, keepalive_interval=0)
    port_file.write_text(str(acceptor.sockets[0].getsockname()[1]))
    await asyncio.Event().wait()


# -- the clients ---------------------------------------------------------------------------

def _client_opts(d: Path, port: int) -> dict:
    import asyncssh

    return dict(host="127.0.0.1", port=port, username="alice", client_keys=[str(d / "client_key")],
                known_hosts=None, agent_path=None, config=[], connect_timeout=60,
                kex_algs=["curve25519-sha256"]) if asyncssh else {}


async def _hold(d: Path, port: int, count: int) -> None:
    """Open `count` idle sessions, say so on stdout, hold them until stdin closes."""
    import asyncssh

    conns = []
    sem = asyncio.Semaphore(32)

    async def one() -> None:
        async with sem:
            conn = await asyncssh.connect(**_client_opts(d, port))
            await conn.create_session(asyncssh.SSHClientSession, "sleep forever")
            conns.append(conn)

    await asyncio.gather(*(one() for _ in range(count)))
    print(json.dumps({"open": len(conns)}), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    for c in conns:
        c.abort()


async def _logins(d: Path, port: int, workers: int, seconds: float) -> None:
    """Log in and run `true` in a loop from `workers` tasks; print how many succeeded."""
    import asyncssh

    done = 0
    failed = 0
    latencies: list[float] = []
    end = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done, failed
        while time.monotonic() < end:
            t0 = time.perf_counter()
            try:
                async with asyncssh.connect(**_client_opts(d, port)) as conn:
                    r = await conn.run("true")
                if r.exit_status == 0:
                    done += 1
                    latencies.append(time.perf_counter() - t0)
                else:
                    failed += 1
            except (asyncssh.Error, OSError):
                failed += 1

    await asyncio.gather(*(worker() for _ in range(workers)))
    print(json.dumps({"done": done, "failed": failed, "latencies": latencies}), flush=True)


# -- the orchestration -----------------------------------------------------------------------

def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)


def _read_json(proc: subprocess.Popen, timeout: float) -> dict:
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout):
        raise RuntimeError(f"no answer within {timeout} s")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError("client process exited")
    return json.loads(line)


def _write_keys(d: Path) -> None:
    from fleetgate.keys import ensure_key, public_line

    ensure_key(d / "gateway_host_key", "bench-gateway")
    upstream = ensure_key(d / "upstream_key", "bench-upstream")
    ensure_key(d / "client_key", "bench-client")
    ensure_key(d / "machine_host_key", "bench-machine")
    (d / "machine_authorized_keys").write_text(public_line(upstream) + "\n")


def _write_fleet(d: Path, machine_port: int) -> Path:
    from fleetgate.keys import ensure_key, public_line

    mkey = ensure_key(d / "machine_host_key")
    cfg = d / "fleetgate.toml"
    cfg.write_text(f"""
[gateway]
listen = ["127.0.0.1:0"]
host_keys = ["gateway_host_key"]
upstream_key = "upstream_key"
state_dir = "state"

[limits]
max_unauthenticated = 4000
per_source_startups = "4000:100:8000"
max_connections_per_user = 100000
exempt = ["127.0.0.0/8"]

[backends.cmd]
type = "command"
start = ["true"]

[machines.cheap]
backend = "cmd"
address = "127.0.0.1:{machine_port}"
host_key = "{public_line(mkey)}"
user = "bench"

[users.alice]
authorized_keys_file = "client_key.pub"
machines = ["cheap"]
""")
    return cfg


def measure(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="fleetgate-sessions-"))
    port_file = work / "machine_port"
    _write_keys(work)
    machine = _spawn("--serve-machine", str(port_file), str(work / "machine_host_key"),
                     str(work / "machine_authorized_keys"))
    procs: list[subprocess.Popen] = [machine]
    gw = None
    out: dict = {"memory": [], "logins": None}
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text():
            if time.monotonic() > deadline:
                raise RuntimeError("machine did not start")
            time.sleep(0.05)
        cfg = _write_fleet(work, int(port_file.read_text()))
        gw = subprocess.Popen([sys.executable, str(args.gateway_script or HERE / "gateway.py"), "--state-dir", str(work),
                               "--config", str(cfg)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(gw)
        info = _read_json(gw, 60)
        port, gw_pid = info["port"], info["pid"]
        print(f"sessions: gateway pid {gw_pid} port {port}, fleetgate from {info['fleetgate']}", file=sys.stderr)
        warm = _spawn("--hold", str(work), str(port), "1")
        procs.append(warm)
        _read_json(warm, 60)
        base = _rss_kib(gw_pid)
        for n in args.sessions:
            per_proc = 2500
            holders = [_spawn("--hold", str(work), str(port), str(min(per_proc, n - i)))
                       for i in range(0, n - 1, per_proc)]
            procs.extend(holders)
            t0 = time.monotonic()
            opened = sum(_read_json(h, 600)["open"] for h in holders)
            seconds = time.monotonic() - t0
            time.sleep(2)  # let the last relays settle (nothing to await across processes)
            rss = _rss_kib(gw_pid)
            per = (rss - base) / max(1, opened)
            out["memory"].append({"sessions": opened + 1, "rss_kib": rss, "base_kib": base,
                                  "per_session_kib": per, "open_seconds": seconds})
            print(f"sessions: {opened + 1} idle sessions: RSS {rss / 1024:.0f} MiB, "
                  f"{per:.1f} KiB per session (opened in {seconds:.1f} s)", file=sys.stderr)
            for h in holders:
                h.stdin.close()
                h.wait(120)
                procs.remove(h)
        cpu0, t0 = _cpu(gw_pid), time.monotonic()
        runners = [_spawn("--logins", str(work), str(port), str(args.workers), str(args.login_seconds))
                   for _ in range(args.client_procs)]
        procs.extend(runners)
        results = [_read_json(r, args.login_seconds + 120) for r in runners]
        cpu, wall = _cpu(gw_pid) - cpu0, time.monotonic() - t0
        done = sum(r["done"] for r in results)
        lat = sorted(x for r in results for x in r["latencies"])
        out["logins"] = {"done": done, "failed": sum(r["failed"] for r in results), "gateway_cpu": cpu,
                         "wall": wall, "per_cpu_second": done / cpu if cpu else 0.0, "per_second": done / wall,
                         "latency_p50": statistics.median(lat) if lat else 0.0,
                         "latency_p90": lat[int(0.9 * (len(lat) - 1))] if lat else 0.0,
                         "workers": args.workers * args.client_procs}
        print(f"sessions: {done} logins in {wall:.1f} s ({done / wall:.0f}/s), gateway CPU {cpu:.1f} s → "
              f"{out['logins']['per_cpu_second']:.0f} logins per gateway CPU-second", file=sys.stderr)
        return out
    finally:
        if gw is not None and gw.poll() is None:
            gw.stdin.close()  # EOF: the gateway shuts down
            try:
                gw.wait(60)
            except subprocess.TimeoutExpired:
                pass
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)


def report(res: dict, command: str) -> str:
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"Run {when} on {platform.node() or 'this machine'}: {os.cpu_count()} cores, "
             f"{platform.python_implementation()} {platform.python_version()}.", "", "Command:", "", "```", command,
             "```", "",
             "Idle relayed sessions (one client connection, one upstream connection and one relayed "
             "channel each; target ≤ 40 KiB per session at 5 000):", "",
             "| sessions | gateway RSS MiB | RSS with 1 session MiB | KiB per session | time to open s |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    for m in res["memory"]:
        lines.append(f"| {m['sessions']} | {m['rss_kib'] / 1024:.0f} | {m['base_kib'] / 1024:.0f} | "
                     f"{m['per_session_kib']:.1f} | {m['open_seconds']:.1f} |")
    lg = res["logins"]
    if lg:
        lines += ["", f"Logins (connect, authenticate, `exec true`, exit status, close) from {lg['workers']} "
                  "concurrent asyncssh clients; target ≥ 200 per gateway core:", "",
                  "| logins | failed | seconds | logins/s | gateway CPU s | logins per gateway CPU-second | "
                  "login p50 ms | p90 ms |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
                  f"| {lg['done']} | {lg['failed']} | {lg['wall']:.1f} | {lg['per_second']:.0f} | "
                  f"{lg['gateway_cpu']:.1f} | {lg['per_cpu_second']:.0f} | {lg['latency_p50'] * 1000:.0f} | "
                  f"{lg['latency_p90'] * 1000:.0f} |"]
    return "\n".join(lines) + "\n"


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-machine":
        asyncio.run(_serve_machine(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--hold":
        asyncio.run(_hold(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--logins":
        asyncio.run(_logins(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", default="1000,5000", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--login-seconds", type=float, default=20.0)
    p.add_argument("--workers", type=int, default=8, help="concurrent logins per client process")
    p.add_argument("--client-procs", type=int, default=2)
    p.add_argument("--gateway-script", type=Path,
                   help="experiments: another runner speaking bench/gateway.py's protocol (e.g. under tracemalloc)")
    p.add_argument("--write-docs", action="store_true", help="write the results into docs/benchmarks.md")
    args = p.parse_args()
    command = " ".join([".venv/bin/python", "bench/sessions.py", *sys.argv[1:]])
    res = measure(args)
    section = report(res, command)
    print(section)
    if args.write_docs:
        write_section(REPO / "docs" / "benchmarks.md", section, DOCS_BEGIN, DOCS_END,
                      heading="## Sessions: memory per idle session, logins per core")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Scale benchmark: one gateway with N machines (default 10 000), and what N costs when nothing happens.

Why: issue 15. With 10 000 machines a /metrics scrape took 767 ms of the event loop (logins
and /healthz waited behind it), an idle gateway used 7 % of a core, and a status command per
machine kept half a core busy. This runs the real App in its own process (like
bench/gateway.py, so the gateway's CPU is its own) over a generated config and records:

  start       process start → listeners up (config parse, the first reconcile of every machine)
  RSS         the gateway's resident memory once up
  /metrics    scrape time (median, p90 over --scrapes), body size, series count
  /healthz    latency idle, and during back-to-back scrapes
  login       `ssh alice@gateway true` (a real OpenSSH login to the demo machine alice,
              already running) idle, and during back-to-back scrapes
  idle CPU    the gateway process's CPU over --idle-seconds with nothing happening
  polling     variant "command": every machine on a command backend whose status is a tiny
              shell command (`echo stopped`); the gateway's CPU (and its children's, the
              commands) over --poll-seconds, with /healthz and login latency meanwhile;
              variant "command_all": the same machines answered by one `status_all`
              command per pass

Variant "process": N process-backend machines that are never started, plus alice.

    .venv/bin/python bench/scale.py --machines 10000 [--write-docs]

`--write-docs` replaces the section between the bench:scale markers in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from relay import GATEWAY_ALIAS, Ways, run as run_ssh, write_docs as write_section  # noqa: E402

DOCS_BEGIN = "<!-- bench:scale:begin (written by bench/scale.py; edit outside these markers) -->"
DOCS_END = "<!-- bench:scale:end -->"
VARIANTS = ("process", "command", "command_all")


# -- the gateway side (a subprocess: `scale.py --serve STATE_DIR`) -----------------------------

def serve(state_dir: Path) -> None:
    """Run the App on STATE_DIR/fleetgate.toml; print one JSON line when up; stop on EOF on stdin."""
    import logging

    import trio

    from fleetgate import config as config_mod
    from fleetgate.app import App

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    async def main() -> None:
        cfg = config_mod.load(state_dir / "fleetgate.toml")
        app = App(cfg, stop_machines_on_exit=True)
        async with trio.open_nursery() as nursery:
            running = await nursery.start(app.run)
            print(json.dumps({"port": running.ssh_ports[0], "metrics_port": running.metrics_port,
                              "pid": os.getpid()}), flush=True)
            stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
            while await stdin.receive_some(4096):
                pass
            # Only alice was started; stop_all would walk every machine for nothing.
            with trio.move_on_after(30):
                await running.fleet.stop("alice")
            running.shutdown.set()

    trio.run(main)


# -- config ------------------------------------------------------------------------------------

def write_config(state_dir: Path, machines: int, variant: str) -> Path:
    """The demo config (alice and bob, process backend, no isolation) plus `machines` more."""
    from fleetgate import demo

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    cfg = demo.prepare(state_dir, 0, 0, isolation="none")
    doc = tomllib.loads(cfg.read_text())
    alice = doc["machines"]["alice"]
    host_key = alice["host_key"]
    user = alice["user"]
    parts = [cfg.read_text()]
    if variant == "command":
        parts.append('\n[backends.cmd]\ntype = "command"\nshell = true\nstart = "echo 127.0.0.1:1"\n'
                     'stop = "true"\nstatus = "echo stopped"\n')
    elif variant == "command_all":  # one command answers for every machine (needs status_all: issue 15)
        parts.append('\n[backends.cmd]\ntype = "command"\nshell = true\nstart = "echo 127.0.0.1:1"\n'
                     f'stop = "true"\nstatus_all = "seq -f \'m%05g stopped\' 0 {machines - 1}"\n')
    for i in range(machines):
        if variant == "process":
            parts.append(f'\n[machines.m{i:05d}]\nbackend = "local"\nuser = "{user}"\nhost_key = "{host_key}"\n'
                         f'port = {10000 + i % 50000}\nhost_key_file = "{alice["host_key_file"]}"\n'
                         f'authorized_keys_file = "{alice["authorized_keys_file"]}"\n')
        else:
            parts.append(f'\n[machines.m{i:05d}]\nbackend = "cmd"\nuser = "{user}"\nhost_key = "{host_key}"\n')
    cfg.write_text("".join(parts))
    return cfg


# -- measuring -----------------------------------------------------------------------------------

class Gateway:
    """scale.py --serve as a subprocess; closed with EOF on stdin."""

    def __init__(self, state_dir: Path, log: Path, start_timeout: float):
        self.log = open(log, "wb")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve", str(state_dir)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        import selectors

        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(start_timeout):
            self.close()
            raise RuntimeError(f"gateway not up within {start_timeout} s; see {log}")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"gateway exited: {log.read_text()[-2000:]}")
        self.start_seconds = time.perf_counter() - t0
        info = json.loads(line)
        self.port, self.metrics_port, self.pid = info["port"], info["metrics_port"], info["pid"]
        host_line = (state_dir / "gateway_host_key.pub").read_text().strip()
        with open(state_dir / "known_hosts", "a") as f:
            f.write(f"{GATEWAY_ALIAS} {host_line}\n")

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def cpu(self) -> tuple[float, float]:
        """(own CPU seconds, own + reaped children's)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()
        tck = os.sysconf("SC_CLK_TCK")
        own = (int(fields[11]) + int(fields[12])) / tck
        return own, own + (int(fields[13]) + int(fields[14])) / tck

    def get(self, path: str, timeout: float = 60) -> tuple[float, bytes]:
        t0 = time.perf_counter()
        c = http.client.HTTPConnection("127.0.0.1", self.metrics_port, timeout=timeout)
        try:
            c.request("GET", path)
            r = c.getresponse()
            body = r.read()
            if r.status != 200:
                raise RuntimeError(f"GET {path}: {r.status}")
        finally:
            c.close()
        return time.perf_counter() - t0, body

    def close(self) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.close()
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


class Scraper(threading.Thread):
    """Back-to-back /metrics scrapes until stopped (the load logins and /healthz must not feel)."""

    def __init__(self, gw: Gateway):
        super().__init__(daemon=True)
        self.gw = gw
        self.stop = threading.Event()
        self.count = 0

    def run(self) -> None:
        while not self.stop.is_set():
            self.gw.get("/metrics")
            self.count += 1


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.1f} / {pct(values, 0.9) * 1000:.1f}"


@dataclass
class Result:
    variant: str
    machines: int
    start: float = 0.0
    rss: float = 0.0
    scrape: list[float] = field(default_factory=list)
    scrape_cpu: float = 0.0     # the gateway's CPU seconds per scrape (incl. its 0.2 s idle before each)
    size: int = 0
    series: int = 0
    healthz_idle: list[float] = field(default_factory=list)
    healthz_busy: list[float] = field(default_factory=list)
    login_idle: list[float] = field(default_factory=list)
    login_busy: list[float] = field(default_factory=list)
    cpu_window: float = 0.0
    cpu_own: float = 0.0        # % of a core
    cpu_children: float = 0.0   # % of a core, own + reaped children (the status commands)
    busy_label: str = "back-to-back scrapes"


def logins(ways: Ways, n: int) -> list[float]:
    opts, host = ways.opts("relay", "default")
    return [run_ssh(["ssh", *opts, host, "true"], 120) for _ in range(n)]


def healthz(gw: Gateway, n: int) -> list[float]:
    return [gw.get("/healthz")[0] for _ in range(n)]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def measure(variant: str, args: argparse.Namespace, work: Path) -> Result:
    state_dir = work / variant
    write_config(state_dir, args.machines, variant)
    res = Result(variant, args.machines)
    print(f"bench: {variant}: starting a gateway with {args.machines} machines", file=sys.stderr)
    gw = Gateway(state_dir, work / f"gateway-{variant}.log", args.start_timeout)
    try:
        res.start = gw.start_seconds
        ways = Ways(state_dir, gw.port, 0, "")
        logins(ways, 1)  # wakes alice; every later login finds it running
        res.rss = gw.rss_mib()
        if variant == "process":
            cpu0 = gw.cpu()[0]
            for _ in range(args.scrapes):
                time.sleep(0.2)  # apart, as Prometheus scrapes: each one a fresh render
                seconds, body = gw.get("/metrics")
                res.scrape.append(seconds)
            res.scrape_cpu = (gw.cpu()[0] - cpu0) / args.scrapes
            res.size = len(body)
            res.series = sum(1 for line in body.decode().splitlines() if line and not line.startswith("#"))
            res.healthz_idle = healthz(gw, args.healthz)
            res.login_idle = logins(ways, args.logins)
            scraper = Scraper(gw)
            scraper.start()
            try:
                wait_for(lambda: scraper.count >= 1, 120, "the first back-to-back scrape")
                for _ in range(args.healthz):  # spaced, so they land at any point of a scrape
                    time.sleep(0.1)
                    res.healthz_busy.append(gw.get("/healthz")[0])
                res.login_busy = logins(ways, args.logins)
            finally:
                scraper.stop.set()
                scraper.join(120)
            print(f"bench: {variant}: {scraper.count} scrapes during the busy phase", file=sys.stderr)
            own0, all0 = gw.cpu()
            t0 = time.perf_counter()
            time.sleep(args.idle_seconds)
        else:
            res.busy_label = "status polling"
            # The first periodic pass begins one reconcile_interval after start: measure from there.
            time.sleep(30)
            own0, all0 = gw.cpu()
            t0 = time.perf_counter()
            i = 0
            while time.perf_counter() - t0 < args.poll_seconds:
                res.healthz_busy.append(gw.get("/healthz")[0])
                if i % 10 == 0:
                    res.login_busy.extend(logins(ways, 1))
                i += 1
                time.sleep(0.2)
        own1, all1 = gw.cpu()
        wall = time.perf_counter() - t0
        res.cpu_window = wall
        res.cpu_own = 100 * (own1 - own0) / wall
        res.cpu_children = 100 * (all1 - all0) / wall
    finally:
        gw.close()
    print(f"bench: {variant}: {res}", file=sys.stderr)
    return res


def report(results: list[Result], args: argparse.Namespace, command: str) -> str:
    date = datetime.date.today().isoformat()
    out = [f"Scale benchmark, {date}, `{command}`: one gateway process, {args.machines} machines, on "
           f"{platform.machine()} with {os.cpu_count()} CPUs (shared with other work), Python "
           f"{platform.python_version()}. Medians / p90 in ms. Logins are `ssh alice@gateway true` "
           f"(OpenSSH, a new connection each, alice already running).", ""]
    out.append("| variant | start s | RSS MiB | /metrics ms (median / p90; gateway CPU ms) | size KiB | series | "
               "/healthz idle ms | /healthz busy ms | login idle ms | login busy ms | CPU % of a core |")
    out.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        busy = f" ({r.busy_label})"
        cpu = (f"{r.cpu_own:.2f} idle, {r.cpu_window:.0f} s" if r.variant == "process" else
               f"{r.cpu_own:.1f} gateway, {r.cpu_children:.1f} with the commands, {r.cpu_window:.0f} s")
        out.append(
            f"| {r.variant} | {r.start:.1f} | {r.rss:.0f} | "
            f"{ms(r.scrape) + f'; {r.scrape_cpu * 1000:.0f}' if r.scrape else '-'} | "
            f"{r.size / 1024:.0f} | {r.series or '-'} | {ms(r.healthz_idle) if r.healthz_idle else '-'} | "
            f"{ms(r.healthz_busy)}{busy} | {ms(r.login_idle) if r.login_idle else '-'} | "
            f"{ms(r.login_busy)}{busy} | {cpu} |")
    out.append("")
    out.append("`process`: N process-backend machines never started, plus the demo machine alice; busy = a thread "
               "scraping /metrics back to back (`/healthz` requests 0.1 s apart once the first scrape is done, then "
               "logins); idle CPU after that, with nothing happening. `command`: N machines on a command backend "
               "whose status is `echo stopped` (shell = true), polled every `reconcile_interval` (30 s); from the "
               "first periodic pass on (30 s after start), a `/healthz` every 0.2 s and a login every 10th, for "
               "the whole CPU window; CPU counts the gateway alone, and with the status commands it spawned "
               "(reaped children). Start includes the first reconcile of every machine. `command_all`: the same "
               "machines, their state from one `status_all` command per pass (`seq` printing a line per machine).")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--machines", type=int, default=10000)
    p.add_argument("--variants", default=",".join(VARIANTS), type=lambda s: s.split(","))
    p.add_argument("--scrapes", type=int, default=20, help="/metrics scrapes timed (default 20)")
    p.add_argument("--healthz", type=int, default=50, help="/healthz requests per phase (default 50)")
    p.add_argument("--logins", type=int, default=10, help="logins per phase (default 10)")
    p.add_argument("--idle-seconds", type=float, default=30.0)
    p.add_argument("--poll-seconds", type=float, default=60.0)
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument("--write-docs", action="store_true", help="write the table into docs/benchmarks.md")
    p.add_argument("--json", type=Path, help="also write raw results as JSON")
    p.add_argument("--keep", action="store_true", help="keep the work directory (configs, gateway logs)")
    p.add_argument("--work-dir", type=Path, help="where configs and logs go (default: a new temporary directory)")
    args = p.parse_args(argv)
    if args.serve is not None:
        serve(args.serve)
        return 0
    for v in args.variants:
        if v not in VARIANTS:
            p.error(f"--variants: unknown variant {v!r}")
    if shutil.which("ssh") is None:
        p.error("needs OpenSSH's ssh client")
    command = shlex.join([".venv/bin/python", "bench/scale.py", *(argv if argv is not None else sys.argv[1:])])
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fleetgate-scale-", dir=args.work_dir))
    try:
        results = [measure(v, args, work) for v in args.variants]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"bench: work directory kept: {work}", file=sys.stderr)
    section = report(results, args, command)
    print(section)
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in results], indent=1))
    if args.write_docs:
        write_section(REPO / "docs" / "benchmarks.md", section, DOCS_BEGIN, DOCS_END)
        print("bench: results written to docs/benchmarks.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

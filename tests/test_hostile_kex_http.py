"""Issue 25 items 3 and 4, hostile: key re-exchange floods and a slowloris on the metrics port.

The gateway runs as its own process under `prlimit --nofile=1024:1024` (hostile.GatewayProcess,
the demo fleet), pinned apart from the attackers where there are two CPUs (hostile.cpu_split).
Throughout, bob logs in with the real OpenSSH client from 127.0.0.9, an address no attacker
uses; his logins must all succeed, with a median under 1 s.

1. Re-exchange flood: Paramiko clients that never authenticate and start key re-exchanges
   back to back (RFC 4253 9: KEXINIT again before USERAUTH), four with curve25519 from one
   address, four with diffie-hellman-group16-sha512 from another, for 20 s, each reconnecting
   when cut. On the old gateway these ran outside every budget (group18: 60
   exchanges a second against a budget of 8; curve25519: 1 800 a second, 90 % of a core).
   Now they are bounded by limits.rekey_* and expensive_kex_*, refused and counted.
2. Slowloris on the metrics port: 300 connections from one address (the issue's) and 40 from
   40 others that never finish a request (each re-opened a second after the server closes
   it); 25 `/healthz` probes from 127.0.0.1 meanwhile must all be answered 200. (More
   addresses than the port has slots, arriving faster than a probe's request is read, can
   still crowd probes out: tests/test_http_limits.py covers eviction; docs/security.md.)

    .venv/bin/python -m pytest tests/test_hostile_kex_http.py -s
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import time

import pytest
import trio

from helpers import run, sample
from hostile import GatewayProcess, cpu_split, source_addresses, taskset

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux)")]

LEGIT_SOURCE = "127.0.0.9"
LEGIT_MEDIAN_SECONDS = 1.0
ATTACK_SECONDS = 20.0
CURVE_SOURCE = "127.0.1.1"
DH_SOURCE = "127.0.2.1"
CONNECTIONS = 4  # per attacker, as in the flood

# One attacker process: CONNS threads from one address, each connecting, never authenticating,
# re-exchanging keys until cut, and reconnecting; prints the totals.
ATTACKER = r"""
import json, socket, sys, threading, time, paramiko
port, source, kex, seconds, conns = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5])
end = time.monotonic() + seconds
totals = {"rekeys": 0, "connections": 0, "cut": 0}
lock = threading.Lock()
def one():
    while time.monotonic() < end:
        t = None
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
            t = paramiko.Transport(sock)
            t.get_security_options().kex = (kex,)
            t.clear_to_send_timeout = 5.0
            t.start_client(timeout=10)
            with lock:
                totals["connections"] += 1
            while time.monotonic() < end:
                t.renegotiate_keys()
                with lock:
                    totals["rekeys"] += 1
        except Exception:
            with lock:
                totals["cut"] += 1
            time.sleep(0.05)
        finally:
            if t is not None:
                t.close()
threads = [threading.Thread(target=one) for _ in range(conns)]
for th in threads:
    th.start()
for th in threads:
    th.join()
print(json.dumps(totals))
"""


def sched(pid: int) -> tuple[float, float]:
    """(seconds run, seconds runnable but waiting for a CPU) of a process's main thread."""
    ran, waited = open(f"/proc/{pid}/schedstat").read().split()[:2]
    return int(ran) / 1e9, int(waited) / 1e9


def judge_median(seconds: list[float], bound: float, starved: float, what: str) -> None:
    """bob's median under `bound`, unless the runner itself starved the gateway: when it waited
    for a CPU more than a quarter of the time (other jobs on a shared 2-core runner; the gateway
    was runnable, not busy), latency measures the runner and the test says so instead."""
    median = statistics.median(seconds)
    if starved > 0.25:
        print(f"  {what}: median {median:.2f} s NOT judged: the gateway waited for a CPU {starved:.0%} of the time")
        return
    assert median < bound, f"{what}: median {median:.2f} s, bound {bound:.2f} s"


class Legit:
    """bob's `ssh bob@gw true`, again and again from LEGIT_SOURCE, timed."""

    def __init__(self, gw: GatewayProcess):
        self.gw = gw
        self.seconds: list[float] = []
        self.failures: list[str] = []

    async def once(self) -> None:
        t0 = time.monotonic()
        r = await run([*taskset(self.gw.cpus), "ssh", *self.gw.fleet.ssh_opts(self.gw.port), "-b", LEGIT_SOURCE,
                       "bob@127.0.0.1", "true"], timeout=30)
        if r.returncode == 0:
            self.seconds.append(time.monotonic() - t0)
        else:
            self.failures.append(r.err[-300:])

    async def loop(self, stop: trio.Event) -> None:
        while not stop.is_set():
            await self.once()

    def summary(self) -> str:
        s = self.seconds
        return (f"n={len(s)} failed={len(self.failures)} median={statistics.median(s):.3f}s max={max(s):.3f}s"
                if s else f"none succeeded ({len(self.failures)} failed)")


async def _attack(gw: GatewayProcess, cpus: str | None, source: str, kex: str) -> dict:
    r = await run([*taskset(cpus), sys.executable, "-c", ATTACKER, str(gw.port), source, kex, str(ATTACK_SECONDS),
                   str(CONNECTIONS)], timeout=ATTACK_SECONDS + 60)
    assert r.returncode == 0, r.err[-800:]
    return json.loads(r.out)


async def _slow_slot(port: int, source: str, stop: trio.Event, opened: list[int]) -> None:
    """One slowloris slot: a request never finished, re-opened whenever the server closes it."""
    while not stop.is_set():
        sock = trio.socket.socket()
        try:
            await sock.bind((source, 0))
            await sock.connect(("127.0.0.1", port))
            opened[0] += 1
            await sock.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            while not stop.is_set():
                with trio.move_on_after(0.5):
                    if not await sock.recv(4096):
                        break  # closed by the server
        except OSError:
            pass
        finally:
            sock.close()
        with trio.move_on_after(1.0):  # then another one a second later, as a slowloris tool does
            await stop.wait()


async def _healthz(port: int) -> tuple[float, bytes]:
    t0 = time.monotonic()
    out = b""
    with trio.move_on_after(10):
        sock = trio.socket.socket()
        with sock:
            await sock.bind(("127.0.0.1", 0))
            try:
                await sock.connect(("127.0.0.1", port))
                await sock.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                while chunk := await sock.recv(4096):
                    out += chunk
            except OSError:
                pass
    return time.monotonic() - t0, out


async def test_rekey_flood_and_metrics_slowloris_under_ulimit_1024(tmp_path):
    # The attackers get at most one CPU (the second half of cpu_split); the gateway and bob are
    # not pinned: on a runner shared with other jobs, pinning them to one CPU measured the other
    # jobs that the attackers pushed there, not the gateway.
    attacker_cpus = (cpu_split() or (None, None))[1]
    async with GatewayProcess(tmp_path, prefix=["prlimit", "--nofile=1024:1024"]) as gw:
        bob = Legit(gw)
        await bob.once()  # wake bob's machine first: the 1 s is about serving, not booting
        bob.seconds.clear()
        for _ in range(5):
            await bob.once()
        assert not bob.failures, bob.failures
        baseline = statistics.median(bob.seconds)
        # The bound is 1 s; on a machine so loaded that bob's logins already take over half of
        # that with no attack at all (a 2-core CI runner shared with other jobs), twice his own
        # baseline instead: what is measured is the gateway's share, not the runner's load.
        bound = max(LEGIT_MEDIAN_SECONDS, 2.0 * baseline)
        print(f"\nbob before any attack: {bob.summary()}; bound for the median {bound:.2f} s")
        bob.seconds.clear()

        # -- 1. key re-exchange flood ------------------------------------------------------
        cpu0 = gw.cpu_seconds()
        t0, (ran0, waited0) = time.monotonic(), sched(gw.pid)
        stop = trio.Event()
        results: dict[str, dict] = {}

        async def attacker(source: str, kex: str) -> None:
            results[source] = await _attack(gw, attacker_cpus, source, kex)

        with trio.fail_after(ATTACK_SECONDS + 90):
            async with trio.open_nursery() as n:
                n.start_soon(bob.loop, stop)
                async with trio.open_nursery() as attackers:
                    attackers.start_soon(attacker, CURVE_SOURCE, "curve25519-sha256@libssh.org")
                    attackers.start_soon(attacker, DH_SOURCE, "diffie-hellman-group16-sha512")
                stop.set()
        cpu_rekey = gw.cpu_seconds() - cpu0
        wall = time.monotonic() - t0
        ran, waited = sched(gw.pid)
        starved = (waited - waited0) / wall
        curve, dh = results[CURVE_SOURCE]["rekeys"], results[DH_SOURCE]["rekeys"]
        text = await gw.metrics()
        rekey_rate = sample(text, "fleetgate_preauth_refusals_total", reason="rekey_rate") or 0
        penalty = sample(text, "fleetgate_preauth_refusals_total", reason="penalty") or 0
        kex_budget = sample(text, "fleetgate_preauth_refusals_total", reason="kex_budget") or 0
        print(f"re-exchange flood {ATTACK_SECONDS:.0f} s: curve25519 {curve} ({curve / ATTACK_SECONDS:.1f}/s), "
              f"group16 {dh} ({dh / ATTACK_SECONDS:.1f}/s), connections "
              f"{sum(r['connections'] for r in results.values())}, refusals rekey_rate={rekey_rate:.0f} "
              f"kex_budget={kex_budget:.0f} penalty={penalty:.0f}, gateway CPU {cpu_rekey:.1f} s of {wall:.0f} s (it waited for a CPU "
              f"{starved:.0%} of the time); bob {bob.summary()}")
        rekey_logins = list(bob.seconds)
        assert not bob.failures, bob.failures[:3]
        assert rekey_logins
        judge_median(rekey_logins, bound, starved, "bob during the re-exchange flood")
        assert rekey_rate > 0 and kex_budget > 0
        assert cpu_rekey < 0.5 * wall, cpu_rekey  # bob's logins included; the flood: 90 % of a core
        # Per source: 120 re-exchanges a minute (30 per connection); expensive ones 30 a minute,
        # first exchanges included. Bounds with room for the clock: the old gateway ran thousands.
        assert curve <= (120 + 120 * ATTACK_SECONDS / 60) * 1.25, curve
        assert dh <= (30 + 30 * ATTACK_SECONDS / 60) * 1.25, dh

        # -- 2. slowloris on the metrics port ----------------------------------------------
        bob.seconds.clear()
        stop = trio.Event()
        opened = [0]
        probes: list[tuple[float, bytes]] = []
        t0, (ran0, waited0) = time.monotonic(), sched(gw.pid)
        with trio.fail_after(120):
            async with trio.open_nursery() as n:
                n.start_soon(bob.loop, stop)
                for _ in range(300):
                    n.start_soon(_slow_slot, gw.metrics_port, "127.0.3.1", stop, opened)
                for source in source_addresses(40, second_octet=4):
                    n.start_soon(_slow_slot, gw.metrics_port, source, stop, opened)
                await trio.sleep(2.0)  # the flood is in place (a slowloris has no event to wait for)
                for _ in range(25):
                    probes.append(await _healthz(gw.metrics_port))
                    await trio.sleep(0.2)
                stop.set()
        starved = (sched(gw.pid)[1] - waited0) / (time.monotonic() - t0)
        text = await gw.metrics()
        refusals = {r: sample(text, "fleetgate_http_refusals_total", reason=r) or 0
                    for r in ("per_source", "evicted", "connection_cap", "read_timeout", "health_reserve")}
        answered = [p for p in probes if p[1].startswith(b"HTTP/1.1 200")]
        print(f"slowloris: {opened[0]} slow connections opened, /healthz answered {len(answered)}/{len(probes)} "
              f"(slowest {max(p[0] for p in probes):.3f} s), refusals {refusals}; gateway waited for a CPU {starved:.0%} of the time; bob {bob.summary()}")
        assert len(answered) == len(probes) == 25, [p[1][:40] for p in probes if p not in answered]
        assert refusals["per_source"] > 0
        assert not bob.failures, bob.failures[:3]
        assert bob.seconds
        judge_median(bob.seconds, bound, starved, "bob during the slowloris")
        assert gw.alive() and not gw.log_problems(), gw.log_problems()[:5]

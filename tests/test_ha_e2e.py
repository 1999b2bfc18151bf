"""Issue 11 end to end: 2-3 gateway replicas share one fleet through a real 3-member etcd
cluster (Debian's etcd-server on loopback), with the process backend's demo machines and the
real OpenSSH client.

- a storm of 200 OpenSSH logins spread over 3 replicas onto one stopped machine: one start;
- a session on replica A keeps the machine up while replica B's reaper runs, then one stop;
- a replica (`fleetgate serve`) SIGKILLed mid-session: its hold expires with its lease and
  another replica reaps the machine after the idle timeout;
- the etcd leader killed during a wake: still exactly one start, every client lands;
- 2 of 3 members stopped: no stop, the session goes on, a wake gets the clear message;
  members restarted: the replicas recover by themselves.
"""

from __future__ import annotations

import json
import signal
import sys

import pytest
import trio

from etcd_helpers import EtcdCluster, store_patch
from helpers import ServeProcess, Session, free_port, make_fleet, run, start_gateway

pytestmark = pytest.mark.e2e
FG = [sys.executable, "-m", "fleetgate"]


def with_boot(seconds: float, patch):
    def p(doc):
        patch(doc)
        doc["backends"]["local"]["start_delay"] = seconds
        doc["limits"] = {"exempt": ["127.0.0.0/8"]}  # 200 logins from one address are a test, not an attack
    return p


@pytest.fixture
async def etcd(tmp_path):
    cluster = EtcdCluster(tmp_path / "etcd")
    await cluster.start()
    try:
        yield cluster
    finally:
        await cluster.aclose()


async def replicas(nursery, tmp_path, etcd, n: int, *, boot: float = 0.0, idle: float | None = None, ttl: int = 3):
    out = []
    for i in range(n):
        fleet, cfg = make_fleet(tmp_path, patch=with_boot(boot, store_patch(
            etcd.endpoints, replica=f"gw{i}", admin_socket=f"admin-{i}.sock", ttl=ttl, idle_timeout=idle)))
        await start_gateway(nursery, fleet, cfg, stop_machines_on_exit=False)
        out.append(fleet)
    return out


async def health(store, healthy: bool, timeout: float = 15) -> None:
    with trio.fail_after(timeout):
        while store.healthy is not healthy:
            await store.health_changed.wait()


def starts(fleets) -> float:
    return sum(f.backend_calls("start") for f in fleets)


def stops(fleets) -> float:
    return sum(f.backend_calls("stop") for f in fleets)


async def until(store, predicate, timeout: float = 30) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await store.wait_change(1.0)


async def test_storm_of_200_over_3_replicas_starts_once(tmp_path, nursery, etcd):
    """200 clients at once: 60 real OpenSSH logins and 140 in-process waiters (the same
    Fleet.acquire the SSH front calls; 200 real logins take ~80 s on 2 cores, see docs/benchmarks.md)."""
    gws = await replicas(nursery, tmp_path, etcd, 3, boot=2.0)
    results, leases, progress = [], [], []

    async def client(i: int) -> None:
        gw = gws[i % 3]
        if i < 60:
            results.append(await run(gw.ssh("alice", f"echo landed-{i}"), timeout=100))
        else:
            leases.append(await gw.running.fleet.acquire("alice", progress.append))

    with trio.fail_after(110):
        async with trio.open_nursery() as clients:
            for i in range(200):
                clients.start_soon(client, i)
    failed = [r for r in results if r.returncode != 0]
    assert not failed, failed[:3]
    assert sorted(r.out for r in results) == sorted(f"landed-{i}\n" for i in range(60))
    assert len(leases) == 140
    for lease in leases:
        lease.release()
    assert starts(gws) == 1
    claims = [g.metric("fleetgate_store_claims_total", kind="start", result="performed") for g in gws]
    assert sorted(claims) == [0, 0, 1]
    assert any("starting alice" in r.err for r in results) and progress  # the waiters saw progress


async def test_session_on_a_holds_while_b_reaps(tmp_path, nursery, etcd):
    a, b = await replicas(nursery, tmp_path, etcd, 2, idle=2)
    store_b = b.running.fleet.store
    async with trio.open_nursery() as n:
        s = await Session(a.ssh("alice", "echo ready; cat")).open(n)
        await until(store_b, lambda: "gw0" in store_b.view("alice").holds)
        # One view from any replica: B's status shows A's session; B refuses to stop it.
        admin_b = str(b.dir / "admin-1.sock")
        r = await run(FG + ["status", "--admin-socket", admin_b, "--json"], timeout=30)
        alice = next(m for m in json.loads(r.out) if m["machine"] == "alice")
        assert (alice["state"], alice["sessions"], alice["local_sessions"], alice["holds"]) == \
            ("running", 1, 0, {"gw0": 1}), alice
        r = await run(FG + ["stop", "alice", "--admin-socket", admin_b], timeout=30)
        assert r.returncode == 1 and "1 session(s)" in r.err, r.err
        # B's reaper looks every second; the machine is idle on B's side for 3 idle timeouts.
        await trio.sleep(6)
        assert stops([a, b]) == 0
        assert await s.echo(b"still here\n") == b"still here\n"
        assert await s.close() == 0
    await until(store_b, lambda: store_b.view("alice").fleet_state == "stopped", timeout=20)
    assert stops([a, b]) == 1


async def test_sigkilled_replica_hold_expires_and_machine_is_reaped(tmp_path, nursery, etcd):
    (b,) = await replicas(nursery, tmp_path, etcd, 1, idle=2, ttl=3)
    # Replica A is a real `fleetgate serve`, SIGKILLed with a session open.
    fleet_a, _ = make_fleet(tmp_path)
    text = fleet_a.config_path.read_text()
    text = text.replace('listen = ["127.0.0.1:0"]', f'listen = ["127.0.0.1:{free_port()}"]')
    text = text.replace('state_dir = "state"', 'state_dir = "state"\nadmin_socket = "admin-a.sock"')
    text = text.replace("boot_timeout = ", "idle_timeout = 2\nmin_uptime = 0\nboot_timeout = ")
    endpoints = ", ".join(f'"{e}"' for e in etcd.endpoints)
    text += (f'\n[store]\ntype = "etcd"\nendpoints = [{endpoints}]\nprefix = "/fg-test/"\nlease_ttl = 3\n'
             f'timeout = 0.8\nreplica = "gwA"\n')
    a_config = tmp_path / "fleet" / "replica-a.toml"
    a_config.write_text(text)
    store_b = b.running.fleet.store
    async with trio.open_nursery() as n:
        a = await ServeProcess(a_config).start(n)
        s = await Session(["ssh", *fleet_a.ssh_opts(port=a.port), "alice@127.0.0.1", "echo ready; cat"]).open(n)
        try:
            await until(store_b, lambda: "gwA" in store_b.view("alice").holds, timeout=10)
        except trio.TooSlowError:
            raise AssertionError("\n".join(a.lines[-40:]) + f"\nview: {store_b.view('alice')}") from None
        a.signal(signal.SIGKILL)
        killed = trio.current_time()
        await a.wait()
        await until(store_b, lambda: not store_b.view("alice").holds, timeout=15)  # the lease TTL
        expired = trio.current_time() - killed
        assert expired < 3 + 2, expired
        await until(store_b, lambda: store_b.view("alice").fleet_state == "stopped", timeout=20)
        assert b.backend_calls("stop") == 1
        with trio.fail_after(10):
            await s.proc.wait()


async def test_etcd_leader_killed_during_a_wake_no_double_start(tmp_path, nursery, etcd):
    gws = await replicas(nursery, tmp_path, etcd, 2, boot=3.0)
    store = gws[0].running.fleet.store
    results = []

    async def client(i: int) -> None:
        results.append(await run(gws[i % 2].ssh("alice", f"echo landed-{i}"), timeout=60))

    async with trio.open_nursery() as clients:
        for i in range(10):
            clients.start_soon(client, i)
        await until(store, lambda: store.view("alice").start is not None, timeout=20)
        await etcd.kill(await etcd.leader())   # mid-boot: a new leader is elected within ~1 s
    assert [r.returncode for r in results] == [0] * 10, [r.err for r in results if r.returncode]
    assert starts(gws) == 1


async def test_quorum_lost_no_stop_sessions_continue_wakes_refused_then_recovery(tmp_path, nursery, etcd):
    a, b = await replicas(nursery, tmp_path, etcd, 2, idle=2)
    store_a, store_b = a.running.fleet.store, b.running.fleet.store
    async with trio.open_nursery() as n:
        s = await Session(a.ssh("alice", "echo ready; cat")).open(n)
        await until(store_b, lambda: "gw0" in store_b.view("alice").holds)
        down = etcd.members[1:]
        for m in down:
            await etcd.kill(m)                 # 1 of 3 left: no quorum
        await health(store_a, False)           # flips on the next keep-alive (every ttl/3)
        await health(store_b, False)
        assert a.metric("fleetgate_store_up") == 0
        await s.close()                        # the last session ends while etcd has no quorum
        r = await run(b.ssh("bob", "echo woke"), timeout=30)   # a stopped machine: refused, clearly
        assert r.returncode != 0 and "coordination store (etcd)" in r.err, r.err
        await trio.sleep(5)                    # idle timeout (2 s) long past: still no stop
        assert stops([a, b]) == 0
        for m in down:
            await etcd.restart(m)
        await etcd.wait_healthy()
        await health(store_a, True, timeout=20)
        await health(store_b, True, timeout=20)
        r = await run(b.ssh("bob", "echo woke"), timeout=30)   # recovered by itself
        assert r.returncode == 0 and r.out == "woke\n", r.err
        await until(store_b, lambda: store_b.view("alice").fleet_state == "stopped", timeout=30)
        assert stops([a, b]) >= 1


async def test_check_connect_reaches_every_endpoint(tmp_path, etcd):
    fleet, _ = make_fleet(tmp_path)
    endpoints = ", ".join(f'"{e}"' for e in etcd.endpoints)
    fleet.config_path.write_text(fleet.config_path.read_text() +
                                 f'\n[store]\ntype = "etcd"\nendpoints = [{endpoints}]\nlease_ttl = 3\ntimeout = 0.8\n')
    r = await run(FG + ["check", "-c", str(fleet.config_path), "--connect"], timeout=30)
    assert r.returncode == 0, r.err
    assert r.out.count(" ok (revision ") == 3 and "3 of 3 endpoints answer" in r.out, r.out
    # A follower goes: the cluster keeps its leader, so what check sees is the lost endpoint
    # alone (killing the leader would also show its election, a moment of "leader changed").
    leader = await etcd.leader()
    follower = next(m for m in etcd.members if m is not leader)
    await etcd.kill(follower)
    await etcd.wait_healthy()
    r = await run(FG + ["check", "-c", str(fleet.config_path), "--connect"], timeout=30)
    assert r.returncode == 0 and "2 of 3 endpoints answer" in r.out and "does not answer" in r.err, r.out + r.err
    await etcd.kill(leader)  # no quorum: no write
    r = await run(FG + ["check", "-c", str(fleet.config_path), "--connect"], timeout=30)
    assert r.returncode == 1 and "cannot write to etcd" in r.err, r.out + r.err

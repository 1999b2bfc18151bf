"""What the etcd store costs per login, against the in-process store, in the same run.

    .venv/bin/python bench/store.py [--logins 40] [--storm 200] [--no-docs]

Starts a real 3-member etcd cluster (Debian's etcd-server) on loopback, then, in one trio
process:

1. two gateways over two copies of the demo fleet, one with the in-process store and one
   with `[store] type = "etcd"`; machine alice is woken once on each, then LOGINS sequential
   OpenSSH logins (`ssh alice@gw true`) alternate between them: the connect latency each
   store adds, and the etcd requests per login (from fleetgate_store_op_duration_seconds,
   keep-alives not counted);
2. the storm: 3 etcd replicas over one fleet with machine alice stopped (2 s boot), STORM
   OpenSSH logins at once spread round-robin over the replicas: backend start calls (must be
   1), the time until every client landed, and per-client latency.

Results go to docs/benchmarks.md between the bench:store markers (unless --no-docs).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from etcd_helpers import EtcdCluster, store_patch  # noqa: E402
from helpers import make_fleet, run, start_gateway  # noqa: E402
from relay import write_docs  # noqa: E402


def store_requests(fleet) -> float:
    """etcd requests a gateway made, keep-alives and lease grants excluded."""
    total = 0.0
    for metric in fleet.running.metrics.registry.collect():
        if metric.name == "fleetgate_store_op_duration_seconds":
            for s in metric.samples:
                if s.name.endswith("_count") and s.labels.get("op") in ("range", "txn"):
                    total += s.value
    return total


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


async def bench(base: Path, logins: int, storm: int) -> str:
    etcd = EtcdCluster(base / "etcd")
    await etcd.start()
    try:
        async with trio.open_nursery() as nursery:
            def limits(patch=None):
                def p(doc):
                    if patch:
                        patch(doc)
                    doc["limits"] = {"exempt": ["127.0.0.0/8"]}
                return p

            mem, mcfg = make_fleet(base / "mem", patch=limits())
            await start_gateway(nursery, mem, mcfg)
            et, ecfg = make_fleet(base / "etcd-one", patch=limits(store_patch(
                etcd.endpoints, replica="bench", admin_socket="admin-bench.sock", ttl=10, prefix="/bench-one/")))
            await start_gateway(nursery, et, ecfg)
            for g in (mem, et):  # wake alice on both; measure logins to a running machine
                r = await run(g.ssh("alice", "true"), timeout=60)
                assert r.returncode == 0, r.err
            times: dict[str, list[float]] = {"memory": [], "etcd": []}
            before = store_requests(et)
            for i in range(logins):
                for label, g in (("memory", mem), ("etcd", et)) if i % 2 == 0 else (("etcd", et), ("memory", mem)):
                    t0 = time.perf_counter()
                    r = await run(g.ssh("alice", "true"), timeout=60)
                    times[label].append(time.perf_counter() - t0)
                    assert r.returncode == 0, r.err
            ops_per_login = (store_requests(et) - before) / logins

            # The storm: 3 replicas, one stopped machine.
            def slow(patch):
                def p(doc):
                    patch(doc)
                    doc["backends"]["local"]["start_delay"] = 2.0
                return p

            reps = []
            for i in range(3):
                f, cfg = make_fleet(base / "storm", patch=limits(slow(store_patch(
                    etcd.endpoints, replica=f"storm{i}", admin_socket=f"admin-{i}.sock", ttl=10,
                    prefix="/bench-storm/"))))
                await start_gateway(nursery, f, cfg)
                reps.append(f)
            lat: list[float] = []
            failed = 0
            t_storm = time.perf_counter()

            async def client(i: int) -> None:
                nonlocal failed
                t0 = time.perf_counter()
                r = await run(reps[i % 3].ssh("alice", "true"), timeout=300)
                lat.append(time.perf_counter() - t0)
                failed += r.returncode != 0

            async with trio.open_nursery() as clients:
                for i in range(storm):
                    clients.start_soon(client, i)
            storm_wall = time.perf_counter() - t_storm
            starts = sum(f.backend_calls("start") for f in reps)
            storm_ops = sum(store_requests(f) for f in reps)
            nursery.cancel_scope.cancel()
    finally:
        await etcd.aclose()

    m, e = times["memory"], times["etcd"]
    med = lambda xs: statistics.median(xs) * 1000  # noqa: E731
    lines = [
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.node() or 'host'}: "
        f"{os.cpu_count()} cores, CPython {platform.python_version()}, etcd 3-member cluster on loopback "
        f"(Debian etcd-server), gateways and OpenSSH clients in the same 2 cores.",
        "",
        "Command:",
        "",
        "```",
        f".venv/bin/python bench/store.py --logins {logins} --storm {storm}",
        "```",
        "",
        f"Connect latency of `ssh alice@gw true` to a running machine, {logins} logins per store, interleaved "
        f"(wall time of the whole `ssh` run: handshake, authentication, upstream login, exec, close).",
        "",
        "| store | median ms | p90 ms | added vs in-process (median) |",
        "| --- | ---: | ---: | ---: |",
        f"| in-process (memory) | {med(m):.1f} | {pct(m, .9) * 1000:.1f} | |",
        f"| etcd (3 members) | {med(e):.1f} | {pct(e, .9) * 1000:.1f} | {med(e) - med(m):+.1f} ms |",
        "",
        f"etcd requests per login (range and txn; the replica's keep-alive, one per lease_ttl/3 s, and the "
        f"watch are not per login): **{ops_per_login:.2f}** — a login to a machine this replica holds no "
        f"session on registers its hold (one txn) and the logout drops it (one txn).",
        "",
        f"Storm: {storm} OpenSSH logins at once, round-robin over 3 replicas, onto one stopped machine "
        f"(process backend, 2 s boot): **{starts:.0f} backend start call(s)**, {storm - failed} of {storm} "
        f"clients landed, all within {storm_wall:.1f} s; per-client latency median {med(lat) / 1000:.1f} s, "
        f"p95 {pct(lat, .95):.1f} s; {storm_ops:.0f} etcd requests in all (range and txn) across the replicas.",
        "",
    ]
    return "\n".join(lines)


def write_section(path: Path, text: str) -> None:
    write_docs(path, text, "<!-- bench:store:begin (written by bench/store.py; edit outside these markers) -->",
               "<!-- bench:store:end -->",
               heading="## Shared store (etcd) cost per login and the storm\n\nWhat several replicas ([ha.md](ha.md)) "
                       "cost each login, and the fleet-wide single start under a storm.")

def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--logins", type=int, default=40)
    p.add_argument("--storm", type=int, default=200)
    p.add_argument("--no-docs", dest="docs", action="store_false")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="fleetgate-bench-store-") as tmp:
        text = trio.run(bench, Path(tmp), args.logins, args.storm)
    print(text)
    if args.docs:
        write_section(HERE.parent / "docs" / "benchmarks.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

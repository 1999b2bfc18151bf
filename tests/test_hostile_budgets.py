"""Budgets that add up (issue 25, items 1 and 2): one user cannot take the gateway from the others.

The gateway runs as `fleetgate serve` under `prlimit --nofile=1024:1024`, with default limits.
An innocent user (alice) logs in with the real OpenSSH client from 127.0.0.2 throughout, while
an attacker (another user, from 127.0.0.3) stays within the per-connection caps:

1. mallory opens 17 connections × 60 jump channels (`-W mallory:22`, as `ssh -J` does) to her
   machine, whose "sshd" takes connections and never answers past its banner, so every jump
   holds its socket: 1 054 descriptors wanted. Before issue 25, the gateway ran out of
   descriptors (logins from elsewhere timed out in the banner exchange);
2. bob opens 8 connections × 64 `-L` channels to a server on his machine that sends as fast
   as it can, to a client that advertises a 2 GiB window and never reads. Before, the gateway
   grew by ~8 MiB per channel (gigabytes) and kept most of it after the attacker left.

Each test asserts: every login of alice's works and their median is under 1 s; the attacker
is refused with a message naming the budget; the refusal is counted; the gateway's RSS stays
under its bound and returns to within 64 MiB of its start after the attacker leaves;
accept() never failed with EMFILE; nothing was taken for a stopped machine.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import time
from pathlib import Path

import asyncssh
import pytest
import trio
import trio_asyncio

from helpers import ServeProcess, make_fleet, run, sample

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux)")]

INNOCENT_SOURCE = "127.0.0.2"
ATTACKER_SOURCE = "127.0.0.3"
MiB = 1 << 20
RSS_BOUND_MIB = 512          # docs/security.md: the gateway's RSS under this attack with default budgets
RSS_RETURN_MIB = 64          # after the attacker leaves, RSS within this of where it started
LOGIN_MEDIAN_S = 1.0         # the bound for alice's median login during the attack ...
QUIET_FACTOR = 2.0           # ... or twice her median on the same (shared, loaded) box without one
LOGIN_TIMEOUT_S = 20
HUGE_WINDOW = 2 * 1024 ** 3 - 1



# -- what the attackers' machines run ------------------------------------------------------

class LoopbackServer:
    """A server on a free loopback port; a subclass's `_handle` serves each connection."""

    def __init__(self) -> None:
        self.port = 0

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1", backlog=4096)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        raise NotImplementedError


class Holder(LoopbackServer):
    """mallory's "sshd": sends a banner (the readiness probe reads it), then holds every connection."""

    def __init__(self) -> None:
        super().__init__()
        self.held = 0

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.held += 1
        try:
            await stream.send_all(b"SSH-2.0-OpenSSH_9.2p1 holder\r\n")
            while await stream.receive_some(65536):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self.held -= 1
            await trio.aclose_forcefully(stream)


class Firehose(LoopbackServer):
    """A fast server on bob's machine: sends zeros as fast as it is read."""

    async def _handle(self, stream: trio.SocketStream) -> None:
        chunk = bytes(256 * 1024)
        try:
            while True:
                await stream.send_all(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await trio.aclose_forcefully(stream)


# -- the gateway ---------------------------------------------------------------------------

def write_config(tmp_path: Path, holder_port: int):
    """The demo fleet (machines share the host's network), plus mallory and her holding machine."""
    import tomllib

    fleet, _ = make_fleet(tmp_path, isolation="none")
    addr = f"127.0.0.1:{holder_port}"
    # never checked: a jump logs in to nothing upstream
    host_key = tomllib.loads(fleet.config_path.read_text())["machines"]["alice"]["host_key"]
    with open(fleet.config_path, "a") as f:
        f.write(f"""
[metrics]
listen = "127.0.0.1:0"

[backends.hold]
type = "command"
start = ["echo", "{addr}"]
status = ["echo", "running {addr}"]
stop = ["true"]

[machines.mallory]
backend = "hold"
ssh_port = {holder_port}
host_key = "{host_key}"
boot_timeout = 30

[users.mallory]
authorized_keys_file = "client_key.pub"
machines = ["mallory"]
""")
    return fleet


class Gateway:
    def __init__(self, fleet, gw: ServeProcess, metrics_port: int):
        self.fleet, self.gw, self.metrics_port = fleet, gw, metrics_port

    @property
    def port(self) -> int:
        return self.gw.port

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.gw.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def open_fds(self) -> int:
        return len(list(Path(f"/proc/{self.gw.proc.pid}/fd").iterdir()))

    async def get(self, path: str) -> tuple[int, str]:
        import httpx

        try:
            async with httpx.AsyncClient(timeout=10) as client:
                r = await client.get(f"http://127.0.0.1:{self.metrics_port}{path}")
        except httpx.HTTPError as exc:
            return 0, repr(exc)
        return r.status_code, r.text

    async def metric(self, name: str, **labels: str) -> float:
        status, text = await self.get("/metrics")
        assert status == 200
        return sample(text, name, **labels) or 0.0

    async def login(self, user: str = "alice") -> tuple[float, int, str]:
        t0 = time.monotonic()
        try:
            r = await run(["ssh", "-b", INNOCENT_SOURCE, *self.fleet.ssh_opts(self.port), f"{user}@127.0.0.1",
                           "true"], timeout=LOGIN_TIMEOUT_S)
        except trio.TooSlowError:
            return time.monotonic() - t0, -1, f"no answer within {LOGIN_TIMEOUT_S} s"
        return time.monotonic() - t0, r.returncode, r.err

    def log(self) -> str:
        return "\n".join(self.gw.lines)


async def start_gateway(fleet, nursery, nofile: int = 1024) -> Gateway:
    gw = await ServeProcess(fleet.config_path, argv_prefix=["prlimit", f"--nofile={nofile}:{nofile}"]).start(nursery)
    line = await gw.wait_for("http listening address=")
    return Gateway(fleet, gw, int(line.split("address=127.0.0.1:", 1)[1].split()[0]))


async def quiet_median(gw: Gateway) -> float:
    """alice's median login without an attack, on this box now (it is shared and its load varies)."""
    times = []
    for _ in range(3):
        t, rc, err = await gw.login()
        assert rc == 0, err
        times.append(t)
    return statistics.median(times)


class Innocent:
    """alice logs in again and again from her own address until told to stop."""

    def __init__(self, gw: Gateway):
        self.gw = gw
        self.logins: list[tuple[float, int, str]] = []
        self.stop = trio.Event()
        self._grew = trio.Event()

    async def run(self) -> None:
        while not self.stop.is_set():
            self.logins.append(await self.gw.login())
            self._grew.set()
            self._grew = trio.Event()
            with trio.move_on_after(0.3):  # pacing between logins, not synchronisation
                await self.stop.wait()

    async def wait_logins(self, n: int) -> None:
        while len(self.logins) < n:
            await self._grew.wait()

    def check(self) -> float:
        failed = [(rc, err) for _, rc, err in self.logins if rc != 0]
        assert not failed, failed[:3]
        median = statistics.median(t for t, _, _ in self.logins)
        return median


def connect(port: int, user: str):
    return asyncssh.connect("127.0.0.1", port, username=user, client_keys=None, known_hosts=None,
                            agent_path=None, config=[], local_addr=(ATTACKER_SOURCE, 0))


# -- item 1: descriptors -------------------------------------------------------------------

async def jump_flood(port: int, key: str, connections: int, per_connection: int) -> tuple[list, int, list[str]]:
    """mallory's connections and jump channels; (connections, channels opened, refusal reasons)."""
    conns, reasons, opened = [], [], 0
    for _ in range(connections):
        try:
            conn = await asyncssh.connect("127.0.0.1", port, username="mallory", client_keys=[key],
                                          known_hosts=None, agent_path=None, config=[],
                                          local_addr=(ATTACKER_SOURCE, 0))
        except (asyncssh.Error, OSError) as exc:
            reasons.append(f"connect: {exc}")
            continue
        conns.append(conn)

        async def one(conn=conn) -> bool:
            try:
                await conn.open_connection("mallory", 22)  # what `ssh -J gw mallory` asks for
                return True
            except asyncssh.ChannelOpenError as exc:
                reasons.append(exc.reason)
                return False
            except (asyncssh.Error, OSError) as exc:
                reasons.append(f"error: {exc}")
                return False

        opened += sum(await asyncio.gather(*(one() for _ in range(per_connection))))
    return conns, opened, reasons


async def press(conns: list, reasons: list[str]) -> None:
    """Keep asking for one more jump (50 a second): a descriptor that comes free is taken at once."""
    i = 0
    while conns:
        conn = conns[i % len(conns)]
        i += 1
        try:
            await trio_asyncio.aio_as_trio(conn.open_connection)("mallory", 22)
        except asyncssh.ChannelOpenError as exc:
            reasons.append(exc.reason)
        except (asyncssh.Error, OSError) as exc:
            reasons.append(f"error: {exc}")
        await trio.sleep(0.02)  # pacing of the attack, not synchronisation


async def test_one_user_cannot_exhaust_the_descriptors(tmp_path, nursery, many_fds):
    holder = Holder()
    await nursery.start(holder.serve)
    fleet = write_config(tmp_path, holder.port)
    gw = await start_gateway(fleet, nursery)
    t, rc, err = await gw.login()  # alice's machine is up before the attack
    assert rc == 0, err
    quiet = await quiet_median(gw)
    innocent = Innocent(gw)
    conns: list = []
    try:
        async with trio_asyncio.open_loop(), trio.open_nursery() as inner:
            try:
                inner.start_soon(innocent.run)
                with trio.fail_after(180):
                    conns, opened, reasons = await trio_asyncio.aio_as_trio(jump_flood)(
                        gw.port, str(fleet.client_key), 17, 60)
                    inner.start_soon(press, conns, reasons)  # then mallory grabs whatever comes free
                    fds_during = gw.open_fds()
                    healthz = await gw.get("/healthz")
                    await innocent.wait_logins(len(innocent.logins) + 5)  # alice keeps logging in meanwhile
                    innocent.stop.set()
                    inner.cancel_scope.cancel()
            finally:
                for c in conns:
                    c.abort()
        median = innocent.check()
        print(f"\nrefusals: {sorted(set(reasons))}")
        print(f"\nmallory: {len(conns)} connections, {opened} jump channels opened, {len(reasons)} refused; "
              f"gateway fds {fds_during} of 1024; alice: {len(innocent.logins)} logins, median {median:.2f} s, "
              f"max {max(t for t, _, _ in innocent.logins):.2f} s (without the attack {quiet:.2f} s); "
              f"/healthz {healthz[0]}")
        assert median < max(LOGIN_MEDIAN_S, QUIET_FACTOR * quiet), (median, quiet)
        assert healthz == (200, "ok\n")
        # mallory is stopped by her own budgets (whichever binds first: her jumps' windows or her
        # descriptors), each refusal naming its key; the gateway's totals are never reached.
        assert reasons and all("limits.fds_per_user" in r or "limits.buffer_per_user" in r for r in reasons), \
            reasons[:3]
        assert any("limits.fds_per_user" in r for r in reasons), set(reasons)
        assert opened + 2 * len(conns) <= await gw.metric("fleetgate_budget_limit", budget="fds", scope="user")
        refused = [await gw.metric("fleetgate_budget_refusals_total", budget=kind, scope=scope)
                   for kind in ("fds", "buffer") for scope in ("user", "gateway")]
        assert refused[0] > 0 and refused[1] == refused[3] == 0
        # (the last refusal may be counted by the gateway after mallory's task was cancelled)
        assert len(reasons) <= refused[0] + refused[2] <= len(reasons) + 1
        assert fds_during < 1024 - 96  # the reserve was never touched
        assert await gw.metric("fleetgate_loop_errors_total", kind="accept_descriptors") == 0
        with trio.fail_after(30):  # all of it is given back
            while await gw.metric("fleetgate_budget_used", budget="fds") != 0 or holder.held:
                await trio.sleep(0.2)  # the gateway closes the jumps' sockets: nothing to await on here
        assert "stopped outside fleetgate" not in gw.log()
        assert gw.gw.proc.returncode is None
        assert not [ln for ln in gw.gw.lines if "Traceback" in ln], gw.log()[-3000:]
    finally:
        await gw.gw.kill()


# -- item 2: buffered bytes ----------------------------------------------------------------

async def forward_flood(port: int, key: str, dest_port: int, connections: int,
                        per_connection: int) -> tuple[list, int, list[str]]:
    """bob's -L channels with a huge window; then his client stops reading its sockets."""
    conns, reasons, opened = [], [], 0
    for _ in range(connections):
        conn = await asyncssh.connect("127.0.0.1", port, username="bob", client_keys=[key], known_hosts=None,
                                      agent_path=None, config=[], local_addr=(ATTACKER_SOURCE, 0))
        conns.append(conn)

        async def one(conn=conn) -> bool:
            try:
                await conn.create_connection(asyncssh.SSHTCPSession, "localhost", dest_port, window=HUGE_WINDOW)
                return True
            except asyncssh.ChannelOpenError as exc:
                reasons.append(exc.reason)
                return False

        opened += sum(await asyncio.gather(*(one() for _ in range(per_connection))))
    await asyncio.sleep(0.5)  # let the data flow, then stop reading
    for conn in conns:
        conn._transport.pause_reading()  # noqa: SLF001  the attacker: a client that never reads
    return conns, opened, reasons


async def test_one_user_cannot_grow_the_gateway(tmp_path, nursery, many_fds):
    holder, firehose = Holder(), Firehose()
    await nursery.start(holder.serve)
    await nursery.start(firehose.serve)
    fleet = write_config(tmp_path, holder.port)
    gw = await start_gateway(fleet, nursery)
    for user in ("alice", "bob"):  # both machines up, both upstream logins made once
        t, rc, err = await gw.login(user)
        assert rc == 0, err
    quiet = await quiet_median(gw)
    start = gw.rss_mib()
    innocent = Innocent(gw)
    conns: list = []
    peak = start
    try:
        async with trio_asyncio.open_loop(), trio.open_nursery() as inner:
            try:
                inner.start_soon(innocent.run)
                with trio.fail_after(180):
                    conns, opened, reasons = await trio_asyncio.aio_as_trio(forward_flood)(
                        gw.port, str(fleet.client_key), firehose.port, 8, 64)
                    logins_before = len(innocent.logins)
                    deadline = trio.current_time() + 8
                    while trio.current_time() < deadline:  # watching RSS over time is the point here
                        peak = max(peak, gw.rss_mib())
                        if peak > RSS_BOUND_MIB:
                            break  # stop the attack at once: an unbounded gateway would eat the test host
                        await trio.sleep(0.2)
                    await innocent.wait_logins(logins_before + 3)
                    buffered = await gw.metric("fleetgate_budget_user_max", budget="buffer")  # bob's
                    innocent.stop.set()
            finally:
                for c in conns:
                    c.abort()
        assert peak <= RSS_BOUND_MIB, f"gateway RSS {peak:.0f} MiB (start {start:.0f})"
        median = innocent.check()
        with trio.fail_after(30):
            while await gw.metric("fleetgate_budget_used", budget="buffer") != 0:
                await trio.sleep(0.2)  # the gateway's side closes on its own; nothing to await on here
        after = gw.rss_mib()
        deadline = trio.current_time() + 15
        while after - start > RSS_RETURN_MIB and trio.current_time() < deadline:
            await trio.sleep(0.5)  # the trim task runs once a second
            after = gw.rss_mib()
        print(f"\nbob: {opened} -L channels opened, {len(reasons)} refused; buffer budget held "
              f"{buffered / MiB:.0f} MiB; gateway RSS start {start:.0f} MiB, peak {peak:.0f}, after {after:.0f}; "
              f"alice: {len(innocent.logins)} logins, median {median:.2f} s (without the attack {quiet:.2f} s)")
        assert median < max(LOGIN_MEDIAN_S, QUIET_FACTOR * quiet), (median, quiet)
        assert reasons and all("limits.buffer_per_user" in r or "limits.channels_per_user" in r
                               for r in reasons), reasons[:3]
        assert await gw.metric("fleetgate_budget_refusals_total", budget="buffer", scope="user") > 0
        assert buffered <= await gw.metric("fleetgate_budget_limit", budget="buffer", scope="user")
        assert after - start <= RSS_RETURN_MIB, f"RSS {after:.0f} MiB after, {start:.0f} at start"
        assert gw.gw.proc.returncode is None
    finally:
        await gw.gw.kill()


# -- item 10: the budgets follow a changed open-file limit ---------------------------------
# (raising is the same path: raise_soft_limit() and the derived budgets are recomputed on SIGHUP)

async def test_sighup_rereads_the_open_file_limit(tmp_path, nursery):
    import signal

    from fleetgate import budget, fdlimit

    holder = Holder()
    await nursery.start(holder.serve)
    fleet = write_config(tmp_path, holder.port)
    gw = await start_gateway(fleet, nursery, nofile=2048)
    try:
        def expected(limit: int) -> int:
            return budget.resolve(fd_limit=limit, memory=budget.memory_bytes(),
                                  max_unauthenticated=fdlimit.default_max_unauthenticated(limit),
                                  http_connections=fdlimit.default_http_connections(limit),
                                  max_connections_per_user=64, max_channels=64).fds_total

        assert await gw.metric("fleetgate_fd_limit") == 2048
        assert await gw.metric("fleetgate_budget_limit", budget="fds", scope="gateway") == expected(2048)
        # The operator lowers it under the running gateway (raising another process's hard limit
        # needs CAP_SYS_RESOURCE, which the test may not have), then reloads.
        r = await run(["prlimit", "--pid", str(gw.gw.proc.pid), "--nofile=1024:1024"])
        assert r.returncode == 0, r.err
        gw.gw.proc.send_signal(signal.SIGHUP)
        await gw.gw.wait_for("config reloaded")
        assert "open-file limit changed limit=1024 (was 2048" in gw.log()
        with trio.fail_after(10):  # /metrics may answer from a copy up to 1 s old
            while await gw.metric("fleetgate_fd_limit") != 1024:
                await trio.sleep(0.2)
        assert await gw.metric("fleetgate_budget_limit", budget="fds", scope="gateway") == expected(1024) == 628
        assert await gw.metric("fleetgate_unauthenticated_connections_limit") == \
            fdlimit.default_max_unauthenticated(1024)
        t, rc, err = await gw.login()
        assert rc == 0, err
    finally:
        await gw.gw.kill()

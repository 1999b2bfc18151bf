"""The container image, built from this checkout with podman and run for real (issue 19).

No image registry is reachable here, so the base image is built too: a debootstrap root with
python3 and python3-venv from this machine's Debian mirror (scripts/debian-root.sh, cached
outside the checkout), imported with `podman import` and passed as the Dockerfile's BASE.
The Dockerfile installs requirements-runtime.lock into /opt/fleetgate the same way on it as
on the official python image.

Each test runs the image the way the Dockerfile's header says (config directory read-only
at /etc/fleetgate, a named volume at /var/lib/fleetgate, the image's own command), on the
host's network namespace and loopback only, with a config of one HTTP-backend machine: the
seed's VM API (tests/test_backend_http.py's VmApi) that starts a real sshd on the host.
The real `ssh alice@127.0.0.1 -p PORT` goes through the container to that machine.

podman runs with `--runtime runc --ulimit nofile=1024:1024 --ulimit nproc=1024:1024` (crun
refuses this host's cgroup layout). Where podman cannot run a container at all the module
is skipped with podman's own reason; where podman is missing it fails (CI installs it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import MappingProxyType

import pytest
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import REPO, Session, fetch_metrics, free_port, make_fleet, run, sample  # noqa: E402
from test_backend_http import JSON_TOKEN, VmApi, vm_machine  # noqa: E402

from fleetgate.backends.base import PowerState  # noqa: E402
from fleetgate.backends.process import ProcessBackend  # noqa: E402
from fleetgate.config import BackendConfig  # noqa: E402

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

pytestmark = pytest.mark.e2e

RUNTIME = ["--runtime", "runc"]
LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
# One tag per checkout, so that two checkouts' test runs do not build over each other's image.
IMAGE = f"localhost/fleetgate-e2e:{hashlib.sha256(str(REPO).encode()).hexdigest()[:12]}"
UID = 10001          # the Dockerfile's USER
DRAIN = 5            # gateway.drain_timeout in the test config, seconds
MACHINE = "dev-alice"


def podman(*args: str) -> list[str]:
    return ["podman", *RUNTIME, *args]


def sh(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def say(config: pytest.Config, line: str) -> None:
    """A line on the terminal even without -s (build timings, skip reasons)."""
    capture = config.pluginmanager.get_plugin("capturemanager")
    if capture is not None:
        with capture.global_and_fixture_disabled():
            print(f"\n{line}", file=sys.stderr, flush=True)
    else:  # pragma: no cover
        print(line, file=sys.stderr)


def host_ca_bundle() -> str | None:
    """The CA bundle this host's pip trusts, if it names one (a TLS-intercepting proxy)."""
    for var in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
        path = os.environ.get(var)
        if path and os.path.isfile(path):
            return path
    return None


@pytest.fixture(scope="module")
def image(request: pytest.FixtureRequest) -> str:
    """The base (debootstrap, cached), then the image built from this checkout."""
    for tool in ("podman", "runc", "debootstrap"):  # missing: a broken set-up, not a reason to skip
        assert shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin"), \
            f"{tool} is a test dependency (scripts/setup.sh installs it)"
    t0 = time.monotonic()
    r = sh([str(REPO / "scripts" / "debian-root.sh"), "python3", "python3-venv"], timeout=1200)
    if r.returncode != 0 and "needs root" in r.stderr:
        say(request.config, f"test_image_e2e: SKIPPED: {r.stderr.strip()}")
        pytest.skip(f"cannot build the base image here: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr
    tarball = Path(r.stdout.strip())
    base = f"localhost/fleetgate-test-base:{tarball.stem.rsplit('-', 1)[1]}"
    if sh(["podman", "image", "exists", base], timeout=60).returncode != 0:
        imp = sh(["podman", "import", "--quiet", str(tarball), base], timeout=600)
        assert imp.returncode == 0, imp.stderr
    base_secs = time.monotonic() - t0

    # Can podman run a container here at all? Try, and say why not.
    probe = sh(podman("run", "--rm", *LIMITS, "--network", "host", base, "python3", "-c",
                      "import venv; print('python3 and venv here')"), timeout=120)
    if probe.returncode != 0 or "python3 and venv here" not in probe.stdout:
        reason = f"podman cannot run a container here: {probe.stderr.strip()[-500:]}"
        say(request.config, f"test_image_e2e: SKIPPED: {reason}")
        pytest.skip(reason)

    t1 = time.monotonic()
    argv = podman("build", *LIMITS, "--network", "host", "--pull=never", "--format", "docker",
                  "--build-arg", f"BASE={base}", "--tag", IMAGE)
    ca = host_ca_bundle()
    if ca:
        argv += ["--secret", f"id=pip-ca,src={ca}"]
    b = sh([*argv, str(REPO)], timeout=1800)
    assert b.returncode == 0, b.stdout[-4000:] + b.stderr[-4000:]
    build_secs = time.monotonic() - t1
    say(request.config, f"test_image_e2e: base image {base} ready in {base_secs:.1f} s "
                        f"(debootstrap + import when not cached); image {IMAGE} built in {build_secs:.1f} s")
    return IMAGE


class Container:
    """One `podman run -d` of the image; its log (stdout and stderr) pumped into lines."""

    def __init__(self, name: str, argv: list[str]):
        self.name = name
        self.argv = argv
        self.lines: list[str] = []
        self._changed = trio.Event()
        self._eof = False
        self._logs: trio.Process | None = None

    async def start(self, nursery: trio.Nursery) -> "Container":
        r = await run(self.argv, timeout=120)
        assert r.returncode == 0, r.err
        self._logs = await trio.lowlevel.open_process(podman("logs", "--follow", self.name),
                                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                      stderr=subprocess.STDOUT)
        nursery.start_soon(self._pump)
        return self

    async def _pump(self) -> None:
        assert self._logs is not None and self._logs.stdout is not None
        buf = b""
        async with self._logs.stdout:
            while chunk := await self._logs.stdout.receive_some(65536):
                buf += chunk
                *done, buf = buf.split(b"\n")
                self.lines += [d.decode(errors="replace") for d in done]
                self._changed.set()
                self._changed = trio.Event()
        self._eof = True
        self._changed.set()

    async def wait_for(self, text: str, timeout: float = 60, after: int = 0) -> int:
        """The index of the first log line from `after` on that contains text."""
        with trio.fail_after(timeout):
            while True:
                for i in range(after, len(self.lines)):
                    if text in self.lines[i]:
                        return i
                if self._eof:
                    raise EOFError(f"container log ended before {text!r}:\n" + "\n".join(self.lines))
                await self._changed.wait()

    async def exec(self, *argv: str, timeout: float = 60):
        return await run(podman("exec", self.name, *argv), timeout=timeout)

    async def inspect(self) -> dict:
        r = await run(podman("inspect", "--type", "container", self.name), timeout=60)
        assert r.returncode == 0, r.err
        return json.loads(r.stdout)[0]

    async def remove(self) -> None:
        await run(podman("rm", "--force", "--time", "0", self.name), timeout=120)
        if self._logs is not None and self._logs.returncode is None:
            self._logs.kill()
            with trio.fail_after(10):
                await self._logs.wait()


def chown_for_container(path: Path) -> None:
    """Make the mounted config readable by the image's user (uid 10001), keys staying 0600."""
    if os.geteuid() == 0:
        for p in [path, *path.rglob("*")]:
            os.chown(p, UID, UID)
    else:  # rootless podman: the container's uids are this user's subuids
        r = sh(["podman", "unshare", "chown", "-R", f"{UID}:{UID}", str(path)], timeout=60)
        assert r.returncode == 0, r.stderr


class Setup:
    def __init__(self, container: Container, fleet, api: VmApi, etc: Path, ssh_port: int, metrics_port: int,
                 volume: str, machine_user: str):
        self.container, self.fleet, self.api, self.etc = container, fleet, api, etc
        self.machine_user = machine_user
        self.ssh_port, self.metrics_port, self.volume = ssh_port, metrics_port, volume

    def ssh(self, user: str, *command: str) -> list[str]:
        return ["ssh", *self.fleet.ssh_opts(self.ssh_port), f"{user}@127.0.0.1", *command]


def config_text(ssh_port: int, metrics_port: int, api: VmApi, vm_port: int, machine_user: str, host_key: str,
                users: str) -> str:
    return f"""# the image test's config: one machine behind the seed's VM API
[gateway]
listen = ["127.0.0.1:{ssh_port}"]
host_keys = ["gateway_host_key"]
upstream_key = "upstream_key"
state_dir = "/var/lib/fleetgate"
drain_timeout = {DRAIN}

[metrics]
listen = "127.0.0.1:{metrics_port}"

[backends.vmapi]
type = "http"
start_url = "{api.url('json')}"
stop_url = "{api.url('json', 'stop_vm')}"
status_url = "{api.url('json', 'status')}"
token_file = "api-token"

[machines.{MACHINE}]
backend = "vmapi"
user = "{machine_user}"
host_key = "{host_key}"
ssh_port = {vm_port}
boot_timeout = 30
{users}"""


USER_ALICE = f"""
[users.alice]
authorized_keys_file = "client_key.pub"
machines = ["{MACHINE}"]
"""
USER_BOB = USER_ALICE.replace("users.alice", "users.bob")


@pytest.fixture
async def setup(image, tmp_path, nursery):
    api = await nursery.start(VmApi().serve)
    fleet, _ = make_fleet(tmp_path, isolation="none")  # keys, and known_hosts for the gateway's key
    demo = tomllib.loads(fleet.config_path.read_text())["machines"]["alice"]
    vm_port = free_port()
    api.provider = ProcessBackend(BackendConfig("vm-provider", "process", MappingProxyType({"isolation": "none"})),
                                  Path, tmp_path / "vm-provider")
    api.vms = {"json": vm_machine(MACHINE, vm_port, fleet.dir)}

    etc = tmp_path / "etc"
    etc.mkdir()
    for name in ("gateway_host_key", "upstream_key", "client_key.pub"):
        shutil.copyfile(fleet.dir / name, etc / name)
        os.chmod(etc / name, 0o600 if not name.endswith(".pub") else 0o644)
    (etc / "api-token").write_text(JSON_TOKEN + "\n")
    os.chmod(etc / "api-token", 0o600)
    ssh_port, metrics_port = free_port(), free_port()
    (etc / "fleetgate.toml").write_text(config_text(ssh_port, metrics_port, api, vm_port, demo["user"],
                                                    demo["host_key"], USER_ALICE))
    chown_for_container(etc)

    name = f"fleetgate-e2e-{uuid.uuid4().hex[:10]}"
    volume = f"{name}-state"
    container = Container(name, podman(
        "run", "--detach", "--name", name, *LIMITS, "--network", "host",
        "--volume", f"{etc}:/etc/fleetgate:ro", "--volume", f"{volume}:/var/lib/fleetgate",
        # the metrics port is not the image's default 9180 (host network, shared machine)
        "--env", f"FLEETGATE_HEALTHCHECK_URL=http://127.0.0.1:{metrics_port}/healthz",
        image))
    try:
        await container.start(nursery)
        await container.wait_for("ssh listening ports=", timeout=60)
        await container.wait_for("http listening address=", timeout=30)
        yield Setup(container, fleet, api, etc, ssh_port, metrics_port, volume, demo["user"])
    finally:
        await container.remove()
        await run(["podman", "volume", "rm", "--force", volume], timeout=60)
        for vm in api.vms.values():
            await api.provider.stop(vm)


async def test_ssh_through_the_container_lands_on_the_machine(setup: Setup) -> None:
    """The real OpenSSH client, through the containerised gateway, to the VM the API started."""
    r = await run(setup.ssh("alice", 'echo "on $(hostname) port ${SSH_CONNECTION##* } as $(id -un)"'), timeout=90)
    vm_port = setup.api.vms["json"].options["port"]
    assert r.returncode == 0, r.err + "\n".join(setup.container.lines)
    # The machine's own sshd (on the host, at the port the API's VM listens on) ran the command.
    assert r.out == f"on {os.uname().nodename} port {vm_port} as {setup.machine_user}\n"
    assert f"fleetgate: starting {MACHINE} (http)" in r.err
    # The container called the VM API as the seed's contract says, with the token from its config.
    start = next(s for s in setup.api.seen if s.path == "/json/start_vm")
    assert json.loads(start.body) == {"machine": MACHINE}
    assert start.headers["authorization"] == f"Bearer {JSON_TOKEN}"
    assert await setup.api.provider.status(setup.api.vms["json"]) is PowerState.RUNNING
    # An interactive shell with a pty: the machine's shell answers line by line.
    shell = await run(["ssh", "-tt", *setup.fleet.ssh_opts(setup.ssh_port), "alice@127.0.0.1"],
                      stdin=b"echo shell-$((6 * 7))\nexit 3\n", timeout=60)
    assert shell.returncode == 3, shell.err
    assert "shell-42" in shell.out
    # A stranger's key does not get in.
    stranger = await run(setup.ssh("mallory", "true"), timeout=60)
    assert stranger.returncode == 255 and "Permission denied" in stranger.err


async def test_healthcheck_follows_the_gateway(setup: Setup) -> None:
    """HEALTHCHECK (the image's, run by podman in the container) is healthy while the gateway
    serves, and unhealthy while its process is stopped (SIGSTOP) and cannot answer."""
    c = setup.container
    alive = await c.exec("true")  # the health check is an exec: say so if exec itself fails
    assert alive.returncode == 0, ("podman exec failed", alive.returncode, alive.out, alive.err)
    hc = await run(podman("healthcheck", "run", c.name), timeout=60)
    assert hc.returncode == 0, (hc.out, hc.err)
    assert (await c.inspect())["State"]["Health"]["Status"] == "healthy"
    await run(podman("kill", "--signal", "STOP", c.name), timeout=30)
    try:
        hc = await run(podman("healthcheck", "run", c.name), timeout=60)
        assert hc.returncode != 0 and "unhealthy" in hc.out + hc.err, (hc.out, hc.err)
    finally:
        await run(podman("kill", "--signal", "CONT", c.name), timeout=30)
    hc = await run(podman("healthcheck", "run", c.name), timeout=60)
    assert hc.returncode == 0, (hc.out, hc.err)


async def test_sighup_reloads_the_mounted_config(setup: Setup) -> None:
    c = setup.container
    before = sample(await fetch_metrics(setup.metrics_port), "fleetgate_config_last_reload_success_timestamp_seconds")
    assert before is not None
    refused = await run(setup.ssh("bob", "true"), timeout=60)
    assert refused.returncode == 255 and "Permission denied" in refused.err
    toml = setup.etc / "fleetgate.toml"
    text = toml.read_text() + USER_BOB
    toml.write_text(text)  # the same inode: the read-only bind mount shows it
    mark = len(c.lines)
    await run(podman("kill", "--signal", "HUP", c.name), timeout=30)
    await c.wait_for("SIGHUP: reloading /etc/fleetgate/fleetgate.toml", timeout=30, after=mark)
    await c.wait_for("config reloaded users=2 machines=1", timeout=30, after=mark)
    text_metrics = await fetch_metrics(setup.metrics_port)
    after = sample(text_metrics, "fleetgate_config_last_reload_success_timestamp_seconds")
    assert after is not None and after > before
    assert sample(text_metrics, "fleetgate_config_reloads_total", result="success") == 1
    ok = await run(setup.ssh("bob", "echo bob-is-in"), timeout=90)
    assert (ok.returncode, ok.out) == (0, "bob-is-in\n"), ok.err


async def test_runs_as_non_root_and_writes_only_its_state_volume(setup: Setup) -> None:
    c = setup.container
    assert (await c.inspect())["Config"]["User"] == f"{UID}:{UID}"
    # The gateway itself (the container's pid 1, the image's ENTRYPOINT) runs as uid/gid 10001.
    r = await c.exec("cat", "/proc/1/status")
    assert r.returncode == 0 and "Uid:" in r.out, ("podman exec failed", r.returncode, r.out, r.err)
    status = r.out
    uids = next(ln for ln in status.splitlines() if ln.startswith("Uid:")).split()[1:]
    gids = next(ln for ln in status.splitlines() if ln.startswith("Gid:")).split()[1:]
    assert uids == [str(UID)] * 4 and gids == [str(UID)] * 4, status
    assert (await c.exec("cat", "/proc/1/cmdline")).out.split("\0")[:2] == ["/opt/fleetgate/bin/python",
                                                                             "/opt/fleetgate/bin/fleetgate"]
    write = "import sys\ntry:\n    open(sys.argv[1], 'w').write('x')\nexcept OSError as e:\n    print(e.strerror)\n" \
            "    sys.exit(1)\nprint('written')\n"
    site = "/opt/fleetgate/lib/python3.11/site-packages/fleetgate"
    for path in ("/", "/etc", "/etc/fleetgate", "/opt", "/opt/fleetgate/bin", site, "/usr/bin", "/root"):
        r = await c.exec("python", "-c", write, f"{path.rstrip('/')}/probe")
        assert r.returncode == 1, (path, r.out, r.err)
        assert r.out.strip() in ("Permission denied", "Read-only file system"), (path, r.out)
    # The code and the config cannot be changed in place either.
    for path in (f"{site}/__init__.py", "/etc/fleetgate/fleetgate.toml", "/opt/fleetgate/bin/fleetgate"):
        r = await c.exec("python", "-c", write.replace("'w'", "'a'"), path)
        assert r.returncode == 1, (path, r.out)
    r = await c.exec("python", "-c", write, "/var/lib/fleetgate/probe")
    assert (r.returncode, r.out) == (0, "written\n"), r.err
    # Every directory this user may write to (outside /proc, /sys, /dev): the state volume,
    # and the world-writable temporary directories every Debian root has.
    walk = ("import os\nfor top, dirs, files in os.walk('/'):\n"
            "    dirs[:] = [d for d in dirs if os.path.join(top, d) not in ('/proc', '/sys', '/dev')]\n"
            "    if os.access(top, os.W_OK): print(top)\n")
    writable = set((await c.exec("python", "-c", walk, timeout=120)).out.split())
    state = {p for p in writable if p == "/var/lib/fleetgate" or p.startswith("/var/lib/fleetgate/")}
    assert "/var/lib/fleetgate" in state
    assert writable - state <= {"/tmp", "/var/tmp", "/run/lock"}, writable - state
    # What the gateway writes is in the volume (its admin socket), and survives in it.
    assert "admin.sock" in (await c.exec("ls", "/var/lib/fleetgate")).out
    vol = await run(["podman", "volume", "inspect", setup.volume], timeout=60)
    assert vol.returncode == 0 and json.loads(vol.stdout)[0]["Name"] == setup.volume


async def test_stop_drains_then_exits_within_drain_timeout(setup: Setup, nursery) -> None:
    """`podman stop` (SIGTERM): new logins are refused, a live session keeps working and is
    told, and the gateway exits by itself (exit 0, not podman's SIGKILL) once drain_timeout
    (5 s here; docs: gateway.drain_timeout) has passed with the session still open."""
    c = setup.container
    session = await Session(setup.ssh("alice", "echo ready; cat")).open(nursery)
    stopped = trio.Event()
    result = {}

    async def stop() -> None:
        t = time.monotonic()
        result["stop"] = await run(podman("stop", "--time", "60", c.name), timeout=90)
        result["secs"] = time.monotonic() - t
        stopped.set()

    mark = len(c.lines)
    nursery.start_soon(stop)
    await c.wait_for("SIGTERM: draining", timeout=30, after=mark)
    await c.wait_for("draining connections=1", timeout=30, after=mark)
    await session.wait_err(b"the gateway is shutting down", timeout=20)
    assert await session.echo(b"still here while draining\n") == b"still here while draining\n"
    refused = await run(setup.ssh("alice", "true"), timeout=60)
    assert refused.returncode == 255, refused.err
    with trio.fail_after(DRAIN + 30):
        await stopped.wait()
    assert result["stop"].returncode == 0, result["stop"].err
    state = (await c.inspect())["State"]
    assert state["Status"] == "exited" and state["ExitCode"] == 0, state
    assert DRAIN - 1 <= result["secs"] < DRAIN + 15, result["secs"]
    await c.wait_for("drain timeout: closing connections=1", timeout=10, after=mark)
    with trio.fail_after(30):
        await session.proc.wait()

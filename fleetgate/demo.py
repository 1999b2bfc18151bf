"""`fleetgate demo`: a whole fleet on this machine, every key generated under one directory.

Two machines, alice and bob, are local sshds run by the process backend (stopped at
start). The directory is reused between runs so the known_hosts and client key written
there stay valid; the config it writes (fleetgate.toml) is an ordinary config file.
"""

from __future__ import annotations

import getpass
import os
import socket
import sys
from pathlib import Path

from . import private
from .keys import ensure_key, public_line

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEMO_USERS = ("alice", "bob")


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "fleetgate" / "demo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine_account(name: str) -> str:
    """The account an isolated demo machine runs as (created by the process backend)."""
    return f"fg-{name}"


def _known_host_names(port: int) -> list[str]:
    return ["127.0.0.1", "localhost"] if port == 22 else [f"[127.0.0.1]:{port}", f"[localhost]:{port}"]


def prepare(state_dir: Path, port: int, metrics_port: int | None, boot_delay: float = 0.0,
            idle_timeout: float | None = None, min_uptime: float | None = None, isolation: str = "auto",
            broken: bool = False) -> Path:
    """Write keys and fleetgate.toml under state_dir; return the config path.

    isolation: "auto" (isolate where this host allows it, else opt in to "none"), "namespaces"
    (always; serve refuses where it cannot) or "none" (machines run as the gateway's account).
    broken: also a machine `broken` whose sshd is /bin/false, that alice may log in to
    (`alice+broken`): the documented way to make a wake fail (`fleetgate demo --monitoring`)."""
    d = state_dir
    private.makedirs(d)   # 0700 whatever the umask (keys and the config live here)
    host_key = ensure_key(d / "gateway_host_key", "fleetgate-demo-gateway")
    upstream_key = ensure_key(d / "upstream_key", "fleetgate-demo-upstream")
    client_key = ensure_key(d / "client_key", "fleetgate-demo-client")
    host_line = public_line(host_key)
    known = [f"{n} {host_line}" for n in _known_host_names(port)]
    # Machines are isolated (own namespaces, own account fg-NAME) where this host allows it;
    # elsewhere (not root) the demo opts in to isolation = "none", and says so loudly.
    from .backends.process import isolation_problem

    if isolation == "auto":
        problem = isolation_problem()
    elif isolation == "none":
        problem = "asked for with --isolation none"
    else:
        problem = None
    me = getpass.getuser()
    ports_file = d / "machine_ports"
    ports = {}
    if ports_file.exists():
        for line in ports_file.read_text().split():
            name, _, p = line.partition("=")
            ports[name] = int(p)
    machines = []
    timeouts = "".join(f"{k} = {v:g}\n" for k, v in (("idle_timeout", idle_timeout), ("min_uptime", min_uptime))
                       if v is not None)
    for name in DEMO_USERS:
        mdir = d / "machines" / name
        mkey = ensure_key(mdir / "ssh_host_ed25519_key", f"fleetgate-demo-{name}")
        # The gateway's key, and the client's too so that jump mode (end to end) works.
        private.write_text(mdir / "authorized_keys", public_line(upstream_key) + "\n" + public_line(client_key) + "\n")
        known.append(f"{name} {public_line(mkey)}")  # for jump mode: ssh -J ... {me}@{name}
        ports.setdefault(name, _free_port())
        machines.append(f"""
[machines.{name}]
backend = "local"
user = "{me if problem else machine_account(name)}"
host_key = "{public_line(mkey)}"
port = {ports[name]}
host_key_file = "machines/{name}/ssh_host_ed25519_key"
authorized_keys_file = "machines/{name}/authorized_keys"
boot_timeout = {max(30.0, boot_delay + 30):g}
{timeouts}""")
    if broken:  # every wake fails with start_error: the sshd exits at once
        alice = machines[0].replace("[machines.alice]", "[machines.broken]").replace('backend = "local"',
                                                                                     'backend = "broken"')
        ports.setdefault("broken", _free_port())
        alice = alice.replace(f"port = {ports['alice']}\n", f"port = {ports['broken']}\n")
        machines.append(alice)
    private.write_text(d / "known_hosts", "".join(line + "\n" for line in known))
    private.write_text(ports_file, "".join(f"{k}={v}\n" for k, v in ports.items()))
    users = "".join(f"""
[users.{name}]
authorized_keys_file = "client_key.pub"
machines = ["{name}"{', "broken"' if broken and name == "alice" else ""}]
""" for name in DEMO_USERS)
    isolation = "" if problem is None else (
        f'# Machines are not isolated ({problem}):\n'
        f'# every demo machine runs as {me}, the gateway\'s own account.\nisolation = "none"\n')
    metrics = f'\n[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n' if metrics_port is not None else ""
    broken_backend = "" if not broken else (
        '\n# fleetgate demo --monitoring: a machine whose wake always fails (its "sshd" exits at once)\n'
        f'[backends.broken]\ntype = "process"\nsshd = "/bin/false"\n{isolation}')
    text = f"""# Written by `fleetgate demo`; an ordinary fleetgate config (see docs/config.example.toml).
[gateway]
listen = ["127.0.0.1:{port}"]
host_keys = ["gateway_host_key"]
upstream_key = "upstream_key"
state_dir = "state"
{metrics}
[backends.local]
type = "process"
start_delay = {boot_delay:g}
{isolation}{broken_backend}{''.join(machines)}{users}"""
    cfg = d / "fleetgate.toml"
    private.write_text(cfg, text)
    return cfg


def isolation_mode(state_dir: Path) -> tuple[str, str]:
    """(mode line for the user, the machines' user) from the demo's fleetgate.toml."""
    doc = tomllib.loads((state_dir / "fleetgate.toml").read_text())
    backend = doc["backends"]["local"]
    user = doc["machines"]["alice"]["user"]
    if backend.get("isolation", "namespaces") == "none":
        return ("mode: NOT ISOLATED (isolation = \"none\"): machines run as the gateway's own account "
                f"({user}) on its network; any demo user can read the gateway's keys. Run as root to isolate."), user
    return ("mode: isolated: each machine has its own network, mount and pid namespaces and its own account "
            "(fg-alice, fg-bob)"), user


def instructions(state_dir: Path, port: int, metrics_port: int | None) -> str:
    d = state_dir
    mode, machine_user = isolation_mode(d)
    base = f"ssh -p {port} -i {d}/client_key -o UserKnownHostsFile={d}/known_hosts -o IdentitiesOnly=yes"
    lines = [
        f"fleetgate demo: gateway on 127.0.0.1:{port}, machines alice and bob (stopped until you log in)",
        mode,
        "try:",
        f"  {base} alice@127.0.0.1 'hostname; echo hello from alice'",
        f"  {base} bob@127.0.0.1",
        f"  ssh -i {d}/client_key -o UserKnownHostsFile={d}/known_hosts -o IdentitiesOnly=yes "
        f"-o ProxyCommand='{base} -W %h:%p alice@127.0.0.1' {machine_user}@alice   # jump mode, end to end",
    ]
    if metrics_port is not None:
        lines.append(f"  curl -s 127.0.0.1:{metrics_port}/metrics | grep ^fleetgate_")
    lines.append("Ctrl-C stops the gateway and its machines.")
    return "\n".join(lines)

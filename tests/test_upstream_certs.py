"""The gateway as an SSH CA for its machines, and host certificates for upstream verification."""

from __future__ import annotations

import subprocess
import time

import asyncssh
import pytest
import trio
import trio_asyncio

from fleetgate import transport
from fleetgate.keys import ensure_key
from fleetgate.ssh.certs import CertPolicy, sign_session_key
from helpers import make_fleet, run, start_gateway

pytestmark = pytest.mark.e2e


def _setup(tmp_path):
    ca = ensure_key(tmp_path / "upstream_ca", "fleetgate-upstream-ca")
    empty = tmp_path / "no_authorized_keys"
    empty.write_text("")

    def patch(doc):
        doc["gateway"]["upstream_ca_key"] = str(tmp_path / "upstream_ca")
        m = doc["machines"]["alice"]
        m["upstream_auth"] = "certificate"
        m["cert_validity"] = 120
        m["trusted_user_ca_keys_file"] = str(tmp_path / "upstream_ca.pub")
        m["authorized_keys_file"] = str(empty)  # only the CA line: no gateway key installed

    return ca, patch


async def _login(address, user: str, key, cert) -> str:
    """Log in to the machine's sshd directly (through its own network namespace when isolated)."""
    sock = await transport.open_stream(address)

    async def attempt():
        async with asyncssh.connect(None, sock=sock, username=user, client_keys=[(key, cert)], known_hosts=None,
                                    config=None, agent_path=None) as conn:
            return (await conn.run("echo in", check=True)).stdout

    try:
        return await trio_asyncio.aio_as_trio(attempt)()
    except asyncssh.PermissionDenied:
        return "denied"


async def test_session_with_only_the_ca_line_and_refused_bad_certificates(tmp_path, nursery):
    ca, patch = _setup(tmp_path)
    fleet, cfg = make_fleet(tmp_path, patch=patch)
    await start_gateway(nursery, fleet, cfg)
    r = await run(fleet.ssh("alice", "echo via-certificate"))
    assert (r.returncode, r.out) == (0, "via-certificate\n"), r.err

    address = fleet.machine("alice").address
    user = cfg.machines["alice"].user
    policy = CertPolicy(validity=120)
    async with trio_asyncio.open_loop():
        with trio.fail_after(30):
            assert await _login(address, user, *sign_session_key(ca, user, "control", policy)) == "in\n"
            expired = sign_session_key(ca, user, "expired", policy, now=time.time() - 3600)
            assert await _login(address, user, *expired) == "denied"
            wrong = sign_session_key(ca, "mallory", "wrong-principal", policy)
            assert await _login(address, user, *wrong) == "denied"


def _host_cert_patch(tmp_path, trusted: str):
    """bob's sshd presents a host certificate signed by host_ca; the gateway trusts `trusted`
    (host_ca or other_ca) and pins no key: only a CA can vouch for bob. The certificate names
    bob by address and by name: an isolated process machine (reached in its own network
    namespace) is verified by its machine name, like a VSOCK one."""
    for name in ("host_ca", "other_ca"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / name)], check=True)

    def patch(doc):
        m = doc["machines"]["bob"]
        hk = tmp_path / "fleet" / "machines" / "bob" / "ssh_host_ed25519_key"
        subprocess.run(["ssh-keygen", "-q", "-s", str(tmp_path / "host_ca"), "-I", "bob", "-h", "-n", "127.0.0.1,bob",
                        f"{hk}.pub"], check=True, capture_output=True)
        m["host_certificate_file"] = f"{hk}-cert.pub"
        del m["host_key"]
        m["host_ca_key"] = (tmp_path / f"{trusted}.pub").read_text().strip()

    return patch


async def test_host_certificate_from_a_host_ca(tmp_path, nursery):
    fleet, cfg = make_fleet(tmp_path, patch=_host_cert_patch(tmp_path, "host_ca"))
    await start_gateway(nursery, fleet, cfg)
    r = await run(fleet.ssh("bob", "echo vouched"))
    assert (r.returncode, r.out) == (0, "vouched\n"), r.err


async def test_host_certificate_from_an_unknown_ca_is_refused(tmp_path, nursery):
    fleet, cfg = make_fleet(tmp_path, patch=_host_cert_patch(tmp_path, "other_ca"))
    await start_gateway(nursery, fleet, cfg)
    r = await run(fleet.ssh("bob", "echo no"))
    assert r.returncode == 255
    assert "fleetgate: host key of bob changed; refusing to connect" in r.err

"""Opt-in password passthrough: the machine's own sshd checks the password.

The machine is a real sshd (process backend) with PasswordAuthentication; the account
is a dedicated system user the test creates once (tests run as root, as CI does).
"""

from __future__ import annotations

import logging
import secrets
import subprocess
from pathlib import Path

import pytest

from helpers import make_fleet, run, start_gateway
from logsecrets import token

ACCOUNT = "fgpwtest"

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def account() -> tuple[str, str]:
    if subprocess.run(["id", ACCOUNT], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/bin/sh",
                        ACCOUNT], check=True)
    password = token("pw-" + secrets.token_hex(8))
    subprocess.run(["chpasswd"], input=f"{ACCOUNT}:{password}\n".encode(), check=True)
    return ACCOUNT, password


def askpass(tmp_path: Path, password: str) -> dict[str, str]:
    script = tmp_path / "askpass.sh"
    script.write_text(f"#!/bin/sh\necho '{password}'\n")
    script.chmod(0o700)
    return {"SSH_ASKPASS": str(script), "SSH_ASKPASS_REQUIRE": "force", "DISPLAY": ":0"}


def password_ssh(fleet, user: str, *command: str) -> list[str]:
    opts = fleet.ssh_opts()
    i = opts.index("BatchMode=yes")
    del opts[i - 1:i + 1]
    return ["ssh", *opts, "-o", "BatchMode=no", "-o", "PubkeyAuthentication=no",
            "-o", "PreferredAuthentications=password", "-o", "NumberOfPasswordPrompts=1",
            f"{user}@127.0.0.1", *command]


def patch_for(account: str, per_source: int = 5):
    def patch(doc):
        m = doc["machines"]["alice"]
        m["user"] = account
        m["password_passthrough"] = True
        m["password_authentication"] = True
        doc["users"]["alice"].pop("authorized_keys_file")  # alice has no key at all
        doc["limits"] = {"password_per_source_per_minute": per_source}
    return patch


async def test_password_goes_to_the_machine_and_never_into_logs(tmp_path, nursery, account, caplog):
    caplog.set_level(logging.DEBUG)
    user, password = account
    fleet, cfg = make_fleet(tmp_path, patch=patch_for(user))
    await start_gateway(nursery, fleet, cfg)
    r = await run(password_ssh(fleet, "alice", "id -un"), env=askpass(tmp_path, password))
    assert (r.returncode, r.out) == (0, f"{user}\n"), r.err
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    r = await run(password_ssh(fleet, "alice", "true"), env=askpass(wrong, "not-" + password))
    assert r.returncode == 255 and "Permission denied" in r.err
    assert fleet.metric("fleetgate_auth_failures_total", method="password") >= 1
    # A user whose machine has no password passthrough cannot use a password at all.
    r = await run(password_ssh(fleet, "bob", "true"), env=askpass(tmp_path, password))
    assert r.returncode == 255
    assert fleet.machine("bob").state.value == "stopped"
    assert password not in caplog.text


async def test_password_attempts_are_rate_limited_per_source(tmp_path, nursery, account):
    user, password = account
    fleet, cfg = make_fleet(tmp_path, patch=patch_for(user, per_source=2))
    await start_gateway(nursery, fleet, cfg)
    env = askpass(tmp_path, "wrong-" + password)
    for _ in range(2):
        assert (await run(password_ssh(fleet, "alice", "true"), env=env)).returncode == 255
    starts = fleet.backend_calls("start")
    r = await run(password_ssh(fleet, "alice", "true"), env=askpass(tmp_path, password))
    assert r.returncode == 255  # even the right password: this source spent its budget
    assert fleet.metric("fleetgate_preauth_refusals_total", reason="password_rate") == 1
    assert fleet.backend_calls("start") == starts


async def test_a_wrong_password_does_not_escape_the_login_grace(tmp_path, nursery, account):
    """After a wrong password the connection is still unauthenticated: counted by the
    pre-auth limits and closed at its login grace, however long the client waits."""
    import trio

    user, password = account

    def patch(doc):
        patch_for(user)(doc)
        doc["gateway"]["login_grace"] = 4

    fleet, cfg = make_fleet(tmp_path, patch=patch)
    running = await start_gateway(nursery, fleet, cfg)
    # askpass: a wrong password first, then it never answers (the client just holds on).
    script = tmp_path / "askpass.sh"
    script.write_text(f"#!/bin/sh\nif [ -e {tmp_path}/asked ]; then exec sleep 600; fi\n"
                      f"touch {tmp_path}/asked\necho 'wrong-{password}'\n")
    script.chmod(0o700)
    argv = password_ssh(fleet, "alice", "true")
    argv[argv.index("NumberOfPasswordPrompts=1")] = "NumberOfPasswordPrompts=3"
    env = {"SSH_ASKPASS": str(script), "SSH_ASKPASS_REQUIRE": "force", "DISPLAY": ":0"}
    t0 = trio.current_time()
    async with trio.open_nursery() as inner:
        proc = await inner.start(lambda task_status: trio.run_process(
            argv, env={**__import__("os").environ, **env}, check=False, capture_stderr=True,
            capture_stdout=True, task_status=task_status))
        with trio.fail_after(60):
            while not (tmp_path / "asked").exists() or not fleet.metric("fleetgate_auth_failures_total",
                                                                          method="password"):
                await trio.sleep(0.05)  # the client's progress is only visible from outside
        assert running.gateway.limiter.unauthenticated == 1  # still counted while it waits
        with trio.fail_after(20):
            while running.gateway.connections:
                await running.gateway.connections_changed.wait()
        elapsed = trio.current_time() - t0
        inner.cancel_scope.cancel()  # the client itself still waits for its askpass
    assert elapsed < 4 + 4 + 3, elapsed  # its grace (+ the sweep's bound), not the askpass's 600 s
    assert fleet.metric("fleetgate_connections_total", result="preauth_timeout") == 1
    assert running.gateway.limiter.unauthenticated == 0


async def test_password_guesses_count_per_target_account(tmp_path, nursery, account):
    """Issue 25 item 10: two gateway users (or one user's `alice+machine`) that reach the same
    account on the same machine share one guessing budget, limits.password_per_account_per_minute."""
    user, password = account

    def patch(doc):
        patch_for(user, per_source=20)(doc)
        doc["limits"].update(password_per_user_per_minute=20, password_per_account_per_minute=2)
        doc["users"]["carol"] = {"machines": ["alice"]}  # carol lands on alice's machine, same account
    fleet, cfg = make_fleet(tmp_path, patch=patch)
    await start_gateway(nursery, fleet, cfg)
    wrong = askpass(tmp_path, "wrong-" + password)
    assert (await run(password_ssh(fleet, "alice", "true"), env=wrong)).returncode == 255
    assert (await run(password_ssh(fleet, "alice+alice", "true"), env=wrong)).returncode == 255
    right = tmp_path / "right"
    right.mkdir()
    r = await run(password_ssh(fleet, "carol", "true"), env=askpass(right, password))
    assert r.returncode == 255, "carol guessed on an account whose budget alice's logins had spent"
    assert fleet.metric("fleetgate_preauth_refusals_total", reason="password_rate") == 1

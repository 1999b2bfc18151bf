"""The device backend without sockets: `fleetgate check` on its keys, and the tunnel bookkeeping."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import trio
import trio.testing

from fleetgate.backends.base import PowerState
from fleetgate.backends.device import DeviceBackend
from fleetgate.config import ConfigError, load
from fleetgate.settings import BackendConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cli_check import place, write_keys  # noqa: E402

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICM+uEnuSxvwdub7vQZXbetpHASLy/l4rTd2OJHp2FOc dev1"


def with_device(tmp_path: Path, machine: str) -> Path:
    write_keys(tmp_path)
    path = place(tmp_path, "valid.toml")
    path.write_text(path.read_text() + '\n[backends.devices]\ntype = "device"\n\n[machines.dev1]\nbackend = "devices"\n'
                    f'host_key = "{KEY}"\n' + machine)
    return path


def test_a_valid_device_machine(tmp_path: Path) -> None:
    cfg = load(with_device(tmp_path, f'device_keys = ["{KEY}"]\nwake_url = "http://meta/wake"\n'))
    assert cfg.machines["dev1"].options["device_keys"] == [KEY]


@pytest.mark.parametrize("machine, expected", [
    ('wake_url = "http://m/w"\n', "key 'machines.dev1.device_keys': missing; the device's public key"),
    (f'device_keys = "{KEY}"\n', "key 'machines.dev1.wake_url': missing; give wake_url or wake_command"),
    (f'device_keys = "nope"\nwake_url = "http://m/w"\n', "key 'machines.dev1.device_keys': 'nope...' is not an OpenSSH public key"),
    (f'device_keys = "{KEY}"\nwake_url = "http://m/w"\nwake_command = ["x"]\n',
     "key 'machines.dev1.wake_command': give wake_url or wake_command, not both"),
    (f'device_keys = "{KEY}"\nwake_url = "file:///x"\n', "key 'machines.dev1.wake_url': must be an http:// or https:// URL"),
    (f'device_keys = "{KEY}"\nwake_command = "echo"\n', "key 'machines.dev1.wake_command': must be a list of strings"),
])
def test_check_names_the_device_key(tmp_path: Path, machine: str, expected: str) -> None:
    path = with_device(tmp_path, machine)
    with pytest.raises(ConfigError) as exc:
        load(path)
    assert any(str(i).startswith(f"{path}: {expected}") for i in exc.value.issues), exc.value.issues


async def test_tunnels_up_down_and_loss(tmp_path: Path) -> None:
    cfg = load(with_device(tmp_path, f'device_keys = "{KEY}"\nwake_command = ["true"]\n'))
    backend = DeviceBackend(BackendConfig("devices", "device", {}), lambda p: None, tmp_path)
    exited, closed = [], []
    backend.on_machine_exited = exited.append
    m = cfg.machines["dev1"]
    assert await backend.status(m) is PowerState.STOPPED
    async with trio.open_nursery() as n:
        n.start_soon(backend.start, m)  # runs wake_command, then waits for the tunnel
        await trio.testing.wait_all_tasks_blocked(0.05)
        backend.tunnel_up("dev1", 40001, lambda: closed.append(40001))
    assert await backend.status(m) is PowerState.RUNNING
    assert str(await backend.address(m)) == "127.0.0.1:40001"
    backend.tunnel_up("dev1", 40002, lambda: closed.append(40002))  # a re-dial replaces the old tunnel
    assert closed == [40001]
    backend.tunnel_down("dev1", 40001)  # the old one going away changes nothing
    assert exited == [] and await backend.status(m) is PowerState.RUNNING
    backend.tunnel_down("dev1", 40002)  # the device dropped by itself
    assert exited == ["dev1"] and backend.tunnel_lost("dev1")
    assert await backend.status(m) is PowerState.STOPPED

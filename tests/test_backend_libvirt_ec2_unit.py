"""libvirt and ec2 backends without a daemon: config checks (`fleetgate check`), domain XML
parsing, state and error mapping. The real daemons are in test_backend_libvirt.py and
test_backend_ec2.py."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from types import MappingProxyType

import botocore.exceptions
import libvirt
import pytest

from fleetgate.backends.base import Address, PowerState
from fleetgate.backends.ec2 import Ec2Backend
from fleetgate.backends.libvirt import _state_of, hostfwd_address, redact_uri, vsock_cid
from fleetgate.config import BackendConfig, ConfigError, MachineConfig, parse
from test_cli_check import CONFIGS, write_keys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

VALID = (CONFIGS / "valid.toml").read_text()
HOST_KEY = "machines/box1/ssh_host_ed25519_key.pub"

XML = """<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>build-01</name>
  <devices>
    <vsock model='virtio'><cid auto='yes' address='7'/></vsock>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-netdev'/>
    <qemu:arg value='user,id=n0,hostfwd=tcp:127.0.0.1:15080-:80,hostfwd=tcp::15022-:22'/>
  </qemu:commandline>
</domain>"""


def test_domain_xml_gives_the_forward_to_port_22_and_the_cid():
    assert hostfwd_address(XML) == Address("127.0.0.1", 15022)       # empty host: QEMU binds every address
    assert hostfwd_address(XML, 80) == Address("127.0.0.1", 15080)
    assert hostfwd_address(XML, 2222) is None
    assert vsock_cid(XML) == 7
    assert vsock_cid("<domain><devices/></domain>") is None
    assert vsock_cid("<domain><devices><vsock><cid auto='yes'/></vsock></devices></domain>") is None


def test_libvirt_states_and_uri_redaction():
    assert _state_of(libvirt.VIR_DOMAIN_RUNNING) is PowerState.RUNNING
    assert _state_of(libvirt.VIR_DOMAIN_SHUTOFF) is PowerState.STOPPED
    assert _state_of(libvirt.VIR_DOMAIN_CRASHED) is PowerState.STOPPED
    assert _state_of(libvirt.VIR_DOMAIN_SHUTDOWN) is PowerState.STOPPING
    assert _state_of(libvirt.VIR_DOMAIN_PAUSED) is PowerState.UNKNOWN
    assert redact_uri("qemu+ssh://admin:hunter2@kvm1.example/system") == "qemu+ssh://kvm1.example/system"
    assert redact_uri("qemu:///system") == "qemu:///system"


def check(tmp_path: Path, backends: dict, machines: dict) -> str:
    """tests/configs/valid.toml plus these backends and machines; the ConfigError's text."""
    write_keys(tmp_path)
    doc = copy.deepcopy(tomllib.loads(VALID))
    doc["backends"].update(backends)
    for name, m in machines.items():
        doc["machines"][name] = {"user": "root", "host_key": HOST_KEY, **m}
    with pytest.raises(ConfigError) as err:
        parse(doc, file=str(tmp_path / "fleetgate.toml"), base_dir=tmp_path)
    return str(err.value)


def test_libvirt_config_errors_name_the_key(tmp_path):
    text = check(tmp_path,
                 {"lv": {"type": "libvirt", "uri": 5, "call_timeout": 0, "poll_interval": 60}},
                 {"a": {"backend": "lv", "transport": "udp", "domain": ""},
                  "b": {"backend": "lv", "vsock_cid": 2, "transport": "vsock", "address_from": "lease"},
                  "c": {"backend": "lv", "vsock_cid": 9, "ssh_port": 0}})
    for key, words in {
        "backends.lv.uri": "must be a libvirt URI",
        "backends.lv.call_timeout": "seconds > 0",
        "backends.lv.poll_interval": "<= 10",
        "machines.a.transport": "must be \"tcp\" or \"vsock\"",
        "machines.a.domain": "libvirt domain's name",
        "machines.b.vsock_cid": "integer >= 3",
        "machines.b.address_from": "not used with transport = \"vsock\"",
        "machines.c.vsock_cid": "only used with transport = \"vsock\"",
        "machines.c.ssh_port": "port number",
    }.items():
        assert f"key '{key}': {words}" in text or (f"key '{key}'" in text and words in text), (key, text)


def test_ec2_config_errors_name_the_key(tmp_path):
    text = check(tmp_path,
                 {"aws": {"type": "ec2", "endpoint_url": "ftp://x", "max_attempts": 0,
                          "aws_secret_access_key": "do-not-put-me-here"}},
                 {"a": {"backend": "aws"},
                  "b": {"backend": "aws", "instance_id": "vm-12", "tags": {"Name": "x"}, "address_type": "ipv6"},
                  "c": {"backend": "aws", "tags": {"Name": ""}, "ssh_port": 70000}})
    assert "do-not-put-me-here" not in text
    for key, words in {
        "backends.aws.region": "missing; the AWS region",
        "backends.aws.endpoint_url": "http:// or https:// URL",
        "backends.aws.max_attempts": "from 1 to 10",
        "backends.aws.aws_secret_access_key": "credentials do not belong in fleetgate's config",
        "machines.a.instance_id": "missing; give instance_id",
        "machines.b.instance_id": "EC2 instance id",
        "machines.b.tags": "not both",
        "machines.b.address_type": "private_ip, public_ip, private_dns, public_dns",
        "machines.c.tags": "exactly one instance",
        "machines.c.ssh_port": "TCP port number",
    }.items():
        assert f"key '{key}'" in text and words in text, (key, text)


def test_fleetgate_check_accepts_libvirt_and_ec2(tmp_path):
    write_keys(tmp_path)
    path = tmp_path / "fleetgate.toml"
    path.write_text(VALID + f"""
[backends.kvm]
type = "libvirt"
uri = "qemu:///system"

[backends.aws]
type = "ec2"
region = "eu-west-1"

[machines.build-01]
backend = "kvm"
user = "builder"
host_key = "{HOST_KEY}"
transport = "vsock"
vsock_cid = 42

[machines.dev-bob]
backend = "aws"
user = "ubuntu"
host_key = "{HOST_KEY}"
tags = {{ Name = "dev-bob" }}
address_type = "public_dns"
""")
    r = subprocess.run([sys.executable, "-m", "fleetgate", "check", "-c", str(path)],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{path}: ok (2 users, 4 machines, 3 backends)\n"


def client_error(code: str, message: str = "m") -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError({"Error": {"Code": code, "Message": message}}, "StartInstances")


@pytest.mark.parametrize("code, reason, words", [
    ("RequestLimitExceeded", "throttled", "AWS is throttling EC2 API calls (RequestLimitExceeded)"),
    ("Throttling", "throttled", "try again in a minute"),
    ("InsufficientInstanceCapacity", "no_capacity", "AWS has no capacity to start instance i-0123456789abcdef0"),
    ("InstanceLimitExceeded", "no_capacity", "change its instance type or zone"),
    ("InvalidInstanceID.NotFound", "machine_gone", "instance i-0123456789abcdef0 does not exist in eu-west-1"),
    ("UnauthorizedOperation", "start_error", "credentials are missing a permission"),
    ("AuthFailure", "start_error", "docs/backends.md for the IAM policy"),
    ("IncorrectInstanceState", "start_error", "EC2 start of instance i-0123456789abcdef0 failed (IncorrectInstanceState: m)"),
])
def test_ec2_errors_become_bounded_reasons_and_sentences(tmp_path, code, reason, words):
    b = Ec2Backend(BackendConfig("aws", "ec2", MappingProxyType({"region": "eu-west-1"})), Path, tmp_path)
    m = MachineConfig(name="m", backend="aws", user=None, address=None, host_keys=(), known_hosts=None, identity=None,
                      boot_timeout=30, options=MappingProxyType({"instance_id": "i-0123456789abcdef0"}))
    err = b._error(client_error(code), "start", m, "start_error")
    assert err.reason == reason and words in str(err), str(err)


def test_ec2_missing_credentials_say_where_they_are_looked_for(tmp_path):
    b = Ec2Backend(BackendConfig("aws", "ec2", MappingProxyType({"region": "eu-west-1"})), Path, tmp_path)
    m = MachineConfig(name="m", backend="aws", user=None, address=None, host_keys=(), known_hosts=None, identity=None,
                      boot_timeout=30, options=MappingProxyType({"tags": {"Name": "x"}}))
    err = b._error(botocore.exceptions.NoCredentialsError(), "start", m, "start_error")
    assert err.reason == "start_error" and "standard chain" in str(err)

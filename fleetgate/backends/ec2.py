"""EC2 backend: start and stop existing EC2 instances, found by instance id or by tags.

Why it looks like this:
- boto3, the AWS SDK: it reads credentials from the standard chain (environment, shared
  credentials/config files and profiles, SSO, web identity, ECS/EC2 instance roles), signs
  requests and retries transient errors. fleetgate never sees or stores a secret: the
  backend's options carry no credentials, and nothing the SDK raises is logged with its
  request (botocore's own debug logging, which prints signed headers, is capped at INFO).
- boto3 is blocking, so every call runs in a trio worker thread (a small CapacityLimiter
  per backend), bounded by `call_timeout`.
- The instance's state is the truth: status() asks EC2, so an instance started or stopped
  in the console is picked up by the Fleet's reconcile; start() waits for `running`.
- AWS errors become bounded reasons with a sentence for the user: `throttled` (the API
  rate limit, after the SDK's own retries), `no_capacity` (InsufficientInstanceCapacity
  and friends), `machine_gone` (terminated, or no instance matches), `backend_unreachable`
  (no answer from the endpoint), `start_error` (credentials, permissions, anything else).
"""

from __future__ import annotations

import logging
import re
import threading
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, TypeVar

import trio

from ..settings import BackendConfig, MachineConfig
from .base import Address, Backend, BackendError, PathResolver, PowerState, is_port, is_seconds

try:  # optional: pip install 'fleetgate[ec2]'
    import boto3
    import botocore.config
    import botocore.exceptions
except ImportError:  # pragma: no cover - depends on the host
    boto3 = None  # type: ignore[assignment]

log = logging.getLogger(__name__)
# botocore logs signed request headers at DEBUG; a gateway run with --log-level debug must not.
for _name in ("botocore", "boto3", "urllib3"):
    logging.getLogger(_name).setLevel(max(logging.getLogger(_name).level, logging.INFO))

T = TypeVar("T")

ADDRESS_TYPES = {
    "private_ip": "PrivateIpAddress",
    "public_ip": "PublicIpAddress",
    "private_dns": "PrivateDnsName",
    "public_dns": "PublicDnsName",
}
DEFAULT_CALL_TIMEOUT = 30.0
DEFAULT_POLL_INTERVAL = 2.0
DEFAULT_MAX_ATTEMPTS = 3
MAX_THREADS = 4
INSTANCE_ID_RE = re.compile(r"^i-[0-9a-f]{8,17}$")
REGION_RE = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")
LIVE_STATES = ["pending", "running", "shutting-down", "stopping", "stopped"]
STATES = {
    "pending": PowerState.STARTING,
    "running": PowerState.RUNNING,
    "stopping": PowerState.STOPPING,
    "shutting-down": PowerState.STOPPING,
    "stopped": PowerState.STOPPED,
    "terminated": PowerState.STOPPED,
}
THROTTLING = {"Throttling", "ThrottlingException", "RequestLimitExceeded", "RequestThrottled",
              "TooManyRequestsException", "ThrottledException", "SlowDown"}
NO_CAPACITY = {"InsufficientInstanceCapacity", "InsufficientCapacity", "InsufficientHostCapacity",
               "InsufficientReservedInstanceCapacity", "InsufficientAddressCapacity", "InstanceLimitExceeded",
               "VcpuLimitExceeded", "Server.InsufficientInstanceCapacity"}
GONE = {"InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"}
CREDENTIALS = {"AuthFailure", "InvalidClientTokenId", "UnrecognizedClientException", "SignatureDoesNotMatch",
               "ExpiredToken", "RequestExpired", "UnauthorizedOperation", "AccessDenied", "OptInRequired"}
MISSING_SDK = "the ec2 backend needs boto3: pip install 'fleetgate[ec2]'"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _clip(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


class Ec2Backend(Backend):
    TYPE = "ec2"
    BACKEND_OPTIONS = ("region", "profile", "endpoint_url", "call_timeout", "poll_interval", "max_attempts")
    MACHINE_OPTIONS = ("instance_id", "tags", "address_type", "ssh_port")
    PROVIDES_ADDRESS = True

    # -- configuration ---------------------------------------------------------------------

    @classmethod
    def check_backend_options(cls, opts: Mapping[str, Any], resolve: PathResolver) -> Iterable[tuple[str, str]]:
        if boto3 is None:
            yield "type", MISSING_SDK
        region = opts.get("region")
        if region is None:
            yield "region", "missing; the AWS region of the instances, e.g. region = \"eu-west-1\""
        elif not isinstance(region, str) or not REGION_RE.match(region):
            yield "region", f"must be an AWS region name such as \"eu-west-1\", got {region!r}"
        profile = opts.get("profile")
        if profile is not None and (not isinstance(profile, str) or not profile):
            yield "profile", "must be the name of a profile in the AWS shared config (~/.aws/config)"
        url = opts.get("endpoint_url")
        if url is not None and (not isinstance(url, str) or not re.match(r"^https?://[^/\s]+", url)):
            yield "endpoint_url", f"must be an http:// or https:// URL (a VPC endpoint, or an emulator), got {url!r}"
        v = opts.get("call_timeout")
        if v is not None and not is_seconds(v, allow_zero=False):
            yield "call_timeout", f"must be a number of seconds > 0 (each AWS call, retries included), got {v!r}"
        v = opts.get("poll_interval")
        if v is not None and (not is_seconds(v, allow_zero=False) or v > 60):
            yield "poll_interval", f"must be a number of seconds > 0 and <= 60 (how often a start or stop polls), got {v!r}"
        v = opts.get("max_attempts")
        if v is not None and (not _is_int(v) or not 1 <= v <= 10):
            yield "max_attempts", f"must be a whole number from 1 to 10 (the SDK's attempts per call), got {v!r}"
        for key in ("aws_access_key_id", "aws_secret_access_key", "access_key", "secret_key"):
            if key in opts:
                yield key, ("credentials do not belong in fleetgate's config; fleetgate uses the standard AWS chain "
                            "(environment, ~/.aws/credentials, an instance role)")

    @classmethod
    def check_machine_options(cls, opts: Mapping[str, Any], resolve: PathResolver) -> Iterable[tuple[str, str]]:
        iid, tags = opts.get("instance_id"), opts.get("tags")
        if iid is None and tags is None:
            yield "instance_id", "missing; give instance_id = \"i-0123456789abcdef0\" or tags = { Name = \"dev-alice\" }"
        if iid is not None and tags is not None:
            yield "tags", "give instance_id or tags, not both"
        if iid is not None and (not isinstance(iid, str) or not INSTANCE_ID_RE.match(iid)):
            yield "instance_id", f"must be an EC2 instance id such as \"i-0123456789abcdef0\", got {iid!r}"
        if tags is not None and (not isinstance(tags, dict) or not tags or
                                 not all(isinstance(v, str) and v for v in tags.values())):
            yield "tags", "must be a table of tag names to values that matches exactly one instance, e.g. tags = { Name = \"dev-alice\" }"
        at = opts.get("address_type", "private_ip")
        if at not in ADDRESS_TYPES:
            yield "address_type", f"must be one of {', '.join(ADDRESS_TYPES)}, got {at!r}"
        port = opts.get("ssh_port")
        if port is not None and not is_port(port):
            yield "ssh_port", f"must be a TCP port number (the instance's sshd, default 22), got {port!r}"

    def __init__(self, config: BackendConfig, resolve: PathResolver, state_dir: Path):
        super().__init__(config, resolve, state_dir)
        o = config.options
        self.region: str = o.get("region", "")
        self.call_timeout = float(o.get("call_timeout", DEFAULT_CALL_TIMEOUT))
        self.poll_interval = float(o.get("poll_interval", DEFAULT_POLL_INTERVAL))
        self.max_attempts = int(o.get("max_attempts", DEFAULT_MAX_ATTEMPTS))
        self._limiter = trio.CapacityLimiter(MAX_THREADS)
        self._client: Any = None
        self._client_lock = threading.Lock()   # worker threads may ask for the client at once
        self._ids: dict[str, str] = {}        # machine -> instance id (found by tags)
        self._info: dict[str, dict] = {}      # machine -> last DescribeInstances entry

    # -- AWS calls, in worker threads --------------------------------------------------------

    def _ec2(self) -> Any:
        """The boto3 client, made on first use (in a worker thread: the credential chain may do I/O)."""
        if boto3 is None:
            raise BackendError(MISSING_SDK, "start_error")
        with self._client_lock:
            if self._client is None:
                self._client = self._new_client()
            return self._client

    def _new_client(self) -> Any:
        """A client from the standard credential chain (or `profile`); no credential passes through here."""
        o = self.config.options
        session = boto3.session.Session(profile_name=o.get("profile"), region_name=self.region)
        cfg = botocore.config.Config(
            retries={"mode": "standard", "total_max_attempts": self.max_attempts},   # the first one included
            connect_timeout=min(10.0, self.call_timeout), read_timeout=self.call_timeout,
            user_agent_extra="fleetgate")
        return session.client("ec2", endpoint_url=o.get("endpoint_url"), config=cfg)

    async def _run(self, fn: Callable[[Any], T], op: str, machine: MachineConfig, failure: str) -> T:
        with trio.move_on_after(self.call_timeout):
            try:
                return await trio.to_thread.run_sync(lambda: fn(self._ec2()), limiter=self._limiter,
                                                     abandon_on_cancel=True)
            except BackendError:
                raise
            except Exception as exc:
                raise self._error(exc, op, machine, failure) from None
        raise BackendError(f"EC2 ({self.region}) did not answer {op} within {self.call_timeout:g} s",
                           "backend_unreachable")

    def _error(self, exc: Exception, op: str, machine: MachineConfig, failure: str) -> BackendError:
        """A bounded reason and a sentence; only the AWS error code and message, never the request."""
        what = self._what(machine)
        if boto3 is not None and isinstance(exc, botocore.exceptions.ClientError):
            err = exc.response.get("Error", {})
            code, text = str(err.get("Code", "")), _clip(err.get("Message", ""))
            if code in THROTTLING:
                return BackendError(f"AWS is throttling EC2 API calls ({code}) after {self.max_attempts} attempt(s); "
                                    "try again in a minute", "throttled")
            if code in NO_CAPACITY:
                return BackendError(f"AWS has no capacity to start {what} right now ({code}: {text}); "
                                    "try again later, or change its instance type or zone", "no_capacity")
            if code in GONE:
                return BackendError(f"{what} does not exist in {self.region} ({code})", "machine_gone")
            if code in CREDENTIALS:
                return BackendError(f"AWS refused {op} of {what} ({code}): the gateway's AWS credentials are missing "
                                    "a permission or are not valid; see docs/backends.md for the IAM policy", failure)
            return BackendError(f"EC2 {op} of {what} failed ({code}: {text})", failure)
        if boto3 is not None and isinstance(exc, botocore.exceptions.NoCredentialsError):
            return BackendError("no AWS credentials found in the standard chain (environment, ~/.aws/credentials, "
                                "instance role)", failure)
        if boto3 is not None and isinstance(exc, (botocore.exceptions.EndpointConnectionError,
                                                  botocore.exceptions.ConnectTimeoutError,
                                                  botocore.exceptions.ReadTimeoutError,
                                                  botocore.exceptions.ConnectionClosedError)):
            return BackendError(f"cannot reach the EC2 API in {self.region}: {type(exc).__name__}", "backend_unreachable")
        if boto3 is not None and isinstance(exc, botocore.exceptions.BotoCoreError):
            return BackendError(f"EC2 {op} of {what} failed: {type(exc).__name__}", failure)
        return BackendError(f"EC2 {op} of {what} failed: {type(exc).__name__}", failure)

    def _what(self, machine: MachineConfig) -> str:
        o = machine.options
        if "instance_id" in o:
            return f"instance {o['instance_id']}"
        iid = self._ids.get(machine.name)
        tags = ", ".join(f"{k}={v}" for k, v in (o.get("tags") or {}).items())
        return f"instance {iid} (tags {tags})" if iid else f"the instance tagged {tags}"

    async def _describe(self, machine: MachineConfig, failure: str) -> dict:
        """The machine's instance, as DescribeInstances tells it (found by id, or by its tags)."""
        o = machine.options
        if "instance_id" in o or machine.name in self._ids:
            iid = o.get("instance_id") or self._ids[machine.name]
            answer = await self._run(lambda c: c.describe_instances(InstanceIds=[iid]), "describe", machine, failure)
            found = [i for r in answer.get("Reservations", ()) for i in r.get("Instances", ())]
            if not found:
                raise BackendError(f"instance {iid} does not exist in {self.region}", "machine_gone")
            info = found[0]
            if "instance_id" not in o and info.get("State", {}).get("Name") == "terminated":
                self._ids.pop(machine.name, None)   # found by tags: look again next time
        else:
            filters = [{"Name": f"tag:{k}", "Values": [v]} for k, v in o["tags"].items()]
            filters.append({"Name": "instance-state-name", "Values": LIVE_STATES})
            answer = await self._run(lambda c: c.describe_instances(Filters=filters), "describe", machine, failure)
            found = [i for r in answer.get("Reservations", ()) for i in r.get("Instances", ())]
            if not found:
                raise BackendError(f"no instance in {self.region} that is not terminated has the tags "
                                   f"{', '.join(f'{k}={v}' for k, v in o['tags'].items())}", "machine_gone")
            if len(found) > 1:
                ids = ", ".join(sorted(i["InstanceId"] for i in found))
                raise BackendError(f"{len(found)} instances match the tags of {machine.name} ({ids}); "
                                   "make the tags unique or use instance_id", failure)
            info = found[0]
            self._ids[machine.name] = info["InstanceId"]
        self._info[machine.name] = info
        return info

    @staticmethod
    def _state(info: dict) -> str:
        return str(info.get("State", {}).get("Name", "unknown"))

    def _gone(self, machine: MachineConfig, info: dict) -> BackendError:
        return BackendError(f"instance {info.get('InstanceId')} is {self._state(info)}; it cannot be started again "
                            f"(replace it and update {machine.name}'s instance_id or tags)", "machine_gone")

    # -- the four calls -------------------------------------------------------------------------

    async def start(self, machine: MachineConfig) -> None:
        """StartInstances, then wait for `running` (the Fleet's boot_timeout bounds the wait)."""
        info = await self._describe(machine, "start_error")
        state, iid = self._state(info), info["InstanceId"]
        if state in ("terminated", "shutting-down"):
            raise self._gone(machine, info)
        if state == "stopping":   # a stop (ours, the console's) is finishing; EC2 refuses a start until then
            info = await self._wait(machine, {"stopped"}, "start_error")
            state = self._state(info)
        if state != "running":
            if state != "pending":
                answer = await self._run(lambda c: c.start_instances(InstanceIds=[iid]), "start", machine,
                                         "start_error")
                log.info("ec2 start machine=%s instance=%s was=%s now=%s", machine.name, iid, state,
                         [s["CurrentState"]["Name"] for s in answer.get("StartingInstances", ())])
            info = await self._wait(machine, {"running"}, "start_error")
        log.info("ec2 instance running machine=%s instance=%s", machine.name, iid)

    async def _wait(self, machine: MachineConfig, want: set[str], failure: str) -> dict:
        while True:
            info = await self._describe(machine, failure)
            state = self._state(info)
            if state in want:
                return info
            if state in ("terminated", "shutting-down"):
                raise self._gone(machine, info)
            if "running" in want and state == "stopped":
                # Stopped again right after a start: EC2 says why in StateReason (capacity, limits).
                reason = info.get("StateReason", {})
                code, text = str(reason.get("Code", "")), _clip(reason.get("Message", ""))
                if "Capacity" in code or "Capacity" in text:
                    raise BackendError(f"AWS has no capacity to start instance {info['InstanceId']} right now "
                                       f"({text or code}); try again later", "no_capacity")
                if code or text:
                    raise BackendError(f"instance {info['InstanceId']} stopped while starting ({text or code})",
                                       failure)
            await trio.sleep(self.poll_interval)

    async def stop(self, machine: MachineConfig) -> None:
        await self._stop(machine, force=False)

    async def force_stop(self, machine: MachineConfig) -> None:
        """StopInstances with Force: the instance did not stop within stop_timeout."""
        await self._stop(machine, force=True)

    async def _stop(self, machine: MachineConfig, *, force: bool) -> None:
        try:
            info = await self._describe(machine, "stop_failed")
        except BackendError as exc:
            if exc.reason == "machine_gone":
                return   # nothing left to stop
            raise
        state, iid = self._state(info), info["InstanceId"]
        if state in ("stopped", "terminated"):
            return
        if state != "stopping" or force:
            await self._run(lambda c: c.stop_instances(InstanceIds=[iid], Force=force), "stop", machine, "stop_failed")
            log.info("ec2 stop machine=%s instance=%s was=%s force=%s", machine.name, iid, state, force)
        await self._wait(machine, {"stopped", "terminated"}, "stop_failed")
        log.info("ec2 instance stopped machine=%s instance=%s", machine.name, iid)

    async def status(self, machine: MachineConfig) -> PowerState:
        try:
            info = await self._describe(machine, "backend_error")
        except BackendError as exc:
            if exc.reason == "machine_gone":
                return PowerState.STOPPED
            raise
        return STATES.get(self._state(info), PowerState.UNKNOWN)

    async def address(self, machine: MachineConfig) -> Address:
        if machine.address is not None:   # an explicit override: a NAT, a port forward, a bastion
            return Address.of(machine.address)
        info = self._info.get(machine.name)
        if info is None or self._state(info) != "running":
            info = await self._describe(machine, "start_error")
        kind = machine.options.get("address_type", "private_ip")
        value = info.get(ADDRESS_TYPES[kind]) or ""
        if not value:
            raise BackendError(f"instance {info.get('InstanceId')} has no {kind.replace('_', ' ')} "
                               f"(address_type = \"{kind}\"); choose another address_type", "start_error")
        return Address(value, int(machine.options.get("ssh_port", 22)))

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await trio.to_thread.run_sync(client.close, limiter=self._limiter, abandon_on_cancel=True)

"""HTTP backend: a VM API that answers `POST /start_vm` with the machine's IP (the seed's contract).

The seed's API answers either JSON `{"vm_ip": "192.168.0.57"}` or the bare IP as plain
text, so both are accepted; anything else (an HTML error page from a proxy, an empty body,
a malformed IP, JSON without the field) is a wake failure with the reason in words, never
a crash. Connection errors, timeouts and 5xx are retried with backoff because VM APIs are
often behind a reverse proxy that hiccups while the hypervisor is busy; when retries run
out the reason is `backend_unreachable` if the API never answered (connect errors, timeouts)
and `backend_error` if it answered 5xx, so alerts can tell "the API is down" (look at the
network) from "the API is broken" (look at the API) and from "the API answered nonsense"
(`start_error`). Every attempt, retries included, is reported to `on_request` with the class
of its answer (`none` for no answer), which the fleet counts in fleetgate_backend_requests_total.

The bearer token is read from a file or an environment variable at each call (so it can be
rotated without a reload) and never appears in a log line or an error message. Some APIs take
their key in the URL (`?api_key=...`): users see the URL without its query string and never the
API's answer (a short reason and an error id); the log has the detail with query values redacted.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import random
import re
from pathlib import Path
from typing import Any, Iterable, Mapping
from urllib.parse import quote

import httpx
import trio

from .. import logsetup
from ..settings import BackendConfig, MachineConfig
from .base import Address, Backend, BackendError, is_port, is_seconds, PathResolver, PowerState

log = logging.getLogger(__name__)
logsetup.redact_http_logs()  # httpx logs request URLs: never their query secrets

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
MAX_ANSWER = 64 * 1024
MAX_BACKOFF = 30.0
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Words VM APIs and tools use for power states (libvirt, cloud APIs, systemd, plain English).
POWER_WORDS = {
    PowerState.RUNNING: ("running", "active", "up", "on", "started", "ready"),
    PowerState.STOPPED: ("stopped", "shutoff", "shut-off", "off", "down", "inactive", "terminated", "halted"),
    PowerState.STARTING: ("starting", "pending", "booting", "provisioning"),
    PowerState.STOPPING: ("stopping", "shutting-down", "deactivating"),
}
_WORD_TO_STATE = {w: state for state, words in POWER_WORDS.items() for w in words}


def power_state(word: str) -> PowerState:
    """Map an API's or a tool's word for a power state; unknown words are UNKNOWN, not an error."""
    return _WORD_TO_STATE.get(word.strip().lower(), PowerState.UNKNOWN)


def parse_ip(text: str) -> str:
    """The IP in `text`, or ValueError saying why it is not a usable machine address."""
    candidate = text.strip()
    try:
        ip = ipaddress.ip_address(candidate)
    except ValueError:
        raise ValueError(f"not an IP address: {snippet(candidate)}") from None
    if ip.is_unspecified or ip.is_multicast:
        raise ValueError(f"{ip} cannot be a machine's address")
    return str(ip)


def snippet(text: str | bytes, limit: int = 80) -> str:
    """A short, single-line, quoted excerpt of an answer for an error message."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    text = " ".join(text.split())
    return repr(text if len(text) <= limit else text[:limit] + "...")


def parse_start_answer(body: bytes, ip_field: str) -> str:
    """The IP from a start answer: JSON {ip_field: IP}, a JSON string, or plain text."""
    text = body.decode("utf-8", errors="replace").strip()
    if not text:
        raise ValueError("empty answer (expected JSON {\"%s\": \"IP\"} or the IP as plain text)" % ip_field)
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
        if text.startswith(("{", "[")):
            raise ValueError(f"answer is not valid JSON: {snippet(text)}") from None
    if isinstance(doc, dict):
        value = doc.get(ip_field)
        if not isinstance(value, str):
            raise ValueError(f"JSON answer has no string field '{ip_field}': {snippet(text)}")
        return parse_ip(value)
    if isinstance(doc, str):
        return parse_ip(doc)
    return parse_ip(text)


def parse_status_answer(body: bytes, status_field: str, ip_field: str) -> tuple[PowerState, str | None]:
    """(power state, IP if the answer carries one) from JSON or a plain-text word."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        doc = json.loads(text)
    except ValueError:
        doc = text
    if isinstance(doc, dict):
        word = doc.get(status_field)
        if not isinstance(word, str):
            raise ValueError(f"JSON answer has no string field '{status_field}': {snippet(text)}")
        ip = doc.get(ip_field)
        return power_state(word), parse_ip(ip) if isinstance(ip, str) and ip else None
    if isinstance(doc, str) and doc:
        return power_state(doc.split()[0]), None
    raise ValueError(f"answer is not a status: {snippet(text)}")


def _check_url(key: str, value: Any) -> str | None:
    if not isinstance(value, str):
        return f"must be a URL string such as \"http://192.168.0.58:5000/{key.removesuffix('_url')}_vm\""
    try:
        url = httpx.URL(value.replace("{machine}", "m"))
    except (httpx.InvalidURL, ValueError) as exc:
        return f"'{value}' is not a URL ({exc})"
    if url.scheme not in ("http", "https") or not url.host:
        return f"'{value}' must be an http:// or https:// URL with a host"
    return None


class HttpBackend(Backend):
    TYPE = "http"
    BACKEND_OPTIONS = (
        "start_url", "start_method", "stop_url", "stop_method", "status_url", "status_method",
        "headers", "body", "token_file", "token_env", "ip_field", "status_field",
        "timeout", "retries", "backoff", "verify_tls",
    )
    MACHINE_OPTIONS = ("ssh_port", "vm_name")
    PROVIDES_ADDRESS = True

    @classmethod
    def check_backend_options(cls, opts: Mapping[str, Any], resolve: PathResolver) -> Iterable[tuple[str, str]]:
        if "start_url" not in opts:
            yield "start_url", "missing; the URL fleetgate POSTs to wake a machine, e.g. \"http://192.168.0.58:5000/start_vm\""
        for op in ("start", "stop", "status"):
            url = opts.get(f"{op}_url")
            if url is not None and (problem := _check_url(f"{op}_url", url)):
                yield f"{op}_url", problem
            method = opts.get(f"{op}_method")
            if method is not None and (not isinstance(method, str) or method.upper() not in METHODS):
                yield f"{op}_method", f"must be one of {', '.join(METHODS)}, got {method!r}"
        headers = opts.get("headers")
        if headers is not None and (not isinstance(headers, dict) or
                                    not all(isinstance(v, str) for v in headers.values())):
            yield "headers", "must be a table of header names to string values, e.g. headers = { X-Team = \"dev\" }"
        body = opts.get("body")
        if body is not None and not isinstance(body, dict):
            yield "body", "must be a table sent as the JSON body, e.g. body = { name = \"{machine}\" } ({} sends none)"
        if "token_file" in opts and "token_env" in opts:
            yield "token_env", "give token_file or token_env, not both"
        tf = opts.get("token_file")
        if tf is not None:
            p = resolve(tf) if isinstance(tf, str) else None
            if p is None or not p.is_file():
                yield "token_file", f"no such file {p if p else tf!r}; a file holding the bearer token"
        te = opts.get("token_env")
        if te is not None and (not isinstance(te, str) or not ENV_NAME_RE.match(te)):
            yield "token_env", f"must be an environment variable name such as FLEETGATE_API_TOKEN, got {te!r}"
        for key in ("ip_field", "status_field"):
            v = opts.get(key)
            if v is not None and (not isinstance(v, str) or not v):
                yield key, "must be a non-empty JSON field name"
        v = opts.get("timeout")
        if v is not None and not is_seconds(v, allow_zero=False):
            yield "timeout", f"must be a number of seconds > 0 (each request), got {v!r}"
        v = opts.get("retries")
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 20):
            yield "retries", f"must be a whole number from 0 to 20 (extra attempts on errors and 5xx), got {v!r}"
        v = opts.get("backoff")
        if v is not None and not is_seconds(v, allow_zero=True):
            yield "backoff", f"must be a number of seconds >= 0 (first retry delay, doubling), got {v!r}"
        v = opts.get("verify_tls")
        if v is not None and not isinstance(v, (bool, str)):
            yield "verify_tls", "must be true, false, or the path of a CA bundle"

    @classmethod
    def check_machine_options(cls, opts: Mapping[str, Any], resolve: PathResolver) -> Iterable[tuple[str, str]]:
        port = opts.get("ssh_port")
        if port is not None and not is_port(port):
            yield "ssh_port", f"must be a TCP port number (the machine's sshd, default 22), got {port!r}"
        name = opts.get("vm_name")
        if name is not None and (not isinstance(name, str) or not name):
            yield "vm_name", "must be the non-empty name the API knows this machine by"

    def __init__(self, config: BackendConfig, resolve: PathResolver, state_dir: Path):
        super().__init__(config, resolve, state_dir)
        o = config.options
        self.timeout = float(o.get("timeout", 30.0))
        self.retries = int(o.get("retries", 3))
        self.backoff = float(o.get("backoff", 0.5))
        self.ip_field = str(o.get("ip_field", "vm_ip"))
        self.status_field = str(o.get("status_field", "status"))
        verify = o.get("verify_tls", True)
        self._verify: bool | str = str(resolve(verify)) if isinstance(verify, str) else bool(verify)
        self._client: httpx.AsyncClient | None = None
        self._ips: dict[str, str] = {}

    # -- HTTP ----------------------------------------------------------------------------

    def _client_for_calls(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout, verify=self._verify, follow_redirects=False)
        return self._client

    def _token(self) -> str | None:
        o = self.config.options
        if "token_file" in o:
            path = self.resolve(o["token_file"])
            try:
                return Path(str(path)).read_text().strip()
            except OSError as exc:
                raise BackendError(f"cannot read token_file {path}: {exc.strerror}", "start_error") from None
        if "token_env" in o:
            token = os.environ.get(o["token_env"])
            if not token:
                raise BackendError(f"environment variable {o['token_env']} (token_env) is not set", "start_error")
            return token
        return None

    def _request_parts(self, op: str, machine: MachineConfig) -> tuple[str, str, dict[str, str], Any]:
        o = self.config.options
        vm = str(machine.options.get("vm_name", machine.name))
        url = str(o[f"{op}_url"]).replace("{machine}", quote(vm, safe=""))
        method = str(o.get(f"{op}_method", "GET" if op == "status" else "POST")).upper()
        headers = {str(k): str(v).replace("{machine}", vm) for k, v in (o.get("headers") or {}).items()}
        token = self._token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        body = None
        if method != "GET":
            template = o.get("body", {"machine": "{machine}"})
            body = _substitute(template, vm) if template else None
        return method, url, headers, body

    async def _call(self, op: str, machine: MachineConfig, error_reason: str) -> bytes:
        """One API call with retries; the answer's body, or BackendError with a bounded reason."""
        method, url, headers, body = self._request_parts(op, machine)
        shown = _redact(url)       # for logs: query values redacted
        public = _public(url)      # for users: no query string at all
        client = self._client_for_calls()
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                delay = min(self.backoff * 2 ** (attempt - 1), MAX_BACKOFF) * random.uniform(0.8, 1.2)
                log.info("http backend retry op=%s machine=%s attempt=%d in=%.2fs after=%s",
                         op, machine.name, attempt + 1, delay, problem)
                await trio.sleep(delay)
            status, answer, problem = await self._attempt(client, method, url, shown, headers, body, error_reason)
            self.on_request(op, f"{status // 100}xx" if status is not None and 200 <= status < 600 else "none")
            if status is None or status >= 500:
                continue
            log.info("http backend op=%s machine=%s %s %s -> %d", op, machine.name, method, shown, status)
            if not 200 <= status < 300:
                raise BackendError(f"{method} {public} answered HTTP {status}", error_reason,
                                   detail=f"{method} {shown} answered HTTP {status}: {snippet(answer)}")
            return answer
        tries = "once" if self.retries == 0 else f"{self.retries + 1} times"
        if status is not None:  # it answered, with 5xx: the API is broken, not out of reach
            raise BackendError(f"{method} {public} answered HTTP {status} ({tries})", "backend_error",
                               detail=f"{method} {shown} answered HTTP {status} ({tries}): {problem}")
        raise BackendError(f"{method} {public} failed ({tries})", "backend_unreachable",
                           detail=f"{method} {shown} failed ({tries}): {problem}")

    async def _attempt(self, client: httpx.AsyncClient, method: str, url: str, shown: str,
                       headers: dict[str, str], body: Any, error_reason: str) -> tuple[int | None, bytes, str]:
        """(status or None, body, problem): one request, bounded as a whole by the timeout."""
        with trio.move_on_after(self.timeout):
            try:
                async with client.stream(method, url, headers=headers, json=body) as resp:
                    answer = b""
                    async for chunk in resp.aiter_bytes():
                        answer += chunk
                        if len(answer) > MAX_ANSWER:
                            raise BackendError(f"{method} {_public(url)}: answer larger than {MAX_ANSWER} bytes",
                                               error_reason)
                    problem = f"HTTP {resp.status_code}: {snippet(answer)}" if resp.status_code >= 500 else ""
                    return resp.status_code, answer, problem
            except httpx.TimeoutException:
                return None, b"", f"no answer within {self.timeout:g} s"
            except httpx.TransportError as exc:
                return None, b"", f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return None, b"", f"no answer within {self.timeout:g} s"

    # -- the Backend calls ---------------------------------------------------------------

    async def start(self, machine: MachineConfig) -> None:
        answer = await self._call("start", machine, "start_error")
        try:
            ip = parse_start_answer(answer, self.ip_field)
        except ValueError as exc:  # the reason quotes the answer: operators only
            raise BackendError("the API's start answer is unusable", "start_error",
                               detail=f"start answer unusable: {exc}") from None
        self._ips[machine.name] = ip
        log.info("http backend started machine=%s ip=%s", machine.name, ip)

    async def stop(self, machine: MachineConfig) -> None:
        self._ips.pop(machine.name, None)
        if "stop_url" not in self.config.options:
            log.info("http backend has no stop_url; machine=%s keeps running", machine.name)
            return
        await self._call("stop", machine, "stop_failed")

    async def status(self, machine: MachineConfig) -> PowerState:
        if "status_url" not in self.config.options:
            return PowerState.UNKNOWN
        answer = await self._call("status", machine, "backend_error")
        try:
            state, ip = parse_status_answer(answer, self.status_field, self.ip_field)
        except ValueError as exc:
            raise BackendError("the API's status answer is unusable", "backend_error",
                               detail=f"status answer unusable: {exc}") from None
        if ip is not None:
            self._ips[machine.name] = ip
        return state

    async def address(self, machine: MachineConfig) -> Address:
        ip = self._ips.get(machine.name)
        if ip is not None:
            return Address(ip, int(machine.options.get("ssh_port", 22)))
        if machine.address is not None:
            return Address.of(machine.address)
        raise BackendError(f"the API has not told fleetgate {machine.name}'s address yet", "start_error")

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _substitute(value: Any, vm: str) -> Any:
    if isinstance(value, str):
        return value.replace("{machine}", vm)
    if isinstance(value, dict):
        return {k: _substitute(v, vm) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, vm) for v in value]
    return value


def _redact(url: str) -> str:
    """The URL for logs: without user:password, and query values replaced (`?api_key=REDACTED`)."""
    u = httpx.URL(url)
    if u.userinfo:
        u = u.copy_with(username=None, password=None)
    if u.query:
        u = u.copy_with(params=[(k, "REDACTED") for k, _ in u.params.multi_items()])
    return str(u)


def _public(url: str) -> str:
    """The URL for users: scheme, host, port and path; no credentials, no query string."""
    u = httpx.URL(url)
    return str(u.copy_with(username=None, password=None, query=None, fragment=None))

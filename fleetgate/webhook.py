"""Routing and authorized keys decided by the team's own HTTP service (docs/webhooks.md).

Teams with an inventory or identity service do not want a second copy of their users and
machines in the TOML file. `[routing] type = "webhook"` asks `url` where a login goes;
`keys_url` asks for a user's public keys (OpenSSH's AuthorizedKeysCommand). Both:

- one JSON POST, bounded as a whole by `timeout` (connect, TLS, headers and body), an
  answer of at most 64 KiB, a bearer token and/or a TLS client certificate;
- every answer that is not exactly the contract (an HTTP status other than 200, not JSON,
  a machine the config does not define, a malformed key) refuses the login with a sentence
  and an error id; the log carries the detail. Nothing is ever woken on such an answer:
  only a well-formed `allow` naming a configured machine becomes a Target;
- a bounded LRU cache with a TTL, and single flight: a storm of identical logins makes one
  request (errors are not cached, but concurrent waiters share the one failed attempt);
- `fleetgate_webhook_request_duration_seconds{kind, result}` for every request.

Plain trio (httpx runs on trio natively); the SSH front reaches it through the bridge.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import ssl
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Generic, Hashable, Mapping, TypeVar

import httpx
import trio

from . import logsetup
from .errors import FleetgateError, RoutingError
from .routing import LoginInfo, Target
from .settings import MachineConfig, RoutingConfig

log = logging.getLogger(__name__)
logsetup.redact_http_logs()  # httpx logs request URLs: never their query secrets

MAX_ANSWER = 64 * 1024
MAX_MESSAGE = 300
USER_NAME_RE = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")  # as config.USER_NAME_RE
UPSTREAM_USER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}$")

T = TypeVar("T")


class WebhookError(FleetgateError):
    """The service did not give a usable answer. `reason` is the metric result (timeout, error,
    bad_answer); `message` is for the user (with an error id), `detail` only for the log."""

    def __init__(self, reason: str, message: str, detail: str):
        self.error_id = secrets.token_hex(4)
        super().__init__(reason, f"{message} (error id {self.error_id})")
        self.detail = detail


class _Problem(Exception):
    """Raised inside a request: (reason, detail)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class TTLCache(Generic[T]):
    """At most `size` entries, each for `ttl` seconds (trio's clock), least recently used out first."""

    def __init__(self, size: int, ttl: float):
        self.size = size
        self.ttl = ttl
        self._entries: OrderedDict[Hashable, tuple[float, T]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> tuple[bool, T | None]:
        entry = self._entries.get(key)
        if entry is None:
            return False, None
        if entry[0] <= trio.current_time():
            del self._entries[key]
            return False, None
        self._entries.move_to_end(key)
        return True, entry[1]

    def put(self, key: Hashable, value: T) -> None:
        if self.ttl <= 0:
            return
        self._entries[key] = (trio.current_time() + self.ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


class _Flight:
    def __init__(self) -> None:
        self.done = trio.Event()
        self.value: Any = None
        self.error: BaseException | None = None
        self.abandoned = False


class CachedCalls(Generic[T]):
    """Cache plus single flight: concurrent callers with the same key share one fetch.

    If the caller doing the fetch is cancelled (its client left), the next waiter fetches."""

    def __init__(self, size: int, ttl: float):
        self.cache: TTLCache[T] = TTLCache(size, ttl)
        self._flights: dict[Hashable, _Flight] = {}

    async def get(self, key: Hashable, fetch: Callable[[], Awaitable[T]]) -> T:
        while True:
            hit, value = self.cache.get(key)
            if hit:
                return value  # type: ignore[return-value]
            flight = self._flights.get(key)
            if flight is not None:
                await flight.done.wait()
                if flight.abandoned:
                    continue
                if flight.error is not None:
                    raise flight.error
                return flight.value
            flight = self._flights[key] = _Flight()
            try:
                flight.value = await fetch()
                self.cache.put(key, flight.value)
                return flight.value
            except WebhookError as exc:
                flight.error = exc
                raise
            except BaseException:
                flight.abandoned = True
                raise
            finally:
                del self._flights[key]
                flight.done.set()


class WebhookClient:
    """One httpx client for both webhooks: TLS (CA, client certificate), bearer token, timeout."""

    def __init__(self, rc: RoutingConfig, observe: Callable[[str, str, float], None] = lambda k, r, s: None):
        self.config = rc
        self.timeout = rc.timeout
        self.observe = observe
        verify: Any = True
        if rc.ca_file is not None or rc.cert_file is not None:
            verify = ssl.create_default_context(cafile=str(rc.ca_file) if rc.ca_file else None)
            if rc.cert_file is not None:  # mutual TLS: the service knows the gateway by its certificate
                verify.load_cert_chain(str(rc.cert_file), str(rc.key_file) if rc.key_file else None)
        headers = {"User-Agent": "fleetgate", "Accept": "application/json"}
        if rc.token:
            headers["Authorization"] = f"Bearer {rc.token}"
        self._http = httpx.AsyncClient(timeout=rc.timeout, verify=verify, headers=headers, follow_redirects=False,
                                       limits=httpx.Limits(max_connections=32, max_keepalive_connections=8))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def post(self, kind: str, url: str, payload: Mapping[str, Any], parse: Callable[[dict], T],
                   result_of: Callable[[T], str], what: str) -> T:
        """POST `payload`, parse the JSON object answered; WebhookError on anything else."""
        t0 = trio.current_time()
        result = "error"
        try:
            try:
                with trio.fail_after(self.timeout):
                    async with self._http.stream("POST", url, json=payload) as r:
                        status = r.status_code
                        body = b""
                        async for chunk in r.aiter_bytes():
                            body += chunk
                            if len(body) > MAX_ANSWER:
                                raise _Problem("bad_answer", f"answer longer than {MAX_ANSWER} bytes")
            except trio.TooSlowError:
                raise _Problem("timeout", f"no answer within {self.timeout:g} s") from None
            except httpx.HTTPError as exc:
                raise _Problem("error", f"{type(exc).__name__}: {exc}") from None
            if status != 200:
                raise _Problem("error", f"HTTP {status}: {body[:200]!r}")
            try:
                doc = json.loads(body)
            except (ValueError, UnicodeDecodeError):
                raise _Problem("bad_answer", f"not JSON: {body[:200]!r}") from None
            if not isinstance(doc, dict):
                raise _Problem("bad_answer", f"not a JSON object: {body[:200]!r}")
            value = parse(doc)
            result = result_of(value)
            return value
        except _Problem as p:
            result = p.reason
            words = {"timeout": "did not answer in time", "error": "failed",
                     "bad_answer": "gave an answer fleetgate cannot use"}[p.reason]
            err = WebhookError(p.reason, f"fleetgate: the {what} {words}; nothing was started, try again later",
                               p.detail)
            log.warning("webhook failed kind=%s result=%s error_id=%s detail=%s", kind, p.reason, err.error_id,
                        p.detail)
            raise err from None
        finally:
            self.observe(kind, result, trio.current_time() - t0)


@dataclass(frozen=True)
class RouteAnswer:
    allow: bool
    machine: str = ""
    upstream_user: str | None = None
    machines: frozenset[str] = frozenset()
    message: str = ""


def user_message(value: Any, fallback: str) -> str:
    """The service's words for the user: printable, one line, bounded, marked as ours."""
    if not isinstance(value, str) or not value.strip():
        return fallback
    text = "".join(c if c.isprintable() else " " for c in value).strip()[:MAX_MESSAGE]
    return text if text.startswith("fleetgate:") else f"fleetgate: {text}"


def reach_cache(rc: RoutingConfig) -> TTLCache[frozenset[str]]:
    """Each user's jump targets from their latest answer: kept at least an hour, so a long
    session's jumps do not depend on the service answering again."""
    return TTLCache(rc.cache_size, max(rc.cache_ttl, 3600.0))


class WebhookRouter:
    """A Router whose decisions come from the service at [routing] url."""

    def __init__(self, client: WebhookClient, machines: Mapping[str, MachineConfig],
                 keys: "KeysWebhook | None" = None, cache: CachedCalls[RouteAnswer] | None = None,
                 reach: "TTLCache[frozenset[str]] | None" = None):
        rc = client.config
        assert rc.url is not None
        self.client = client
        self.url = rc.url
        self._machines = machines
        self.keys = keys
        self.calls = cache or CachedCalls(rc.cache_size, rc.cache_ttl)
        # The machines each user may jump to, from their last answer (may_reach is synchronous).
        self._reach = reach if reach is not None else reach_cache(rc)

    def _parse(self, doc: dict) -> RouteAnswer:
        allow = doc.get("allow")
        if not isinstance(allow, bool):
            raise _Problem("bad_answer", f"'allow' must be true or false, got {allow!r}")
        if not allow:
            return RouteAnswer(False, message=user_message(doc.get("message"), ""))
        machine = doc.get("machine")
        if not isinstance(machine, str) or machine not in self._machines:
            raise _Problem("bad_answer", f"'machine' {machine!r} is not a machine in the config")
        upstream = doc.get("upstream_user")
        if upstream is not None and (not isinstance(upstream, str) or not UPSTREAM_USER_RE.match(upstream)):
            raise _Problem("bad_answer", f"'upstream_user' {upstream!r} is not an account name")
        reach = doc.get("machines", [machine])
        if not isinstance(reach, list) or not all(isinstance(m, str) and m in self._machines for m in reach):
            raise _Problem("bad_answer", f"'machines' {reach!r} must list machines of the config")
        return RouteAnswer(True, machine, upstream, frozenset(reach) | {machine})

    def may_reach(self, user: str, machine: str) -> bool:
        hit, reach = self._reach.get(user)
        return hit and reach is not None and machine in reach

    async def route(self, user: str, target: str | None, info: LoginInfo | None = None) -> Target:
        if target == "":
            raise RoutingError(f"fleetgate: no machine name after '+' in {user}+")
        info = info or LoginInfo(login=user if target is None else f"{user}+{target}")
        payload = {"login": info.login, "user": user, "target": target,
                   "key": {"type": info.key_type, "fingerprint": info.key_fingerprint,
                           "certificate": info.certificate} if info.key_type else None,
                   "source": info.source}
        key = (user, target, info.key_type, info.key_fingerprint, info.certificate, info.source)
        try:
            answer = await self.calls.get(key, lambda: self.client.post(
                "route", self.url, payload, self._parse, lambda a: "ok" if a.allow else "refused",
                "routing service"))
        except WebhookError as exc:
            raise RoutingError(exc.message) from None
        if not answer.allow:
            log.info("routing service refused user=%s target=%s", user, target)
            raise RoutingError(answer.message or f"fleetgate: {user} may not log in here (the routing service said no)")
        if answer.machine not in self._machines:  # removed by a reload since the answer was cached
            raise RoutingError(f"fleetgate: {answer.machine} is no longer configured; try again later")
        self._reach.put(user, answer.machines)
        upstream = answer.upstream_user or self._machines[answer.machine].user or user
        return Target(user, answer.machine, upstream)


class KeysWebhook:
    """A user's authorized keys from the service at [routing] keys_url (AuthorizedKeysCommand)."""

    def __init__(self, client: WebhookClient, cache: CachedCalls[frozenset[bytes]] | None = None):
        rc = client.config
        assert rc.keys_url is not None
        self.client = client
        self.url = rc.keys_url
        self.calls = cache or CachedCalls(rc.cache_size, rc.cache_ttl)

    @staticmethod
    def _parse(doc: dict) -> frozenset[bytes]:
        import asyncssh  # parsing key lines only (no I/O): the asyncio side stays in fleetgate/ssh

        keys = doc.get("keys")
        if not isinstance(keys, list) or len(keys) > 1000:
            raise _Problem("bad_answer", f"'keys' must be a list of OpenSSH public key lines, got {keys!r:.200}")
        out = set()
        for line in keys:
            try:
                out.add(asyncssh.import_public_key(line).public_data)
            except (asyncssh.KeyImportError, ValueError, TypeError) as exc:
                raise _Problem("bad_answer", f"'keys' holds {line!r:.80}, not a public key ({exc})") from None
        return frozenset(out)

    async def keys_for(self, user: str) -> frozenset[bytes]:
        """The user's public keys (public_data); WebhookError if the service gave no usable answer."""
        if not USER_NAME_RE.match(user):
            return frozenset()  # not a name any service knows: no request for it
        return await self.calls.get(user, lambda: self.client.post(
            "keys", self.url, {"user": user}, self._parse, lambda k: "ok", "key service"))


class Webhooks:
    """What the App holds: the client (closed at shutdown) and the caches, kept across reloads
    while [routing] stays the same."""

    def __init__(self, rc: RoutingConfig, observe: Callable[[str, str, float], None]):
        self.config = rc
        self.client = WebhookClient(rc, observe)
        self.route_calls: CachedCalls[RouteAnswer] = CachedCalls(rc.cache_size, rc.cache_ttl)
        self.reach = reach_cache(rc)
        self.keys = KeysWebhook(self.client) if rc.keys_url else None

    def router(self, machines: Mapping[str, MachineConfig]) -> WebhookRouter:
        return WebhookRouter(self.client, machines, self.keys, self.route_calls, self.reach)

    async def aclose(self) -> None:
        await self.client.aclose()

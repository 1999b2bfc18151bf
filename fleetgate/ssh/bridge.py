"""The one module that knows trio-asyncio: where trio code and asyncio code meet.

fleetgate is a trio program; asyncssh is asyncio. Everything outside fleetgate/ssh/ is
plain trio, and inside it the asyncio side reaches trio only through this module, so
each crossing is visible and every asyncio task has an owner:

- `open_loop(on_error)`: the asyncio loop hosted inside trio.run (entered once, by the App).
  trio-asyncio's own exception handler re-raises every error asyncio reports into the
  nursery, i.e. ends the process; asyncio reports, and survives, per-connection errors
  (an `accept()` that failed with EMFILE: it pauses that listener for a second and goes
  on). Ours logs them (rate-limited), counts them through `on_error(kind)` and never
  raises: running out of descriptors refuses connections, it never ends the gateway;
- `run_aio(fn, *args)`: await an asyncio coroutine function from trio;
- `run_trio(fn, *args)`: await a trio function from asyncio;
- `call_trio_sync(fn, *args)`: call a synchronous trio-side function (one that never
  awaits, such as Lease.release) from an asyncio callback. Both loops run in one thread,
  so this is a plain call; the name marks the crossing for readers and reviews;
- `AsyncioTasks`: the supervisor of asyncio tasks (a relay opening its upstream
  channel, the grace sweeper): each is tracked, its failure is logged rather than lost,
  and `cancel_all()` ends them at shutdown.

Three changes to trio-asyncio itself (`_lean_io_wakeups`, on the tested version only),
measured with bench/sessions.py and bench/compare.py (docs/benchmarks.md):
- descriptors: trio-asyncio waits for each asyncio reader and writer in a trio task of its
  own (about 2.8 KiB each, two per relayed session) and, after each readiness callback,
  round-trips through its main loop task even when nothing was queued. Here one task
  watches them all in one epoll set (`_IoHub`), runs the callbacks of every ready one in a
  pass, as asyncio does, and lets the queue drain only when they queued something (asyncio's
  order: what a read queues runs before the next read). Memory per idle session 47 → 40 KiB,
  logins per gateway CPU-second +25 %, relay CPU per GiB -17 % (with the round trip alone);
- its main loop runs one callback per trio turn (a cancel scope, a channel receive and a
  task switch each; a login queues about 85). It now runs the ones already queued behind
  it too, in order, up to MAIN_LOOP_BATCH, as a pass of asyncio's own loop does (logins
  per gateway CPU-second +35 %).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

import heapq
import select

import trio
import trio_asyncio
from sniffio import thread_local as sniffio_library
from trio_asyncio import _async as _trio_asyncio_async
from trio_asyncio import _base as _trio_asyncio_base
from trio_asyncio import _handles as _trio_asyncio_handles

log = logging.getLogger(__name__)

TESTED_TRIO_ASYNCIO = ("0.16.",)
MAIN_LOOP_BATCH = 64  # callbacks run back to back before trio's other tasks get a turn

T = TypeVar("T")

LOOP_ERROR_LOG_EVERY = 10.0
CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


def loop_error_kind(context: dict) -> str:
    """A bounded label for an error asyncio reported: accept_descriptors, accept or other."""
    exc = context.get("exception")
    if "accept" in str(context.get("message", "")):
        if isinstance(exc, OSError) and exc.errno in CAPACITY_ERRNOS:
            return "accept_descriptors"
        return "accept"
    return "other"


class LoopErrors:
    """The asyncio loop's exception handler: log (at most once per kind per 10 s), count, never raise."""

    def __init__(self, on_error: Callable[[str], None] | None = None):
        self.on_error = on_error
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def __call__(self, loop: Any, context: dict) -> None:
        kind = loop_error_kind(context)
        if self.on_error is not None:
            try:
                self.on_error(kind)
            except Exception:  # counting must never be what ends the process
                log.exception("loop error callback failed")
        now = time.monotonic()
        if now - self._last.get(kind, -LOOP_ERROR_LOG_EVERY) < LOOP_ERROR_LOG_EVERY:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._last[kind] = now
        exc = context.get("exception")
        more = self._suppressed.pop(kind, 0)
        if kind == "accept_descriptors":
            log.error("accept failed: out of file descriptors (connections are refused until some close; "
                      "the gateway keeps serving) error=%s suppressed=%d", exc, more)
        else:
            log.error("asyncio error kind=%s message=%s error=%r suppressed=%d", kind,
                      context.get("message", ""), exc, more, exc_info=exc if kind == "other" else None)


def _lean_io_wakeups() -> bool:
    """Install the lean readiness task (module doc) once; False on an untested trio-asyncio."""
    L = _trio_asyncio_base.BaseTrioEventLoop
    A = _trio_asyncio_async.TrioEventLoop
    if getattr(L, "_fg_lean", False):
        return True
    if (not trio_asyncio.__version__.startswith(TESTED_TRIO_ASYNCIO) or not hasattr(L, "_add_io_handler")
            or "_queue_handle" not in vars(A) or not hasattr(L, "_main_loop_one")):
        log.warning("trio-asyncio %s is not the tested version: readiness callbacks keep their full "
                    "round trip (slower, same behaviour)", trio_asyncio.__version__)
        return False

    queue_handle = A._queue_handle

    def _queue_handle(self: Any, handle: Any) -> Any:
        # Counted, since a handle given straight to the waiting main loop task leaves the
        # channel's buffer empty: only the count says that the callback queued something.
        self._fg_queued += 1
        return queue_handle(self, handle)

    main_loop_one = L._main_loop_one

    async def _main_loop_one(self: Any, no_wait: bool = False) -> None:
        # One callback as trio-asyncio does (waiting for it, timers first), then the ones
        # already queued behind it, as one pass of asyncio's own loop runs what is ready:
        # not a cancel scope, a channel receive and a task switch for each (~85 per login).
        await main_loop_one(self, no_wait)
        for _ in range(MAIN_LOOP_BATCH):
            try:
                obj = self._q_recv.receive_nowait()
            except trio.WouldBlock:
                return
            if isinstance(obj, asyncio.TimerHandle):
                heapq.heappush(self._timers, obj)
            elif isinstance(obj, _trio_asyncio_handles.AsyncHandle):
                obj._context.run(self._nursery.start_soon, obj._run, name=obj._callback)
                await obj._started.wait()
            elif not obj._cancelled:
                previous, sniffio_library.name = sniffio_library.name, "asyncio"
                try:
                    obj._run()
                finally:
                    sniffio_library.name = previous

    def _add_io_handler(self: Any, set_handle: Any, wait_ready: Any, fd: Any, callback: Any, args: Any) -> Any:
        # One epoll set for every asyncio reader and writer, not a trio task per descriptor.
        self._check_closed()
        fd = fd.fileno() if hasattr(fd, "fileno") else fd
        writing = wait_ready is _trio_asyncio_base._wait_writable
        hub = self.__dict__.get("_fg_hub")
        if hub is None:
            hub = self._fg_hub = _IoHub(self)
        handle = _HubHandle(callback, args, self, hub, fd, writing)
        old_handle = set_handle(fd, handle)
        if old_handle is not None:
            old_handle.cancel()
        hub.add(fd, writing, handle)
        if self._token is not None:
            hub.start()
        return handle

    L._fg_queued = 0
    A._queue_handle = _queue_handle
    L._main_loop_one = _main_loop_one
    L._add_io_handler = _add_io_handler
    L._fg_lean = True
    return True


class _HubHandle(asyncio.Handle):
    """An asyncio reader or writer in the _IoHub; cancel() takes it out."""

    __slots__ = ("_hub", "_fd", "_writing", "_scope")

    def __init__(self, callback: Any, args: Any, loop: Any, hub: "_IoHub", fd: int, writing: bool):
        super().__init__(callback, args, loop)
        self._hub, self._fd, self._writing = hub, fd, writing
        self._scope = None  # trio-asyncio's shutdown looks for one (its handles each have a task)

    def cancel(self) -> None:
        super().cancel()
        self._hub.discard(self._fd, self._writing, self)


class _IoHub:
    """The asyncio loop's descriptors in one epoll set, watched by one trio task.

    trio-asyncio waits for each descriptor in a trio task of its own (about 2.8 KiB per
    descriptor, two per relayed session, and a task switch per readiness). Here one task
    waits for the set, then runs the callbacks of every ready descriptor in that pass, as
    asyncio's own loop does (level-triggered, readable or writable including HUP/ERR), and
    lets the asyncio queue drain (synchronize) if they queued anything."""

    MAX_EVENTS = 256

    def __init__(self, loop: Any):
        self.loop = loop
        self.epoll = select.epoll()
        self.handles: dict[int, list[Any]] = {}  # fd -> [reader, writer]
        self.started = False

    def _mask(self, pair: list[Any]) -> int:
        return (select.EPOLLIN if pair[0] is not None else 0) | (select.EPOLLOUT if pair[1] is not None else 0)

    def add(self, fd: int, writing: bool, handle: Any) -> None:
        pair = self.handles.get(fd)
        if pair is None:
            pair = self.handles[fd] = [None, None]
        pair[writing] = handle
        mask = self._mask(pair)
        try:
            self.epoll.register(fd, mask)
        except FileExistsError:
            self.epoll.modify(fd, mask)

    def discard(self, fd: int, writing: bool, handle: Any) -> None:
        pair = self.handles.get(fd)
        if pair is None or pair[writing] is not handle:
            return
        pair[writing] = None
        try:
            if pair[0] is None and pair[1] is None:
                del self.handles[fd]
                self.epoll.unregister(fd)
            else:
                self.epoll.modify(fd, self._mask(pair))
        except (OSError, ValueError):  # closed already: the kernel dropped it from the set
            pass

    def start(self) -> None:
        if not self.started:
            self.started = True
            self.loop._nursery.start_soon(self.run, name="fleetgate asyncio io hub")

    async def run(self) -> None:
        loop = self.loop
        epoll = self.epoll
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll.fileno())
                queued = loop._fg_queued
                for fd, events in epoll.poll(0, self.MAX_EVENTS):
                    pair = self.handles.get(fd)
                    if pair is None:
                        continue
                    reader, writer = pair
                    if reader is not None and events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR) \
                            and not reader._cancelled:
                        reader._run()
                    if writer is not None and events & (select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR) \
                            and not writer._cancelled and pair[1] is writer:
                        writer._run()
                if loop._fg_queued != queued:
                    await loop.synchronize()
        finally:
            self.started = False
            epoll.close()
            loop.__dict__.pop("_fg_hub", None)


@asynccontextmanager
async def open_loop(on_error: Callable[[str], None] | None = None) -> AsyncIterator[Any]:
    """The asyncio loop inside trio, with an exception handler that never ends the process."""
    _lean_io_wakeups()
    async with trio_asyncio.open_loop() as loop:
        loop.set_exception_handler(LoopErrors(on_error))
        _cap_accepts(loop)
        yield loop


ACCEPT_BATCH = 16  # connections accepted per readiness pass of a listener (fdlimit.ACCEPT_HEADROOM)


def _cap_accepts(loop: Any) -> None:
    """Accept at most ACCEPT_BATCH connections per pass of a listener, not `backlog` (1024).

    asyncio's accept loop takes up to the listen backlog in one callback, before any of them
    reaches the pre-auth limits; a flood thus opened up to 1024 descriptors beyond
    limits.max_unauthenticated before an eviction could free one, and accept() failed with
    EMFILE (issue 25: 649 in one burst). The listen queue keeps its length; the rest wait in
    it for the next pass (the socket stays readable), after the evictions of this one."""
    original = getattr(loop, "_accept_connection", None)
    if original is None or getattr(original, "_fg_capped", False):
        return

    def capped(protocol_factory: Any, sock: Any, sslcontext: Any = None, server: Any = None,
               backlog: int = 100, *rest: Any) -> Any:
        return original(protocol_factory, sock, sslcontext, server, min(backlog, ACCEPT_BATCH), *rest)

    capped._fg_capped = True  # type: ignore[attr-defined]
    loop._accept_connection = capped


async def run_aio(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """From trio: run an asyncio coroutine function to completion."""
    return await trio_asyncio.aio_as_trio(fn)(*args)


async def run_trio(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """From asyncio: run a trio function to completion (cancelling the asyncio side cancels it)."""
    return await trio_asyncio.trio_as_aio(fn)(*args)


def call_trio_sync(fn: Callable[..., T], *args: Any) -> T:
    """From an asyncio callback: call a trio-side function that never awaits."""
    return fn(*args)


class AsyncioTasks:
    """Owns the asyncio tasks fleetgate starts; nothing runs unsupervised."""

    def __init__(self, name: str):
        self.name = name
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, coro_fn: Callable[[], Awaitable[Any]]) -> asyncio.Task:
        task = asyncio.ensure_future(coro_fn())
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("asyncio task failed owner=%s error=%s: %s", self.name, type(exc).__name__, exc,
                      exc_info=exc)

    def cancel_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    def __len__(self) -> int:
        return len(self._tasks)

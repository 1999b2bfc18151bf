"""The trio-asyncio bridge: readiness callbacks keep asyncio's order without a round trip per chunk."""

from __future__ import annotations

import os

import trio

from fleetgate.ssh import bridge


async def test_lean_wakeups_keep_asyncio_order_and_skip_the_round_trip_when_nothing_was_queued(monkeypatch):
    assert bridge._lean_io_wakeups()
    r, w = os.pipe()
    os.set_blocking(r, False)
    events: list[str] = []
    syncs = 0
    try:
        async with bridge.open_loop() as loop:
            synchronize = loop.synchronize

            async def counting_synchronize() -> None:
                nonlocal syncs
                syncs += 1
                await synchronize()

            monkeypatch.setattr(loop, "synchronize", counting_synchronize)
            got = trio.Event()

            def readable() -> None:
                data = os.read(r, 100)
                events.append(f"read {data.decode()}")
                if data == b"b":  # asyncio: what a callback queues runs before the next read
                    loop.call_soon(events.append, "queued by b")
                if data == b"c":
                    got.set()

            loop.add_reader(r, readable)
            with trio.fail_after(10):
                os.write(w, b"a")
                while len(events) < 1:
                    await trio.sleep(0)  # let the reader task run (nothing to await: asyncio callback)
                assert syncs == 0, "nothing was queued: no round trip through the asyncio main loop"
                os.write(w, b"b")
                while len(events) < 2:
                    await trio.sleep(0)
                os.write(w, b"c")
                await got.wait()
            loop.remove_reader(r)
            assert events == ["read a", "read b", "queued by b", "read c"], events
            assert syncs == 1
    finally:
        os.close(r)
        os.close(w)


def test_the_lean_task_is_installed_only_on_the_tested_trio_asyncio(monkeypatch):
    import trio_asyncio

    assert trio_asyncio.__version__.startswith(bridge.TESTED_TRIO_ASYNCIO)
    assert getattr(bridge._trio_asyncio_base.BaseTrioEventLoop, "_fg_lean", False) or bridge._lean_io_wakeups()


async def test_queued_callbacks_run_in_order_in_batches_and_trio_tasks_still_get_turns():
    """Callbacks already queued run back to back (one asyncio loop pass), in the order they
    were queued, including ones queued while the batch runs; a batch is bounded, so a flood
    of callbacks does not keep trio's own tasks from running."""
    assert bridge._lean_io_wakeups()
    order: list[int] = []
    trio_turns = 0
    async with bridge.open_loop() as loop:
        done = trio.Event()

        def callback(i: int) -> None:
            order.append(i)
            if i % 10 == 0 and i < 1000:
                loop.call_soon(callback, 1000 + i)  # queued during the batch: runs after the others
            if len(order) == 1100:
                done.set()

        async def other_trio_task() -> None:
            nonlocal trio_turns
            while not done.is_set():
                trio_turns += 1
                await trio.sleep(0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(other_trio_task)
            await trio.sleep(0)
            for i in range(1000):
                loop.call_soon(callback, i)
            with trio.fail_after(10):
                await done.wait()
    assert order == list(range(1000)) + [1000 + i for i in range(0, 1000, 10)]
    # 1100 callbacks in batches of at most MAIN_LOOP_BATCH + 1: trio ran its other task in
    # between, but not once per callback (trio-asyncio alone switches tasks for each).
    assert 1100 // (bridge.MAIN_LOOP_BATCH + 1) - 1 <= trio_turns < 1100 // 4, trio_turns


async def test_io_hub_runs_readers_and_writers_of_one_descriptor_and_forgets_removed_ones():
    """One epoll set for all asyncio descriptors: a reader and a writer on the same
    descriptor, removing one keeps the other, a cancelled handle never runs again, and
    descriptors closed after removal leave nothing behind."""
    import socket

    assert bridge._lean_io_wakeups()
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    seen: list[str] = []
    try:
        async with bridge.open_loop() as loop:
            readable, writable = trio.Event(), trio.Event()

            def on_read() -> None:
                seen.append("read " + a.recv(100).decode())
                readable.set()

            def on_write() -> None:
                seen.append("write")
                loop.remove_writer(a.fileno())  # level-triggered: once is enough
                writable.set()

            loop.add_reader(a.fileno(), on_read)
            loop.add_writer(a.fileno(), on_write)
            with trio.fail_after(10):
                await writable.wait()
                b.send(b"x")
                await readable.wait()
            hub = loop._fg_hub
            assert hub.handles[a.fileno()][1] is None  # (the loop's own self-pipe is in the set too)
            readable = trio.Event()
            loop.remove_reader(a.fileno())
            assert a.fileno() not in hub.handles
            b.send(b"y")  # nobody reads it now; a new reader on the descriptor gets it (once)
            loop.add_reader(a.fileno(), on_read)
            with trio.fail_after(10):
                await readable.wait()
            loop.remove_reader(a.fileno())
            assert seen == ["write", "read x", "read y"]
    finally:
        a.close()
        b.close()


async def test_io_hub_takes_a_descriptor_number_again_after_it_was_closed_without_removal():
    """A descriptor closed while still registered leaves the epoll set (the kernel drops it);
    a new socket that gets the same number must register, not fail: the stale handle is
    cancelled (its unregister finds nothing, and that is not an error) and the new one works."""
    import socket

    assert bridge._lean_io_wakeups()
    async with bridge.open_loop() as loop:
        a, b = socket.socketpair()
        number = a.fileno()
        loop.add_reader(number, lambda: None)
        a.close()  # without remove_reader
        c, d = socket.socketpair()
        try:
            if c.fileno() != number:  # the kernel handed out the lowest free number: it should be ours
                c, d = d, c
            assert c.fileno() == number
            got = trio.Event()
            loop.add_reader(c.fileno(), got.set)
            d.send(b"x")
            with trio.fail_after(10):
                await got.wait()
            loop.remove_reader(c.fileno())
        finally:
            for s in (b, c, d):
                s.close()

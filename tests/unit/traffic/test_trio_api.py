"""The API the emulated host uses from trio: the send loop must not block the event loop, and
cancelling the caller must stop the traffic."""

from __future__ import annotations

import socket
import time

import trio

from emu.traffic import InjectStats, TrafficSpec, inject


async def test_inject_runs_beside_trio_tasks() -> None:
    rx = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await rx.bind(("127.0.0.1", 0))
    port = rx.getsockname()[1]
    received = ticks = 0
    done = trio.Event()

    async def receive() -> None:
        nonlocal received
        with trio.move_on_after(5):
            while received < 400:
                await rx.recv(2048)
                received += 1

    async def tick() -> None:
        nonlocal ticks
        while not done.is_set():
            await trio.sleep(0.01)
            ticks += 1

    result: list[InjectStats] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        nursery.start_soon(tick)
        result.append(await inject(TrafficSpec(ports=(port,), spoof=None), rate=2000, count=400))
        done.set()
    rx.close()
    stats = result[0]
    assert stats.sent == 400 and stats.stopped == "count" and stats.elapsed >= 0.199
    assert received == 400  # a trio task received every datagram while the injector ran
    assert ticks >= 5  # and the event loop kept ticking: the send loop ran in a thread


async def test_cancelling_the_caller_stops_the_traffic() -> None:
    counter = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    counter.bind(("127.0.0.1", 0))
    counter.setblocking(False)
    port = counter.getsockname()[1]

    def drain() -> int:
        n = 0
        while True:
            try:
                counter.recv(2048)
            except BlockingIOError:
                return n
            n += 1

    t0 = time.monotonic()
    with trio.move_on_after(0.3) as scope:
        await inject("udp-flood", port, spoof=None, rate=500, duration=30)
    assert scope.cancelled_caught and time.monotonic() - t0 < 2.0
    await trio.sleep(0.1)  # the worker thread sees the stop flag within one batch
    drain()
    await trio.sleep(0.3)
    assert drain() == 0  # nothing more is sent after cancellation
    counter.close()


async def test_isolated_injection_runs_in_a_child_process() -> None:
    rx = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await rx.bind(("127.0.0.1", 0))
    port = rx.getsockname()[1]
    received = 0

    async def receive() -> None:
        nonlocal received
        with trio.move_on_after(10):
            while received < 500:
                await rx.recv(2048)
                received += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        stats = await inject("udp-flood", port, spoof=None, rate=5000, count=500, isolate=True)
    rx.close()
    assert (stats.method, stats.sent, stats.stopped) == ("socket", 500, "count") and stats.elapsed >= 0.0998
    assert received == 500


async def test_isolated_injection_reports_a_missing_listener() -> None:
    import pytest

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(ConnectionRefusedError, match="is something listening"):
        await inject("tcp-stream", port, count=1, spoof=None, isolate=True)


async def test_cancelling_an_isolated_injection_stops_the_process() -> None:
    counter = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    counter.bind(("127.0.0.1", 0))
    counter.setblocking(False)
    t0 = time.monotonic()
    with trio.move_on_after(1.0) as scope:
        await inject("udp-flood", counter.getsockname()[1], spoof=None, rate=500, duration=30, isolate=True)
    assert scope.cancelled_caught and time.monotonic() - t0 < 5.0
    await trio.sleep(0.2)
    while True:
        try:
            counter.recv(2048)
        except BlockingIOError:
            break
    await trio.sleep(0.3)
    try:
        counter.recv(2048)
        raise AssertionError("traffic continued after cancellation")
    except BlockingIOError:
        pass
    counter.close()

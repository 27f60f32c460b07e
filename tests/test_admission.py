"""The ingress's door (``AdmissionGate``) alone: FIFO hand-over, a full queue and the queue
deadline shed with 503 ``overloaded``, ``Retry-After`` from the measured drain rate, and a
caller that goes away leaves no trace. Pure asyncio; the running server is tested in
``tests/test_unreached.py``."""

from __future__ import annotations

import asyncio

import pytest

from serve_app.deployments.admission import AdmissionGate
from serve_app.errors import Overloaded


async def _hold(gate: AdmissionGate, name: str, order: list[str], release: asyncio.Event) -> None:
    async with gate.slot():
        order.append(name)
        await release.wait()


async def _until(condition, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.001)


def test_waiters_get_in_in_arrival_order_and_a_full_queue_sheds_at_once() -> None:
    async def scenario() -> None:
        gate = AdmissionGate(max_active=1, max_waiting=2, timeout_s=30)
        order: list[str] = []
        releases = {n: asyncio.Event() for n in "abc"}
        tasks = {}
        for name in "abc":
            tasks[name] = asyncio.create_task(_hold(gate, name, order, releases[name]))
            await _until(lambda n=name: gate.active + gate.waiting == "abc".index(n) + 1)
        assert (gate.active, gate.waiting, order) == (1, 2, ["a"])

        with pytest.raises(Overloaded) as shed:
            async with gate.slot():
                pass
        assert shed.value.status == 503 and shed.value.code == "overloaded"
        assert int(shed.value.headers()["Retry-After"]) >= 1
        assert (gate.active, gate.waiting) == (1, 2)  # the refused one took no place

        releases["a"].set()
        await _until(lambda: order == ["a", "b"])
        assert (gate.active, gate.waiting) == (1, 1)  # handed over, not re-counted
        releases["b"].set()
        releases["c"].set()
        await asyncio.gather(*tasks.values())
        assert order == ["a", "b", "c"] and (gate.active, gate.waiting) == (0, 0)

    asyncio.run(scenario())


def test_a_request_waiting_past_the_deadline_is_shed_and_leaves() -> None:
    async def scenario() -> None:
        gate = AdmissionGate(max_active=1, max_waiting=5, timeout_s=0.2)
        release = asyncio.Event()
        holder = asyncio.create_task(_hold(gate, "a", [], release))
        await _until(lambda: gate.active == 1)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(Overloaded) as shed:
            async with gate.slot():
                pytest.fail("got in while the only place was held")
        waited = loop.time() - t0
        assert 0.2 <= waited < 5.0
        assert shed.value.code == "overloaded" and "waited" in shed.value.message
        assert (gate.active, gate.waiting) == (1, 0)
        release.set()
        await holder
        assert gate.active == 0

    asyncio.run(scenario())


def test_a_cancelled_waiter_leaves_no_trace() -> None:
    async def scenario() -> None:
        gate = AdmissionGate(max_active=1, max_waiting=5, timeout_s=30)
        release = asyncio.Event()
        holder = asyncio.create_task(_hold(gate, "a", [], release))
        await _until(lambda: gate.active == 1)
        waiter = asyncio.create_task(_hold(gate, "b", [], asyncio.Event()))
        await _until(lambda: gate.waiting == 1)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert gate.waiting == 0
        release.set()
        await holder
        assert (gate.active, gate.waiting) == (0, 0)
        async with gate.slot():  # the place is free again
            assert gate.active == 1

    asyncio.run(scenario())


def test_retry_after_is_the_drain_time_of_the_queue_ahead() -> None:
    now = [1000.0]
    gate = AdmissionGate(max_active=2, max_waiting=50, timeout_s=7, clock=lambda: now[0])
    assert gate.retry_after_s() == 7  # nothing measured yet: the queue deadline

    async def finish(n: int, every_s: float) -> None:
        for _ in range(n):
            async with gate.slot():
                now[0] += every_s

    asyncio.run(finish(20, 0.5))  # 20 completions in 10 s: 2 per second
    assert gate.drain_rate() == pytest.approx(2.0)

    async def with_queue() -> int:
        releases = [asyncio.Event() for _ in range(8)]
        tasks = [asyncio.create_task(_hold(gate, str(i), [], r)) for i, r in enumerate(releases)]
        await _until(lambda: gate.active + gate.waiting == 8)
        value = gate.retry_after_s()
        for r in releases:
            r.set()
        await asyncio.gather(*tasks)
        return value

    assert asyncio.run(with_queue()) == 4  # 8 ahead at 2 per second

    now[0] += 60  # the window forgets old completions
    assert gate.drain_rate() == 0.0


def test_a_request_that_would_wait_past_the_deadline_is_shed_on_arrival() -> None:
    now = [1000.0]
    gate = AdmissionGate(max_active=2, max_waiting=50, timeout_s=7, clock=lambda: now[0])

    async def scenario() -> tuple[int, str]:
        for _ in range(20):  # 20 completions in 10 s: 2 per second
            async with gate.slot():
                now[0] += 0.5
        release = asyncio.Event()
        tasks = [asyncio.create_task(_hold(gate, str(i), [], release)) for i in range(16)]
        await _until(lambda: gate.active + gate.waiting == 16)
        # 14 waiting drain in 7 s at 2 per second; a 15th would wait past the 7 s deadline.
        with pytest.raises(Overloaded) as shed:
            async with gate.slot():
                pass
        waiting = gate.waiting
        release.set()
        await asyncio.gather(*tasks)
        return waiting, shed.value.message

    waiting, message = asyncio.run(scenario())
    assert waiting == 14 and "deadline" in message
    assert gate.waiting == 0


def test_bad_settings_are_refused() -> None:
    for args in [(0, 1, 1.0), (1, -1, 1.0), (1, 1, 0.0)]:
        with pytest.raises(ValueError):
            AdmissionGate(*args)

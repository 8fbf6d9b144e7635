"""The decode budget: bounded pixels in flight, waiting within a deadline, refusals, and
freed memory handed back once it falls idle."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.model.decode_budget import BYTES_PER_PIXEL, DecodeBudget
from service.model.errors import DeadlineExceededError, LimitExceededError
from service.model.memory import FreedMemory, configure_allocator, release_free_memory


def test_holders_never_exceed_the_budget() -> None:
    budget = DecodeBudget(100)
    lock = threading.Lock()
    in_use, peak = [0], [0]

    def decode(pixels: int) -> None:
        with budget.reserve(pixels):
            with lock:
                in_use[0] += pixels
                peak[0] = max(peak[0], in_use[0])
            time.sleep(0.01)
            with lock:
                in_use[0] -= pixels

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(decode, [60, 30, 40, 70, 10, 100, 20, 50] * 3))
    assert 0 < peak[0] <= 100
    assert budget.in_use == 0


def test_a_reservation_that_can_never_fit_is_refused_at_once_naming_the_setting() -> None:
    budget = DecodeBudget(100)
    with (
        pytest.raises(LimitExceededError, match=r"over the limit of 100 \(max_decode_pixels\)"),
        budget.reserve(101, index=2),
    ):
        pass


def test_waiting_ends_at_the_deadline() -> None:
    budget = DecodeBudget(100)
    with budget.reserve(80):
        started = time.monotonic()
        with (
            pytest.raises(DeadlineExceededError, match="waiting for decode memory"),
            budget.reserve(30, deadline=time.monotonic() + 0.1),
        ):
            pass
        assert 0.09 <= time.monotonic() - started < 2
    with budget.reserve(100):  # all of it is free again
        pass


def test_a_waiter_gets_room_when_a_holder_finishes() -> None:
    budget = DecodeBudget(100)
    got_in = threading.Event()
    with budget.reserve(90):

        def wait_for_room() -> None:
            with budget.reserve(50):
                got_in.set()

        waiter = threading.Thread(target=wait_for_room)
        waiter.start()
        assert not got_in.wait(0.1)
    assert got_in.wait(5)
    waiter.join(5)


def test_freed_decode_memory_is_released_when_the_budget_falls_idle() -> None:
    released: list[int] = []
    freed = FreedMemory(every=1000 * BYTES_PER_PIXEL, release=lambda: released.append(1))
    budget = DecodeBudget(10_000, freed)
    with budget.reserve(600):
        with budget.reserve(600):
            pass
        assert released == []  # not idle yet: one decode is still running
    assert released == [1]  # 1200 pixels freed and nothing running
    with budget.reserve(100):
        pass
    assert released == [1]  # below the threshold
    assert freed.release_if_due(idle=True) and released == [1, 1]  # the idle tick takes it
    assert not freed.release_if_due(idle=True)  # nothing new since


def test_the_allocator_hooks_work_on_this_platform() -> None:
    configure_allocator()
    release_free_memory()  # glibc here; a no-op elsewhere, never an error

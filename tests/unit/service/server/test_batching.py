"""The dynamic batcher against a fake runner (DESIGN.md's seam): batching, order, limits,
deadlines, cancellation and failure isolation."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from service.model.errors import DeadlineExceededError, InferenceError, QueueFullError
from service.server.batching import BatcherConfig, BatcherHooks, DynamicBatcher


def image(tag: int) -> np.ndarray:
    return np.full((2, 2, 3), tag, dtype=np.uint8)


class FakeRunner:
    """Echoes each image's tag; records batches; can block, fail or misbehave on demand."""

    def __init__(self, delay: float = 0.0, poison: int | None = None, drop_row: bool = False):
        self.delay = delay
        self.poison = poison
        self.drop_row = drop_row
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, items: list[np.ndarray]) -> dict[str, np.ndarray]:
        self.gate.wait(10)
        images = np.stack(items)
        tags = [int(t) for t in images[:, 0, 0, 0]]
        self.batches.append(tags)
        time.sleep(self.delay)
        if self.poison is not None and self.poison in tags:
            raise RuntimeError("poisoned batch")
        out = np.array(tags, dtype=np.int64)
        return {"tag": out[:-1] if self.drop_row else out}


class CountingHooks(BatcherHooks):
    def __init__(self) -> None:
        self.dropped_counts: dict[str, int] = {}

    def dropped(self, reason: str, count: int) -> None:
        self.dropped_counts[reason] = self.dropped_counts.get(reason, 0) + count


def run(coro_fn: Callable[[], object]) -> object:
    return asyncio.run(coro_fn())  # type: ignore[arg-type]


def make(runner: FakeRunner, **config: object) -> tuple[DynamicBatcher, CountingHooks]:
    hooks = CountingHooks()
    batcher = DynamicBatcher("fake/1", runner, BatcherConfig(**config), hooks=hooks)  # type: ignore[arg-type]
    return batcher, hooks


def test_concurrent_requests_are_batched_and_answers_keep_their_order() -> None:
    runner = FakeRunner(delay=0.02)

    async def main() -> None:
        batcher, _ = make(runner, max_batch_size=8, max_queue_delay_us=20_000)
        batcher.start()

        async def request(first: int) -> list[int]:
            futures = batcher.submit([image(first + i) for i in range(3)])
            return [int(r["tag"]) for r in await asyncio.gather(*futures)]

        answers = await asyncio.gather(*(request(10 * k) for k in range(12)))
        assert answers == [[10 * k, 10 * k + 1, 10 * k + 2] for k in range(12)]
        await batcher.close()

    run(main)
    assert max(len(b) for b in runner.batches) > 1
    assert all(len(b) <= 8 for b in runner.batches)
    assert sorted(t for b in runner.batches for t in b) == sorted(
        10 * k + i for k in range(12) for i in range(3)
    )


def test_full_queue_refuses_the_whole_request_at_once() -> None:
    runner = FakeRunner()
    runner.gate.clear()  # the runner blocks: nothing leaves the queue

    async def main() -> None:
        batcher, _ = make(runner, max_batch_size=2, max_queue_delay_us=0, max_queue_size=4)
        batcher.start()
        first = batcher.submit([image(1), image(2)])  # taken into a (blocked) batch
        await asyncio.sleep(0.05)
        queued = batcher.submit([image(3), image(4), image(5), image(6)])
        with pytest.raises(QueueFullError, match="limit is 4"):
            batcher.submit([image(7)])
        assert batcher.pending == 4  # the refused request added nothing
        runner.gate.set()
        assert [int(r["tag"]) for r in await asyncio.gather(*first, *queued)] == [1, 2, 3, 4, 5, 6]
        await batcher.close()

    run(main)


def test_expired_items_are_dropped_before_compute() -> None:
    runner = FakeRunner()

    async def main() -> None:
        batcher, hooks = make(runner, max_batch_size=4, max_queue_delay_us=50_000)
        batcher.start()
        late = batcher.submit([image(1)], deadline=time.monotonic() - 1)
        fine = batcher.submit([image(2)], deadline=time.monotonic() + 30)
        with pytest.raises(DeadlineExceededError):
            await late[0]
        assert int((await fine[0])["tag"]) == 2
        await batcher.close()
        assert hooks.dropped_counts == {"deadline": 1}

    run(main)
    assert runner.batches == [[2]]


def test_cancelled_items_are_dropped_before_compute() -> None:
    runner = FakeRunner()

    async def main() -> None:
        batcher, hooks = make(runner, max_batch_size=4, max_queue_delay_us=50_000)
        batcher.start()
        gone = batcher.submit([image(1), image(2)])
        kept = batcher.submit([image(3)])
        for future in gone:
            future.cancel()  # what the servicer does when the RPC is cancelled
        assert int((await kept[0])["tag"]) == 3
        await batcher.close()
        assert hooks.dropped_counts == {"cancelled": 2}

    run(main)
    assert runner.batches == [[3]]


def test_a_failing_batch_fails_only_its_own_items() -> None:
    runner = FakeRunner(poison=13)

    async def main() -> None:
        batcher, _ = make(runner, max_batch_size=2, max_queue_delay_us=0)
        batcher.start()
        bad = batcher.submit([image(13), image(14)])
        results = await asyncio.gather(*bad, return_exceptions=True)
        assert all(isinstance(r, InferenceError) for r in results)
        assert "poisoned batch" in str(results[0])
        good = batcher.submit([image(15), image(16)])
        assert [int(r["tag"]) for r in await asyncio.gather(*good)] == [15, 16]
        await batcher.close()

    run(main)


def test_output_count_must_equal_input_count() -> None:
    runner = FakeRunner(drop_row=True)

    async def main() -> None:
        batcher, _ = make(runner, max_batch_size=3, max_queue_delay_us=10_000)
        batcher.start()
        results = await asyncio.gather(
            *batcher.submit([image(1), image(2), image(3)]), return_exceptions=True
        )
        assert all(isinstance(r, InferenceError) for r in results)
        assert "returned [2] rows for a batch of 3" in str(results[0])
        await batcher.close()

    run(main)


def test_preferred_batch_size_dispatches_without_waiting_the_delay() -> None:
    runner = FakeRunner()

    async def main() -> None:
        # A 30 s delay: only the preferred-size rule can answer within the 5 s timeout.
        batcher, _ = make(
            runner, max_batch_size=8, max_queue_delay_us=30_000_000, preferred_batch_sizes=(4,)
        )
        batcher.start()
        futures = batcher.submit([image(i) for i in range(4)])
        await asyncio.wait_for(asyncio.gather(*futures), timeout=5)
        await batcher.close()

    run(main)
    assert runner.batches == [[0, 1, 2, 3]]


def test_full_batch_dispatches_immediately_and_close_drains() -> None:
    runner = FakeRunner()

    async def main() -> None:
        batcher, _ = make(runner, max_batch_size=2, max_queue_delay_us=30_000_000)
        batcher.start()
        futures = batcher.submit([image(i) for i in range(5)])
        await asyncio.wait_for(asyncio.gather(*futures[:4]), timeout=5)
        await asyncio.wait_for(batcher.close(), timeout=5)  # the odd one out is answered
        assert int(futures[4].result()["tag"]) == 4

    run(main)
    assert runner.batches == [[0, 1], [2, 3], [4]]


def test_concurrency_runs_batches_in_parallel() -> None:
    barrier = threading.Barrier(4, timeout=5)

    def run_batch(items: list[np.ndarray]) -> dict[str, np.ndarray]:
        barrier.wait()  # only returns once 4 batches are executing at the same time
        return {"tag": np.stack(items)[:, 0, 0, 0].astype(np.int64)}

    async def main() -> None:
        batcher = DynamicBatcher(
            "fake/1",
            run_batch,
            BatcherConfig(max_batch_size=1, max_queue_delay_us=0, concurrency=4),
        )
        batcher.start()
        results = await asyncio.gather(*batcher.submit([image(i) for i in range(4)]))
        assert [int(r["tag"]) for r in results] == [0, 1, 2, 3]
        await batcher.close()

    run(main)


def test_admission_reserves_room_before_decoding_and_gives_back_what_was_not_used() -> None:
    runner = FakeRunner()

    async def main() -> None:
        batcher, _ = make(runner, max_batch_size=8, max_queue_delay_us=0, max_queue_size=5)
        batcher.start()
        first = batcher.admit(3)  # decoding...
        with pytest.raises(QueueFullError, match=r"3 images pending.*\(max_queue_size\)"):
            batcher.admit(3)  # refused before anything is decoded
        with batcher.admit(2):
            assert batcher.pending == 5
        assert batcher.pending == 3  # the second request failed while decoding: room back
        with first:
            futures = first.submit([image(1), image(2)])  # one of its images was bad
        assert batcher.pending <= 2
        assert [int(r["tag"]) for r in await asyncio.gather(*futures)] == [1, 2]
        assert batcher.pending == 0
        with batcher.admit(5):
            pass
        await batcher.close()

    run(main)


def test_a_deadline_that_cancelled_the_call_first_still_counts_as_deadline() -> None:
    runner = FakeRunner()

    async def main() -> dict[str, int]:
        batcher, hooks = make(runner, max_batch_size=8, max_queue_delay_us=200_000)
        batcher.start()
        futures = batcher.submit([image(1), image(2)], deadline=time.monotonic() + 0.05)
        await asyncio.sleep(0.06)
        for future in futures:  # what gRPC does when the call's deadline passes
            future.cancel()
        cancelled = batcher.submit([image(3)])
        cancelled[0].cancel()  # a caller that went away
        await asyncio.sleep(0.3)
        await batcher.close()
        return hooks.dropped_counts

    assert run(main) == {"deadline": 2, "cancelled": 1}
    assert runner.batches == []

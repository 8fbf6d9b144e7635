"""Dynamic batching per model version (asyncio; knows nothing of gRPC or ONNX Runtime).

Each image is one item: host pixels (uint8 H×W×3) or, with GPU decoding, a row already in
device memory; the batcher never looks inside, it hands each batch's items in order to
``run_batch``. A request is admitted before its images are decoded
(``admit(count)`` reserves room for all of them, or refuses the whole request at once with
QueueFullError, so a full server spends nothing on decoding what it cannot queue), then
submits its decoded images together and awaits one future per image, so its answers come
back in its own order whatever batches its images land in.

The collector forms a batch when it reaches ``max_batch_size``, when it reaches one of the
``preferred_batch_sizes`` and nothing else is waiting, or when the oldest item has waited
``max_queue_delay_us``. Before compute it drops items whose caller has gone (cancelled) or
whose deadline has passed (counted as ``deadline`` whether the caller's own deadline
cancelled it first or the collector found it expired). Up to ``concurrency`` batches run
at once, in a thread pool (ONNX Runtime releases the GIL). A failing batch fails exactly
its own items, and a batch whose outputs do not have one row per input fails as a whole
rather than mis-assign rows.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.model.errors import (
    DeadlineExceededError,
    InferenceError,
    QueueFullError,
    ServiceError,
    UnavailableError,
)

log = logging.getLogger(__name__)

Outputs = dict[str, np.ndarray]
BatchItem = Any  # np.ndarray, or service.model.gpu_decode.DeviceRow (the runner tells them apart)
RunBatch = Callable[[list[BatchItem]], Outputs]


@dataclass(frozen=True)
class BatcherConfig:
    max_batch_size: int = 32
    max_queue_delay_us: int = 2000
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 1024
    concurrency: int = 1


@dataclass(frozen=True)
class BatchTiming:
    """Where one batch's time went, in seconds (Triton's batch statistics): ``input``,
    from the batch's dispatch until the runner starts on it in the executor; ``infer``,
    the runner (assembling the batch, host→device copies and ONNX Runtime; the runner does
    them in one call); ``output``, splitting the outputs into rows and answering them."""

    input: float
    infer: float
    output: float

    @property
    def total(self) -> float:
        return self.input + self.infer + self.output


class BatchRow(dict[str, np.ndarray]):
    """One image's output row, when its batch was dispatched (``time.monotonic()``: a
    request's queue time ends when the last of its images' batches starts), and what the
    hooks made of the batch (its trace context, for the request's span to link to)."""

    __slots__ = ("batch", "dispatched")

    def __init__(self, row: dict[str, np.ndarray], dispatched: float, batch: Any = None):
        super().__init__(row)
        self.dispatched = dispatched
        self.batch = batch


class BatcherHooks:
    """Observation points (metrics); the default does nothing."""

    def queued(self, pending: int) -> None: ...
    def dropped(self, reason: str, count: int) -> None: ...
    def batch_done(
        self, size: int, dispatched: float, timing: BatchTiming, waits: Sequence[float]
    ) -> Any:
        """Called before the batch's rows are answered; what it returns, each row carries."""


class Admission:
    """Room reserved in a batcher's queue for one request's images.

    Use as a context manager: whatever was reserved and not submitted is given back on
    exit, whether the request failed while decoding or succeeded.
    """

    def __init__(self, batcher: DynamicBatcher, count: int):
        self._batcher = batcher
        self._count = count

    def submit(
        self, images: Sequence[BatchItem], deadline: float | None = None
    ) -> list[asyncio.Future[dict[str, np.ndarray]]]:
        if len(images) > self._count:
            raise ValueError(f"admitted {self._count} images, submitting {len(images)}")
        self._batcher._reserved -= len(images)
        self._count -= len(images)
        return self._batcher._enqueue(images, deadline)

    def release(self) -> None:
        if self._count:
            self._batcher._reserved -= self._count
            self._count = 0
            self._batcher._hooks.queued(self._batcher.pending)

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class Item:
    image: BatchItem
    future: asyncio.Future[dict[str, np.ndarray]]
    deadline: float | None  # time.monotonic() seconds; None: no deadline
    enqueued: float = field(default_factory=time.monotonic)


class DynamicBatcher:
    def __init__(
        self,
        name: str,
        run_batch: RunBatch,
        config: BatcherConfig,
        executor: Executor | None = None,
        hooks: BatcherHooks | None = None,
    ):
        self.name = name
        self.config = config
        self._run_batch = run_batch
        self._executor = executor
        self._hooks = hooks or BatcherHooks()
        self._queue: deque[Item] = deque()
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(config.concurrency)
        self._running: set[asyncio.Task[None]] = set()
        self._collector: asyncio.Task[None] | None = None
        self._closed = False
        self._reserved = 0  # admitted images still being decoded

    @property
    def pending(self) -> int:
        """Images admitted and not yet taken into a batch (decoding or queued)."""
        return len(self._queue) + self._reserved

    def start(self) -> None:
        if self._collector is None:
            self._collector = asyncio.get_running_loop().create_task(
                self._collect(), name=f"batcher-{self.name}"
            )

    def admit(self, count: int) -> Admission:
        """Reserve room for ``count`` images, or refuse the request (QueueFullError)."""
        if self._closed:
            raise UnavailableError(f"model {self.name} is shutting down")
        limit = self.config.max_queue_size
        pending = self.pending
        if pending + count > limit:
            raise QueueFullError(
                f"the queue of model {self.name} is full: {pending} images pending, "
                f"this request adds {count}, the limit is {limit} (max_queue_size); "
                "retry later"
            )
        self._reserved += count
        self._hooks.queued(self.pending)
        return Admission(self, count)

    def submit(
        self, images: Sequence[BatchItem], deadline: float | None = None
    ) -> list[asyncio.Future[dict[str, np.ndarray]]]:
        """Admit and queue a request's images; their futures resolve to one row each."""
        with self.admit(len(images)) as admission:
            return admission.submit(images, deadline)

    def _enqueue(
        self, images: Sequence[BatchItem], deadline: float | None
    ) -> list[asyncio.Future[dict[str, np.ndarray]]]:
        loop = asyncio.get_running_loop()
        futures = []
        for image in images:
            item = Item(image, loop.create_future(), deadline)
            self._queue.append(item)
            futures.append(item.future)
        self._hooks.queued(self.pending)
        self._wakeup.set()
        return futures

    async def close(self) -> None:
        """Finish what is queued and running, then stop."""
        self._closed = True
        self._wakeup.set()
        if self._collector is not None:
            await self._collector
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    # --- collector ----------------------------------------------------------------------

    async def _collect(self) -> None:
        delay = self.config.max_queue_delay_us / 1e6
        while True:
            if not self._queue:
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # Wait until the batch is full, preferred and idle, or the oldest is due.
            due = self._queue[0].enqueued + delay
            while not self._ready_to_dispatch(due):
                self._wakeup.clear()
                # asyncio.timeout, not wait_for: wait_for wraps the wait in a new task,
                # and this runs for nearly every image.
                try:
                    async with asyncio.timeout(max(0.0, due - time.monotonic())):
                        await self._wakeup.wait()
                except TimeoutError:
                    break
            await self._slots.acquire()  # at most `concurrency` batches in flight
            batch = self._take(self.config.max_batch_size)
            if not batch:
                self._slots.release()
                continue
            task = asyncio.get_running_loop().create_task(self._execute(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def _ready_to_dispatch(self, due: float) -> bool:
        n = len(self._queue)
        if n >= self.config.max_batch_size or self._closed or time.monotonic() >= due:
            return True
        return n in self.config.preferred_batch_sizes

    def _take(self, limit: int) -> list[Item]:
        """Pop up to ``limit`` live items, dropping cancelled and expired ones."""
        batch: list[Item] = []
        now = time.monotonic()
        cancelled = expired = 0
        while self._queue and len(batch) < limit:
            item = self._queue.popleft()
            expired_now = item.deadline is not None and item.deadline <= now
            if item.future.done():  # the caller is gone: its deadline, or a cancel
                if expired_now:
                    expired += 1
                else:
                    cancelled += 1
            elif expired_now:
                expired += 1
                item.future.set_exception(
                    DeadlineExceededError(
                        "the deadline passed while the image waited in the "
                        f"queue of model {self.name}"
                    )
                )
            else:
                batch.append(item)
        if cancelled:
            self._hooks.dropped("cancelled", cancelled)
        if expired:
            self._hooks.dropped("deadline", expired)
        self._hooks.queued(self.pending)
        return batch

    async def _execute(self, batch: list[Item]) -> None:
        dispatched = time.monotonic()
        try:
            # Assembling the batch copies every image: done in the executor, off the loop.
            outputs, ran = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._timed_run, [item.image for item in batch]
            )
            rows = {len(v) for v in outputs.values()}
            if rows != {len(batch)}:
                raise InferenceError(
                    f"model {self.name} returned {sorted(rows)} rows for a batch of {len(batch)}"
                )
        except Exception as exc:
            error = (
                exc
                if isinstance(exc, ServiceError)
                else InferenceError(f"inference failed for model {self.name}: {exc}")
            )
            if not isinstance(exc, ServiceError):
                log.exception("batch of %d failed on %s", len(batch), self.name)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
        else:
            answers = [{k: v[row] for k, v in outputs.items()} for row in range(len(batch))]
            started, finished = ran
            timing = BatchTiming(
                input=started - dispatched,
                infer=finished - started,
                output=time.monotonic() - finished,
            )
            try:
                made = self._hooks.batch_done(
                    len(batch), dispatched, timing, [dispatched - item.enqueued for item in batch]
                )
            except Exception:  # observing a batch must never keep its answers back
                log.exception("the hooks of a batch of %d failed on %s", len(batch), self.name)
                made = None
            for item, answer in zip(batch, answers, strict=True):
                if not item.future.done():
                    item.future.set_result(BatchRow(answer, dispatched, made))
        finally:
            self._slots.release()

    def _timed_run(self, items: list[BatchItem]) -> tuple[Outputs, tuple[float, float]]:
        """``run_batch``, and when it started and finished (in the executor's thread)."""
        started = time.monotonic()
        outputs = self._run_batch(items)
        return outputs, (started, time.monotonic())

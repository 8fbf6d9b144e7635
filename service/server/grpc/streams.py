"""Bidirectional streams of independent requests (classifier.v1 ``Stream``, the Open
Inference Protocol's ``ModelStreamInfer``): each request runs as soon as it arrives, up to
``window`` at once per stream (the stream reads no further until one is answered, so one
client cannot queue without bound), and each answer goes back as it is ready. The stream
ends when the client has closed its side and every request it sent has been answered; a
client that goes away cancels what is still running."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

# What the reader puts last, once every request it read has been answered.
_END_OF_STREAM = object()


async def answer_each(
    requests: AsyncIterator[Any], answer: Callable[[Any], Awaitable[Any]], window: int
) -> AsyncIterator[Any]:
    """``answer(request)`` for every request of the stream, yielded as each finishes
    (``answer`` turns a failure into an answer of its own; it must not raise)."""
    room = asyncio.Semaphore(window)
    answers: asyncio.Queue[Any] = asyncio.Queue()
    running: set[asyncio.Task[None]] = set()

    async def one(request: Any) -> None:
        try:
            answers.put_nowait(await answer(request))
        finally:
            room.release()

    async def read() -> None:
        try:
            async for request in requests:
                await room.acquire()
                task = asyncio.get_running_loop().create_task(one(request))
                running.add(task)
                task.add_done_callback(running.discard)
            while running:
                await asyncio.wait(set(running))
        finally:
            answers.put_nowait(_END_OF_STREAM)

    reader = asyncio.get_running_loop().create_task(read())
    try:
        while (item := await answers.get()) is not _END_OF_STREAM:
            yield item
        await reader  # the client's own error, if reading failed
    finally:
        reader.cancel()
        for task in list(running):
            task.cancel()

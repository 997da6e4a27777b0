"""Bidirectional streams that answer every request, many at once.

Requests on one stream may belong to many sessions; each gets its own task, so a slow session does not
hold up the others, while the session engine keeps each session's steps in order. Responses go out as
they complete.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

Req = TypeVar("Req")
Resp = TypeVar("Resp")


@dataclass(frozen=True, slots=True)
class _Failed:
    error: BaseException


_END = object()


async def answer_all(
    requests: AsyncIterable[Req], handle: Callable[[Req], Awaitable[Resp]], max_inflight: int
) -> AsyncIterator[Resp]:
    """Yield `handle(request)` for every request, in completion order, at most `max_inflight` at once.

    If `handle` raises, the stream ends with that exception: the other requests' tasks are cancelled.
    A handler that must keep the stream open answers errors in-band instead of raising.
    """
    responses: asyncio.Queue[object] = asyncio.Queue()
    slots = asyncio.Semaphore(max_inflight)
    tasks: set[asyncio.Task[None]] = set()

    async def answer(request: Req) -> None:
        try:
            responses.put_nowait(await handle(request))
        except Exception as err:  # noqa: BLE001 - handed to the stream, which ends with it
            responses.put_nowait(_Failed(err))
        finally:
            slots.release()

    async def read() -> None:
        try:
            async for request in requests:
                await slots.acquire()
                task = asyncio.create_task(answer(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*tasks)
        except Exception as err:  # noqa: BLE001 - a broken request stream ends the response stream
            responses.put_nowait(_Failed(err))
        responses.put_nowait(_END)

    reader = asyncio.create_task(read())
    try:
        while (item := await responses.get()) is not _END:
            if isinstance(item, _Failed):
                raise item.error
            yield item  # type: ignore[misc]
    finally:
        for task in (reader, *tasks):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(reader, *tasks, return_exceptions=True)

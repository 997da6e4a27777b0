"""Faults between the service and a real redis-server: a TCP proxy that loses replies.

`RedisProxy` forwards bytes both ways. Armed with `lose_reply(marker)`, the next command whose bytes
contain `marker` reaches Redis and is executed, and then the connection is cut before the reply is
relayed: exactly what a commit that timed out looks like to the service (applied, reported as failed).
`hold_replies()` delays every reply until `release()`, to kill a server while its step is committed but
unanswered. The proxy runs on the event loop that creates it.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field


@dataclass
class _Armed:
    marker: bytes
    count: int


@dataclass
class RedisProxy:
    upstream_port: int
    port: int = 0
    lost: int = 0  # replies lost so far
    _armed: list[_Armed] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)  # one a connection
    _pumps: set[asyncio.Task[None]] = field(default_factory=set)  # two a connection, one each way
    _open: bool = True
    _replies: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> RedisProxy:
        self._replies.set()
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def lose_reply(self, marker: bytes, count: int = 1) -> None:
        """The next `count` commands containing `marker` are executed; their connections are cut unanswered."""
        self._armed.append(_Armed(marker, count))

    def hold_replies(self) -> None:
        self._replies.clear()

    def release(self) -> None:
        self._replies.set()

    async def close(self) -> None:
        self._open = False
        self._replies.set()
        if self._server is not None:
            self._server.close()  # no new connection; waited for below, once the open ones are closed
        # Each connection ends once its pumps do. Its own task is never cancelled: asyncio's server (before
        # Python 3.12) logs a cancelled connection task as an unhandled error.
        for pump in list(self._pumps):
            pump.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()  # from Python 3.12 it waits for every connection to close

    async def _connection(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            client_w.close()
            self._tasks.discard(task)
            return
        if not self._open:  # closed while connecting
            for writer in (client_w, server_w):
                writer.close()
            self._tasks.discard(task)
            return
        cut = asyncio.Event()
        pumps = [
            asyncio.create_task(self._requests(client_r, server_w, cut)),
            asyncio.create_task(self._replies_to(server_r, client_w, cut)),
        ]
        self._pumps.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for writer in (client_w, server_w):
                with contextlib.suppress(Exception):
                    writer.close()
            self._pumps.difference_update(pumps)
            self._tasks.discard(task)

    async def _requests(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, cut: asyncio.Event) -> None:
        while data := await source.read(1 << 16):
            for armed in self._armed:
                if armed.marker in data:
                    armed.count -= 1
                    if armed.count == 0:
                        self._armed.remove(armed)
                    cut.set()
                    break
            sink.write(data)
            await sink.drain()

    async def _replies_to(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, cut: asyncio.Event) -> None:
        while data := await source.read(1 << 16):
            await self._replies.wait()
            if cut.is_set():  # Redis has answered, so it has executed the command: lose the answer
                self.lost += 1
                return
            if not self._open:
                return
            sink.write(data)
            await sink.drain()

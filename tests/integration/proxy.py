"""A TCP proxy on loopback that can freeze: it stops forwarding, and keeps every socket open.

What a network path that stops forwarding looks like to a client: its bytes are accepted
(the proxy's kernel acknowledges them) and no answer ever comes. A server-side timeout
cannot fire (the query never reaches the server); TCP keepalives are answered by the
proxy's kernel. New connections are accepted and frozen as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator


class FreezingProxy:
    """Forwards 127.0.0.1:`port` to `target_port` in a thread of its own."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._flowing: asyncio.Event | None = None
        self._ready = threading.Event()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._run, name="freezing-proxy", daemon=True)

    def __enter__(self) -> FreezingProxy:
        self._thread.start()
        assert self._ready.wait(10), "the proxy did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)  # the thread closes everything
        self._thread.join(10)

    def freeze(self) -> None:
        """Stop forwarding, in both directions, on every connection (new ones too)."""
        self._loop.call_soon_threadsafe(self._set, False)

    def thaw(self) -> None:
        """Forward again."""
        self._loop.call_soon_threadsafe(self._set, True)

    def _set(self, flowing: bool) -> None:
        assert self._flowing is not None
        if flowing:
            self._flowing.set()
        else:
            self._flowing.clear()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            # Stop accepting, end every connection's task (one may be opening its server
            # side right now), then close every socket before the loop: a transport left
            # to the garbage collector warns in whichever test runs then.
            self._server.close()
            tasks = asyncio.all_tasks(self._loop)
            for task in tasks:
                task.cancel()
            with contextlib.suppress(Exception):
                self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            for writer in list(self._writers):
                writer.close()
            with contextlib.suppress(Exception):
                self._loop.run_until_complete(asyncio.sleep(0.05))  # closes on next turns
                self._loop.run_until_complete(self._server.wait_closed())
            self._loop.close()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self._writers.add(client_w)
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.close()
            return
        self._writers.add(server_w)
        await asyncio.gather(
            self._pump(client_r, server_w), self._pump(server_r, client_w), return_exceptions=True
        )
        for writer in (client_w, server_w):
            writer.close()
            self._writers.discard(writer)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        while True:
            await self._flowing.wait()
            data = await reader.read(65536)
            if not data:
                return
            await self._flowing.wait()  # frozen while the bytes were on their way: hold them
            writer.write(data)
            await writer.drain()


@contextlib.contextmanager
def freezing_proxy(target_port: int) -> Iterator[FreezingProxy]:
    """A started [`FreezingProxy`] in front of `target_port`, stopped at the end."""
    with FreezingProxy(target_port) as proxy:
        yield proxy

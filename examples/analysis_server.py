"""A real video-analysis server for ``dbcancel.media``: frames in, one JSON result per frame out.

Run it::

    python examples/analysis_server.py --port 8765 [--host 127.0.0.1] [--token T] [--delay S]
        [--silent] [--drop-after N] [--garbage] [--out-of-order] [-v]

It prints ``listening on ws://HOST:PORT`` once it accepts connections (``--port 0`` picks a free
port and prints it) and stops cleanly on Ctrl-C or SIGTERM. It listens on 127.0.0.1 unless told
otherwise.

Protocol, one analysis per WebSocket connection:

1. Handshake. If the server has a token, the request must carry ``Authorization: Bearer
   <token>``; otherwise the handshake is rejected with HTTP 401 (the client sees
   ``websockets.exceptions.InvalidStatus``). Any path is accepted.
2. The client's first message is text JSON ``{"type": "start", "view": <str>, "job": <int, str
   or null>}``. Anything else: the server closes with 1008 (policy violation), "expected start".
3. Then one binary message per video frame. For each, the server replies with one text JSON
   message ``{"frame": <0-based index>, "view": <view>, "bytes": <length>, "digest": <first 16
   hex digits of the frame's SHA-256>}``, in order.
4. The client sends text JSON ``{"type": "end"}``; the server replies ``{"type": "done",
   "frames": <frames received>}`` and closes with 1000. Any other message after the start: the
   server closes with 1008, "expected frame or end".

Fault modes, as constructor options and command-line flags: ``delay`` (every reply, ``done``
included, is sent ``delay`` seconds after the previous one was produced: replies are computed one
at a time, so N frames sent at once are answered after about N x ``delay``); ``silent`` (reads
everything, never replies, ignores ``end``: only the client can end the connection);
``drop_after=N`` (when the Nth frame arrives, the TCP connection is aborted without a close frame
and without replying to that frame; replies to earlier frames are sent first; 0 aborts right
after the start message); ``garbage`` (every reply is the text ``not json``); ``out_of_order``
(each result carries the frame index plus one).

Incoming messages are read as soon as they arrive, whatever the mode, so a client's close frame
is answered at once even while a slow server is still "computing".

Tests import this file by path and use :class:`AnalysisServer` (on their own event loop) or
:func:`running_server` (on a background thread, for synchronous tests). The server records what
happened: close codes and reasons received from each client, frames, views, jobs, paths and
``Authorization`` headers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import http
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future as ThreadFuture
from types import TracebackType
from typing import Any, Final

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response
from websockets.protocol import State

__all__ = ["AnalysisServer", "main", "running_server"]

logger = logging.getLogger("analysis_server")

#: Reason of the close frame sent when the first message is not a valid start message.
EXPECTED_START: Final = "expected start"
#: Reason of the close frame sent when a message after the start is neither a frame nor end.
EXPECTED_FRAME_OR_END: Final = "expected frame or end"
#: The reply sent in ``garbage`` mode.
GARBAGE: Final = "not json"
#: Largest accepted frame: video frames can be big, websockets' default is only 1 MiB.
MAX_FRAME_BYTES: Final = 2**24


class _End:
    """Queue item: the client sent ``{"type": "end"}``."""


class _Drop:
    """Queue item: abort the TCP connection (``drop_after`` reached)."""


class _Close:
    """Queue item: close the connection with a code and a reason."""

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason


_Item = bytes | _End | _Drop | _Close
_END: Final = _End()
_DROP: Final = _Drop()


def result_message(index: int, view: str, frame: bytes) -> dict[str, Any]:
    """The JSON result the server sends for ``frame`` (before any fault mode is applied)."""
    return {
        "frame": index,
        "view": view,
        "bytes": len(frame),
        "digest": hashlib.sha256(frame).hexdigest()[:16],
    }


def _parse_start(message: str | bytes) -> tuple[str, int | str | None] | None:
    """``(view, job)`` from a valid start message, else None."""
    if not isinstance(message, str):
        return None
    try:
        data = json.loads(message)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("type") != "start":
        return None
    view, job = data.get("view"), data.get("job")
    if not isinstance(view, str) or "job" not in data:
        return None
    if job is not None and (isinstance(job, bool) or not isinstance(job, int | str)):
        return None
    return view, job


def _is_end(message: str) -> bool:
    try:
        data = json.loads(message)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("type") == "end"


def _format_uri(host: str, port: int) -> str:
    return f"ws://[{host}]:{port}" if ":" in host else f"ws://{host}:{port}"


class AnalysisServer:
    """A WebSocket analysis server with fault modes, recording what its clients did.

    ``await start()`` on the running event loop (or use ``async with AnalysisServer() as s``),
    ``await stop()`` when done; :func:`running_server` runs one on a background thread.

    Recorded state (mutated on the server's event loop under a lock, safe to read anywhere):

    * ``close_codes`` / ``close_reasons``: per finished connection (after a successful
      handshake), the close code and reason *received from the client*: its own close, or its
      echo of the server's (1000 after ``done``, 1008 after a protocol error, 1001 when the
      server stops). ``None`` / ``""`` when the TCP connection ended without a close frame
      (``drop_after``, a client that aborts). Appended once the TCP connection is closed.
    * ``open_connections`` (live now; decremented before the close code is recorded),
      ``connections_total``, ``rejected`` (handshakes refused with 401), ``frames_received``
      (all connections), ``views``, ``jobs`` and ``paths`` (per valid start message, resp.
      per accepted connection), ``auth_headers`` (per handshake, rejected ones included:
      the ``Authorization`` header or None).
    """

    def __init__(
        self,
        *,
        token: str | None = None,
        delay: float = 0.0,
        silent: bool = False,
        drop_after: int | None = None,
        garbage: bool = False,
        out_of_order: bool = False,
        close_timeout: float = 2.0,
    ) -> None:
        """Configure the server; nothing listens before :meth:`start`.

        ``close_timeout`` bounds how long the server waits for a client to complete a closing
        handshake (websockets' default is 10 s, long for tests).
        """
        if delay < 0:
            raise ValueError(f"delay must be >= 0, got {delay!r}")
        if drop_after is not None and drop_after < 0:
            raise ValueError(f"drop_after must be >= 0 or None, got {drop_after!r}")
        self.token = token
        self.delay = delay
        self.silent = silent
        self.drop_after = drop_after
        self.garbage = garbage
        self.out_of_order = out_of_order
        self.close_timeout = close_timeout

        self.close_codes: list[int | None] = []
        self.close_reasons: list[str] = []
        self.open_connections = 0
        self.connections_total = 0
        self.rejected = 0
        self.frames_received = 0
        self.views: list[str] = []
        self.jobs: list[int | str | None] = []
        self.paths: list[str] = []
        self.auth_headers: list[str | None] = []

        self.host: str | None = None
        self.port: int | None = None
        self._server: Server | None = None
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        # Async waiters: (predicate, loop of the waiter, future on that loop).
        self._waiters: list[
            tuple[Callable[[], bool], asyncio.AbstractEventLoop, asyncio.Future[None]]
        ] = []
        #: The background thread, when started by :func:`running_server`.
        self.thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def uri(self) -> str:
        """``ws://HOST:PORT`` of the listening socket (after :meth:`start`)."""
        if self.host is None or self.port is None:
            raise RuntimeError("the server is not started")
        return _format_uri(self.host, self.port)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen on ``host``:``port`` (0: an ephemeral port); sets ``.host``, ``.port``."""
        if self._server is not None:
            raise RuntimeError("the server is already started")
        self._server = await serve(
            self._handle,
            host,
            port,
            process_request=self._process_request,
            compression=None,  # frames are already compressed video; keep the CPU for the test
            close_timeout=self.close_timeout,
            max_size=MAX_FRAME_BYTES,
            backlog=1024,  # forwarded to loop.create_server: many concurrent test clients
        )
        # With "localhost" and port 0 there may be several sockets on different ports: report
        # the first one's real address, which a client can reach.
        address = self._server.sockets[0].getsockname()
        self.host, self.port = str(address[0]), int(address[1])
        logger.info("listening on %s", self.uri)

    async def stop(self) -> None:
        """Stop listening, close open connections with 1001 and wait for their handlers."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        await server.wait_closed()

    async def __aenter__(self) -> AnalysisServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- waiting for what clients do ------------------------------------------------------

    async def wait_closed_count(self, n: int, timeout: float = 5.0) -> list[int | None]:
        """Wait until ``n`` connections have finished; return a copy of ``close_codes``.

        Works from any event loop (the server's or another thread's). Raises TimeoutError.
        """
        await self._wait(lambda: len(self.close_codes) >= n, timeout, f"{n} closed connections")
        with self._lock:
            return list(self.close_codes)

    async def wait_frames_received(self, n: int, timeout: float = 5.0) -> int:
        """Wait until ``frames_received >= n`` (all connections); return it."""
        await self._wait(lambda: self.frames_received >= n, timeout, f"{n} frames received")
        return self.frames_received

    def wait_closed_count_sync(self, n: int, timeout: float = 5.0) -> list[int | None]:
        """Blocking :meth:`wait_closed_count`, for synchronous code on another thread."""
        self._wait_sync(lambda: len(self.close_codes) >= n, timeout, f"{n} closed connections")
        with self._lock:
            return list(self.close_codes)

    def wait_frames_received_sync(self, n: int, timeout: float = 5.0) -> int:
        """Blocking :meth:`wait_frames_received`, for synchronous code on another thread."""
        self._wait_sync(lambda: self.frames_received >= n, timeout, f"{n} frames received")
        return self.frames_received

    def _state(self) -> str:
        return (
            f"close_codes={self.close_codes}, open_connections={self.open_connections}, "
            f"connections_total={self.connections_total}, "
            f"frames_received={self.frames_received}"
        )

    async def _wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            if predicate():
                return
            future: asyncio.Future[None] = loop.create_future()
            waiter = (predicate, loop, future)
            self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                await future
        except TimeoutError:
            raise TimeoutError(f"no {what} after {timeout} s: {self._state()}") from None
        finally:
            with self._lock:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def _wait_sync(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        with self._changed:
            if not self._changed.wait_for(predicate, timeout):
                raise TimeoutError(f"no {what} after {timeout} s: {self._state()}")

    def _update(self, change: Callable[[], None]) -> None:
        """Apply ``change`` under the lock and wake whoever waits for it, on any thread."""
        with self._changed:
            change()
            self._changed.notify_all()
            ready = [w for w in self._waiters if w[0]()]
            for waiter in ready:
                self._waiters.remove(waiter)
        for _, loop, future in ready:
            with contextlib.suppress(RuntimeError):  # the waiter's loop is already closed
                loop.call_soon_threadsafe(_resolve, future)

    # -- the protocol ---------------------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """Record the ``Authorization`` header; reject with 401 unless it carries the token."""
        values = request.headers.get_all("Authorization")
        header = values[0] if len(values) == 1 else None
        self._update(lambda: self.auth_headers.append(header))
        if self.token is None:
            return None
        scheme, _, credentials = (header or "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            credentials.strip().encode(), self.token.encode()
        ):
            return None

        def reject() -> None:
            self.rejected += 1

        self._update(reject)
        response = connection.respond(http.HTTPStatus.UNAUTHORIZED, "Invalid or missing token\n")
        response.headers["WWW-Authenticate"] = 'Bearer realm="analysis"'
        return response

    async def _handle(self, connection: ServerConnection) -> None:
        """One analysis: converse, make sure the connection is closed, record how it ended."""

        def opened() -> None:
            self.open_connections += 1
            self.connections_total += 1
            self.paths.append(connection.request.path if connection.request else "")

        self._update(opened)
        try:
            await self._converse(connection)
        except ConnectionClosed:
            pass
        except Exception:
            logger.exception("analysis handler failed")
            await connection.close(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            try:
                await self._settle(connection)
            finally:
                code = connection.close_code
                # websockets reports 1006 when no close frame was received; 1006 can never be
                # sent on the wire, so it means "no close frame".
                if code == CloseCode.ABNORMAL_CLOSURE:
                    code = None
                reason = (connection.close_reason or "") if code is not None else ""

                def closed() -> None:
                    self.open_connections -= 1
                    self.close_codes.append(code)
                    self.close_reasons.append(reason)

                self._update(closed)
                logger.info("connection closed: code=%s reason=%r", code, reason)

    async def _settle(self, connection: ServerConnection) -> None:
        """Wait until the TCP connection is closed, forcing it after ``close_timeout``."""
        if connection.state is State.OPEN and not connection.transport.is_closing():
            await connection.close()
        try:
            async with asyncio.timeout(self.close_timeout + 1.0):
                await connection.wait_closed()
        except TimeoutError:
            connection.transport.abort()
            await connection.wait_closed()

    async def _converse(self, connection: ServerConnection) -> None:
        """Read the start message, then frames; a writer task sends the replies in order."""
        start = _parse_start(await connection.recv())
        if start is None:
            await connection.close(CloseCode.POLICY_VIOLATION, EXPECTED_START)
            return
        view, job = start

        def started() -> None:
            self.views.append(view)
            self.jobs.append(job)

        self._update(started)
        if self.drop_after == 0:
            connection.transport.abort()
            return

        queue: asyncio.Queue[_Item] = asyncio.Queue()
        writer = asyncio.create_task(self._write(connection, queue, view))
        try:
            received = 0
            while True:
                message = await connection.recv()
                if isinstance(message, bytes):
                    received += 1
                    self._update(self._count_frame)
                    if self.drop_after is not None and received >= self.drop_after:
                        queue.put_nowait(_DROP)
                        break
                    if not self.silent:
                        queue.put_nowait(message)
                elif _is_end(message):
                    if self.silent:
                        continue
                    queue.put_nowait(_END)
                    break
                else:
                    queue.put_nowait(_Close(CloseCode.POLICY_VIOLATION, EXPECTED_FRAME_OR_END))
                    break
            await writer
        finally:
            if not writer.done():
                writer.cancel()
                await asyncio.wait([writer])
            if not writer.cancelled():
                # Mark its exception as retrieved: a ConnectionClosed in the writer is also
                # raised by recv() here, and other errors were logged by the writer itself.
                writer.exception()

    def _count_frame(self) -> None:
        self.frames_received += 1

    async def _write(
        self, connection: ServerConnection, queue: asyncio.Queue[_Item], view: str
    ) -> None:
        """Send one reply per queued frame, then ``done`` or a close, honouring fault modes."""
        index = 0
        try:
            while True:
                item = await queue.get()
                if isinstance(item, _Drop):
                    logger.info("dropping the connection after %d frames", index + 1)
                    connection.transport.abort()
                    return
                if isinstance(item, _Close):
                    await connection.close(item.code, item.reason)
                    return
                if self.delay:
                    await asyncio.sleep(self.delay)
                if isinstance(item, _End):
                    reply: dict[str, Any] = {"type": "done", "frames": index}
                else:
                    reply = result_message(index + 1 if self.out_of_order else index, view, item)
                    index += 1
                await connection.send(GARBAGE if self.garbage else json.dumps(reply))
                if isinstance(item, _End):
                    await connection.close(CloseCode.NORMAL_CLOSURE)
                    return
        except ConnectionClosed:
            raise
        except Exception:
            logger.exception("analysis writer failed")
            await connection.close(CloseCode.INTERNAL_ERROR, "internal error")


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


@contextlib.contextmanager
def running_server(
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    delay: float = 0.0,
    silent: bool = False,
    drop_after: int | None = None,
    garbage: bool = False,
    out_of_order: bool = False,
    close_timeout: float = 2.0,
    stop_timeout: float = 30.0,
) -> Iterator[AnalysisServer]:
    """Run an :class:`AnalysisServer` on its own event loop in a daemon thread.

    Yields the started server (``.uri`` is set); on exit stops it and joins the thread.
    Use ``server.wait_closed_count_sync()`` from the calling thread, or ``await
    server.wait_closed_count()`` from any other event loop.
    """
    server = AnalysisServer(
        token=token,
        delay=delay,
        silent=silent,
        drop_after=drop_after,
        garbage=garbage,
        out_of_order=out_of_order,
        close_timeout=close_timeout,
    )
    ready: ThreadFuture[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = ThreadFuture()

    async def run() -> None:
        try:
            await server.start(host, port)
        except BaseException as exc:
            ready.set_exception(exc)
            return
        stop: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ready.set_result((asyncio.get_running_loop(), stop))
        try:
            await stop
        finally:
            await server.stop()

    thread = threading.Thread(
        target=asyncio.run, args=(run(),), name="analysis-server", daemon=True
    )
    server.thread = thread
    thread.start()
    try:
        loop, stop = ready.result(timeout=stop_timeout)
    except BaseException:
        thread.join(stop_timeout)
        raise
    try:
        yield server
    finally:
        loop.call_soon_threadsafe(_resolve, stop)
        thread.join(stop_timeout)
        if thread.is_alive():
            raise RuntimeError(f"the analysis server thread did not stop in {stop_timeout} s")


# -- command line -------------------------------------------------------------------------


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="A WebSocket video-analysis server: one JSON result per binary frame."
    )
    parser.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (loopback)")
    parser.add_argument(
        "--port", type=_non_negative_int, default=8765, help="default: 8765; 0 picks a free port"
    )
    parser.add_argument("--token", help="require 'Authorization: Bearer TOKEN' (else HTTP 401)")
    parser.add_argument(
        "--delay", type=_non_negative_float, default=0.0, help="seconds before each reply"
    )
    parser.add_argument("--silent", action="store_true", help="read frames, never reply")
    parser.add_argument(
        "--drop-after",
        type=_non_negative_int,
        metavar="N",
        help="abort the TCP connection (no close frame) when the Nth frame arrives",
    )
    parser.add_argument("--garbage", action="store_true", help="reply 'not json'")
    parser.add_argument("--out-of-order", action="store_true", help="reply with index + 1")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every connection")
    return parser


async def _serve_until_signalled(server: AnalysisServer, host: str, port: int) -> None:
    await server.start(host, port)
    print(f"listening on {server.uri}", flush=True)
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()
    handled: list[signal.Signals] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, _resolve, stop)
            handled.append(signum)
        except (NotImplementedError, RuntimeError):  # Windows, or not the main thread
            pass
    try:
        await stop
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
        await server.stop()


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    server = AnalysisServer(
        token=args.token,
        delay=args.delay,
        silent=args.silent,
        drop_after=args.drop_after,
        garbage=args.garbage,
        out_of_order=args.out_of_order,
    )
    try:
        asyncio.run(_serve_until_signalled(server, args.host, args.port))
    except KeyboardInterrupt:  # where signal handlers are unavailable
        pass
    except OSError as exc:  # e.g. address already in use
        print(f"analysis_server: {exc}", file=sys.stderr)
        return 1
    print("stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

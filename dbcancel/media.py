"""WebSocket frame loops that stop when their job is cancelled (extra `[media]`).

Built on the `websockets` package (its asyncio API). Two pieces:

* [`receive`][dbcancel.media.receive] — `async for message in receive(ws, cp)`: the messages of a
  connection until the job is cancelled. Cancellation is noticed while waiting for a
  frame: the connection is closed with code 1001, reason `"cancelled"`, and
  [`Cancelled`][dbcancel.Cancelled] is raised.
* [`MediaAnalysisService`][dbcancel.media.MediaAnalysisService] — streams video frames to an
  analysis server over one connection per analysis and collects one result per frame.

Neither blocks the event loop on the database. With [`AsyncJobs`][dbcancel.AsyncJobs]
the job's row is polled by the loop's own runtime (a task: one query per interval for
every job of the table, and on PostgreSQL its listener); with [`Jobs`][dbcancel.Jobs] by
the runtime thread. A `jobs.cancel()` issued in this process — from the loop, or from
any thread, such as a Flask request — reaches the stream at once through
`loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Coroutine,
    Iterable,
    Mapping,
)
from contextlib import aclosing, asynccontextmanager, suppress
from typing import Any, TypeVar

from ._aio import watching
from .checkpoint import Checkpoint, current
from .errors import DbcancelError
from .models import JobId

try:
    from websockets.asyncio.client import ClientConnection, connect
    from websockets.exceptions import (
        ConnectionClosed,
        ConnectionClosedOK,
        InvalidHandshake,
        InvalidURI,
    )
    from websockets.uri import parse_uri
except ImportError as err:  # pragma: no cover - exercised by the extra-less install test
    raise ImportError(
        "dbcancel.media needs the websockets package: pip install 'dbcancel[media]'"
    ) from err

__all__ = [
    "CANCEL_CLOSE_CODE",
    "CANCEL_CLOSE_REASON",
    "MediaAnalysisService",
    "MediaError",
    "receive",
]

log = logging.getLogger("dbcancel")

CANCEL_CLOSE_CODE = 1001
"""The close code sent when a job's connection is closed because it was cancelled."""
CANCEL_CLOSE_REASON = "cancelled"
"""The close reason sent with `CANCEL_CLOSE_CODE`."""

Frame = bytes | bytearray | memoryview
_T = TypeVar("_T")


class MediaError(DbcancelError):
    """An analysis failed: the server could not be reached, misbehaved or went silent.

    `job_id` and `uri` say which analysis; the message says what happened. The
    connection is closed when this is raised; inside `jobs.run()` the job is then
    marked failed with this text.
    """

    def __init__(self, job_id: JobId, uri: str, problem: str) -> None:
        self.job_id = job_id
        self.uri = uri
        self.problem = problem
        super().__init__(f"analysis of job {job_id!r} at {uri}: {problem}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.job_id, self.uri, self.problem))


@asynccontextmanager
async def _closing_on_cancel(ws: ClientConnection, cp: Checkpoint) -> AsyncIterator[None]:
    """While inside, a cancellation of `cp` closes `ws` with 1001 "cancelled".

    The checkpoint's row is polled off the loop; its callback may run in any thread
    (the one calling `jobs.cancel()`, or the poller's worker thread), so it only
    schedules the close on the connection's own loop.
    """
    loop = asyncio.get_running_loop()
    closing: list[asyncio.Task[None]] = []
    inside = True

    def start_close() -> None:  # on the loop
        # A cancel observed just before the block ends runs this just after it: the exit
        # paths close the connection themselves by then, and a close task started now
        # would outlive the stream (seen as a stray Connection.close task).
        if inside:
            closing.append(loop.create_task(ws.close(CANCEL_CLOSE_CODE, CANCEL_CLOSE_REASON)))

    def on_cancel() -> None:  # any thread
        # RuntimeError: the loop has closed, and so has the connection.
        with suppress(RuntimeError):
            loop.call_soon_threadsafe(start_close)

    async with watching(cp):
        handle = cp.on_cancel(on_cancel)
        try:
            yield
        finally:
            handle.remove()
            inside = False
            # The close started by a cancel must finish (bounded by the connection's
            # close_timeout) before we leave: no task outlives the stream.
            for task in closing:
                with suppress(Exception):
                    await asyncio.shield(task)


async def _cancellable(aw: Coroutine[Any, Any, _T], cp: Checkpoint) -> _T:
    """Await `aw` (connecting, say), giving up with Cancelled when `cp` is cancelled.

    Without this a cancel during a slow handshake would wait for `open_timeout`.
    """
    loop = asyncio.get_running_loop()
    task = loop.create_task(aw)

    def on_cancel() -> None:  # any thread
        with suppress(RuntimeError):  # the loop has closed: so has the task
            loop.call_soon_threadsafe(task.cancel)

    async with watching(cp):
        with cp.on_cancel(on_cancel):
            try:
                return await task
            except asyncio.CancelledError:
                me = asyncio.current_task()
                if cp.cancelled and not (me is not None and me.cancelling()):
                    raise cp._exception() from None
                raise


async def _raise_if_cancelled(ws: ClientConnection, cp: Checkpoint) -> None:
    if cp.cancelled:
        await ws.close(CANCEL_CLOSE_CODE, CANCEL_CLOSE_REASON)
        raise cp._exception()


async def receive(ws: ClientConnection, cp: Checkpoint) -> AsyncIterator[str | bytes]:
    """Yield the messages of `ws` until the connection ends or `cp`'s job is cancelled.

    ```python
    async with connect(uri) as ws:
        async for message in dbcancel.media.receive(ws, cp):
            handle(message)
    ```

    A cancellation is noticed while waiting for a message, however silent the peer: the
    connection is closed with code 1001, reason `"cancelled"`, and
    [`Cancelled`][dbcancel.Cancelled] is raised. A normal close of the connection ends the
    iteration; an abnormal one raises `websockets.exceptions.ConnectionClosedError`.
    """
    await _raise_if_cancelled(ws, cp)
    async with _closing_on_cancel(ws, cp):
        # Not "async for message in ws": websockets' __aiter__ is an async generator of
        # its own, and resuming two generators per message, plus the cancelled property,
        # cost ~5 % of a bare loop's throughput (benchmarks/bench_media.py, row (d)).
        # This is what that __aiter__ does, with the flag read directly.
        recv = ws.recv
        while not cp._cancelled:
            try:
                message = await recv()
            except ConnectionClosedOK:
                break
            if cp._cancelled:
                break
            yield message
    await _raise_if_cancelled(ws, cp)


async def _frames(frames: Iterable[Frame] | AsyncIterable[Frame]) -> AsyncGenerator[Frame, None]:
    if isinstance(frames, AsyncIterable):
        iterator = aiter(frames)
        try:
            async for frame in iterator:
                yield frame
        finally:
            # Left early (cancel, error): an async generator merely dropped is closed by
            # the loop's finalizer in a task of its own, one that outlives the analysis.
            # Close it here, as a for loop's dropped generator is closed at once.
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                await aclose()
    else:
        for frame in frames:
            yield frame


class MediaAnalysisService:
    """A client of a WebSocket analysis server: one connection per analysis.

    ```python
    service = MediaAnalysisService("ws://127.0.0.1:8765", token=api_token)
    async with jobs.run(analysis_id) as cp:
        results = await service.analyze(frames, view="front", checkpoint=cp)
    ```

    The protocol: the `token` goes in an `Authorization: Bearer` header; the first
    message is `{"type": "start", "view": ..., "job": ...}` (JSON text); each frame is
    one binary message, answered by one JSON result `{"frame": <index>, ...}` in order;
    `{"type": "end"}` ends the stream and the server closes the connection.

    `open_timeout` bounds connecting and the handshake, `receive_timeout` the wait for
    each result, `close_timeout` the closing handshake (seconds, None for no bound).
    `connect_options` go to `websockets.asyncio.client.connect` as they are.
    """

    def __init__(
        self,
        uri: str,
        *,
        token: str | None = None,
        open_timeout: float | None = 10.0,
        receive_timeout: float | None = 30.0,
        close_timeout: float | None = 5.0,
        headers: Mapping[str, str] | None = None,
        **connect_options: Any,
    ) -> None:
        if not isinstance(uri, str) or not uri.startswith(("ws://", "wss://")):
            raise ValueError(f"the analysis server's URI must start with ws:// or wss://: {uri!r}")
        for name, value in (
            ("open_timeout", open_timeout),
            ("receive_timeout", receive_timeout),
            ("close_timeout", close_timeout),
        ):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be None or a number of seconds > 0, got {value!r}")
        self.uri = uri
        """The analysis server's `ws://` or `wss://` URI."""
        self.open_timeout = open_timeout
        """Seconds allowed for connecting and the opening handshake."""
        self.receive_timeout = receive_timeout
        """Seconds allowed for each frame's result."""
        self.close_timeout = close_timeout
        """Seconds allowed for the closing handshake."""
        self._headers = dict(headers or {})
        if token is not None:
            self._headers["Authorization"] = f"Bearer {token}"
        # Video frames are compressed already: deflate would only burn CPU.
        connect_options.setdefault("compression", None)
        self._connect_options = connect_options

    def __repr__(self) -> str:
        return f"<MediaAnalysisService {self.uri}>"

    async def analyze(
        self,
        frames: Iterable[Frame] | AsyncIterable[Frame],
        *,
        view: str,
        checkpoint: Checkpoint | None = None,
    ) -> list[dict[str, Any]]:
        """Stream `frames` (bytes) to the server; return one result dict per frame.

        `checkpoint` defaults to the job running in this context (`dbcancel.current()`).
        A cancellation of that job, between frames or while waiting for a result, closes
        the connection with 1001 "cancelled" and raises [`Cancelled`][dbcancel.Cancelled]. Any
        other failure raises [`MediaError`][dbcancel.media.MediaError] naming the job and
        the URI. The connection is closed on every exit path.
        """
        cp = checkpoint if checkpoint is not None else current()
        if cp is None:
            raise TypeError(
                "analyze() needs a checkpoint: pass checkpoint=cp, or call it inside "
                "jobs.run() so that dbcancel.current() finds one"
            )
        if not isinstance(view, str):
            raise TypeError(f"view must be a string, got {view!r}")
        if cp.cancelled:
            raise cp._exception()
        ws = await _cancellable(self._connect(cp), cp)
        try:
            async with _closing_on_cancel(ws, cp):
                results = await self._stream(ws, cp, frames, view)
        except ConnectionClosed as err:
            if cp.cancelled:
                raise cp._exception() from None
            raise MediaError(
                cp.job_id, self.uri, f"the server closed the connection mid-stream ({err})"
            ) from err
        except TimeoutError as err:
            raise MediaError(
                cp.job_id,
                self.uri,
                f"no result within receive_timeout={self.receive_timeout}s",
            ) from err
        finally:
            # Every exit path closes: normally with 1000, on a cancel with 1001.
            if cp.cancelled:
                await ws.close(CANCEL_CLOSE_CODE, CANCEL_CLOSE_REASON)
            else:
                await ws.close()
        if cp.cancelled:
            raise cp._exception()
        return results

    async def _connect(self, cp: Checkpoint) -> ClientConnection:
        try:
            # Checked first: for a bad port or IPv6 host ("ws://host:99999") urllib raises
            # a bare ValueError, not InvalidURI, which would escape naming neither job nor URI.
            parse_uri(self.uri)
        except (InvalidURI, ValueError) as err:
            raise MediaError(cp.job_id, self.uri, f"invalid URI: {err}") from err
        try:
            return await connect(
                self.uri,
                additional_headers=self._headers,
                open_timeout=self.open_timeout,
                close_timeout=self.close_timeout,
                **self._connect_options,
            )
        except InvalidURI as err:
            raise MediaError(cp.job_id, self.uri, f"invalid URI: {err}") from err
        except TimeoutError as err:
            raise MediaError(
                cp.job_id, self.uri, f"no handshake within open_timeout={self.open_timeout}s"
            ) from err
        except InvalidHandshake as err:
            raise MediaError(cp.job_id, self.uri, f"handshake refused: {err}") from err
        except OSError as err:
            raise MediaError(cp.job_id, self.uri, f"cannot connect: {err}") from err

    async def _stream(
        self,
        ws: ClientConnection,
        cp: Checkpoint,
        frames: Iterable[Frame] | AsyncIterable[Frame],
        view: str,
    ) -> list[dict[str, Any]]:
        await ws.send(json.dumps({"type": "start", "view": view, "job": _jsonable(cp.job_id)}))
        results: list[dict[str, Any]] = []
        # aclosing: see _frames; a stream cut short must not leave its generator to the
        # loop's finalizer.
        async with aclosing(_frames(frames)) as each:
            async for frame in each:
                if cp.cancelled:
                    return results
                if not isinstance(frame, bytes | bytearray | memoryview):
                    raise TypeError(f"frames must be bytes, got {type(frame).__name__}")
                await ws.send(frame)
                async with asyncio.timeout(self.receive_timeout):
                    raw = await ws.recv()
                results.append(self._result(cp, raw, len(results)))
        if not cp.cancelled:
            await ws.send(json.dumps({"type": "end"}))
        return results

    def _result(self, cp: Checkpoint, raw: str | bytes, index: int) -> dict[str, Any]:
        try:
            result = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise MediaError(
                cp.job_id, self.uri, f"the result for frame {index} is not JSON: {raw[:80]!r}"
            ) from None
        if not isinstance(result, dict) or result.get("frame") != index:
            got = result.get("frame") if isinstance(result, dict) else result
            raise MediaError(
                cp.job_id,
                self.uri,
                f"out-of-order result: expected frame {index}, got {got!r}",
            )
        return result


def _jsonable(value: Any) -> Any:
    return value if isinstance(value, int | str | float | type(None)) else str(value)

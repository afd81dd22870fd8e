"""The example analysis server, driven by a bare websockets client (no dbcancel.media).

The server lives in ``examples/analysis_server.py``; it is loaded by path (see
``example_modules.py``), as the media tests do. Each async test runs its own event loop with
``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

pytest.importorskip("websockets")

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import (
    ConnectionClosedError,
    ConnectionClosedOK,
    InvalidStatus,
)

from tests.integration.example_modules import SERVER_PATH, load_example

analysis_server = load_example(SERVER_PATH)
AnalysisServer = analysis_server.AnalysisServer
running_server = analysis_server.running_server

FRAMES = [bytes([i]) * (100 + i) for i in range(5)]


def digest(frame: bytes) -> str:
    return hashlib.sha256(frame).hexdigest()[:16]


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 20))


async def start(ws: ClientConnection, view: str = "front", job: Any = 7) -> None:
    await ws.send(json.dumps({"type": "start", "view": view, "job": job}))


async def recv_json(ws: ClientConnection) -> Any:
    return json.loads(await ws.recv())


async def stream(uri: str, frames: list[bytes], **connect_kwargs: Any) -> list[Any]:
    """A well-behaved client: start, frames one by one, end; return all replies."""
    replies = []
    async with connect(uri, **connect_kwargs) as ws:
        await start(ws)
        for frame in frames:
            await ws.send(frame)
            replies.append(await recv_json(ws))
        await ws.send(json.dumps({"type": "end"}))
        replies.append(await recv_json(ws))
        with pytest.raises(ConnectionClosedOK) as closed:
            await ws.recv()
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1000
    return replies


def expected_results(view: str = "front", shift: int = 0) -> list[dict[str, Any]]:
    return [
        {"frame": i + shift, "view": view, "bytes": len(f), "digest": digest(f)}
        for i, f in enumerate(FRAMES)
    ]


def test_normal_stream_gets_one_ordered_result_per_frame_then_done():
    async def test() -> None:
        async with AnalysisServer() as server:
            assert server.uri == f"ws://127.0.0.1:{server.port}"
            assert server.port > 0
            replies = await stream(server.uri + "/analyze", FRAMES)
            assert replies == [*expected_results(), {"type": "done", "frames": 5}]
            assert await server.wait_closed_count(1) == [1000]
            assert server.close_reasons == [""]
            assert server.open_connections == 0
            assert server.connections_total == 1
            assert server.frames_received == 5
            assert server.views == ["front"]
            assert server.jobs == [7]
            assert server.paths == ["/analyze"]
            assert server.auth_headers == [None]

    run(test)


def test_frames_pipelined_without_waiting_still_answered_in_order():
    async def test() -> None:
        async with AnalysisServer() as server, connect(server.uri) as ws:
            await start(ws, view="side", job=None)
            for frame in FRAMES:
                await ws.send(frame)
            await ws.send(json.dumps({"type": "end"}))
            replies = [await recv_json(ws) for _ in range(6)]
            assert replies == [*expected_results("side"), {"type": "done", "frames": 5}]
            assert server.jobs == [None]

    run(test)


def test_token_missing_or_wrong_is_rejected_with_401():
    async def test() -> None:
        async with AnalysisServer(token="s3cret") as server:
            for headers in (None, {"Authorization": "Bearer nope"}, {"Authorization": "s3cret"}):
                with pytest.raises(InvalidStatus) as rejected:
                    async with connect(server.uri, additional_headers=headers):
                        pass
                assert rejected.value.response.status_code == 401
            assert server.rejected == 3
            assert server.auth_headers == [None, "Bearer nope", "s3cret"]
            assert server.connections_total == 0
            assert server.close_codes == []

    run(test)


def test_right_token_is_accepted():
    async def test() -> None:
        async with AnalysisServer(token="s3cret") as server:
            headers = {"Authorization": "Bearer s3cret"}
            replies = await stream(server.uri, FRAMES[:2], additional_headers=headers)
            assert len(replies) == 3
            assert server.auth_headers == ["Bearer s3cret"]
            assert server.rejected == 0

    run(test)


@pytest.mark.parametrize(
    "first",
    [
        pytest.param(b"\x00frame", id="binary"),
        pytest.param("not json", id="not-json"),
        pytest.param('{"type": "end"}', id="end"),
        pytest.param('{"type": "start", "job": 1}', id="no-view"),
        pytest.param('{"type": "start", "view": "front"}', id="no-job"),
        pytest.param('["start"]', id="array"),
    ],
)
def test_anything_but_start_first_is_closed_with_1008(first):
    async def test() -> None:
        async with AnalysisServer() as server, connect(server.uri) as ws:
            await ws.send(first)
            with pytest.raises(ConnectionClosedError) as closed:
                await ws.recv()
            assert closed.value.rcvd is not None
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1008, "expected start")
            assert await server.wait_closed_count(1) == [1008]  # the client's echo
            assert server.close_reasons == ["expected start"]
            assert server.views == []

    run(test)


def test_unexpected_text_after_start_is_closed_with_1008():
    async def test() -> None:
        async with AnalysisServer() as server, connect(server.uri) as ws:
            await start(ws)
            await ws.send(FRAMES[0])
            assert (await recv_json(ws))["frame"] == 0
            await ws.send('{"type": "pause"}')
            with pytest.raises(ConnectionClosedError) as closed:
                await ws.recv()
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1008
            assert closed.value.rcvd.reason == "expected frame or end"

    run(test)


def test_client_close_1001_cancelled_is_recorded():
    async def test() -> None:
        async with AnalysisServer() as server, connect(server.uri) as ws:
            await start(ws)
            await ws.send(FRAMES[0])
            await ws.recv()
            await ws.close(1001, "cancelled")
            assert await server.wait_closed_count(1) == [1001]
            assert server.close_reasons == ["cancelled"]
            assert server.open_connections == 0

    run(test)


def test_delay_slows_every_reply():
    async def test() -> None:
        async with AnalysisServer(delay=0.2) as server, connect(server.uri) as ws:
            loop = asyncio.get_running_loop()
            await start(ws)
            began = loop.time()
            await ws.send(FRAMES[0])
            assert (await recv_json(ws))["frame"] == 0
            assert loop.time() - began >= 0.19
            await ws.send(FRAMES[1])
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(ws.recv(), 0.1)
            assert (await recv_json(ws))["frame"] == 1

    run(test)


def test_cancel_while_server_is_delaying_is_answered_at_once():
    async def test() -> None:
        async with AnalysisServer(delay=30) as server, connect(server.uri) as ws:
            loop = asyncio.get_running_loop()
            await start(ws)
            for frame in FRAMES:
                await ws.send(frame)
            await server.wait_frames_received(5)
            began = loop.time()
            await ws.close(1001, "cancelled")
            assert await server.wait_closed_count(1, timeout=2) == [1001]
            assert loop.time() - began < 1.0
            assert server.close_reasons == ["cancelled"]

    run(test)


def test_silent_server_reads_but_never_replies():
    async def test() -> None:
        async with AnalysisServer(silent=True) as server, connect(server.uri) as ws:
            await start(ws)
            await ws.send(FRAMES[0])
            await ws.send(FRAMES[1])
            await ws.send(json.dumps({"type": "end"}))
            assert await server.wait_frames_received(2) == 2
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(ws.recv(), 0.2)
            await ws.close(1001, "cancelled")
            assert await server.wait_closed_count(1) == [1001]
            assert server.close_reasons == ["cancelled"]

    run(test)


def test_drop_after_aborts_without_close_frame():
    async def test() -> None:
        async with AnalysisServer(drop_after=2) as server, connect(server.uri) as ws:
            await start(ws)
            await ws.send(FRAMES[0])
            assert (await recv_json(ws))["frame"] == 0
            await ws.send(FRAMES[1])
            with pytest.raises(ConnectionClosedError) as closed:
                await ws.recv()
            assert closed.value.rcvd is None
            assert await server.wait_closed_count(1) == [None]
            assert server.close_reasons == [""]
            assert server.frames_received == 2
            assert server.open_connections == 0

    run(test)


def test_drop_after_zero_aborts_right_after_start():
    async def test() -> None:
        async with AnalysisServer(drop_after=0) as server, connect(server.uri) as ws:
            await start(ws)
            with pytest.raises(ConnectionClosedError) as closed:
                await ws.recv()
            assert closed.value.rcvd is None
            assert await server.wait_closed_count(1) == [None]
            assert server.views == ["front"]

    run(test)


def test_client_that_aborts_is_recorded_as_none():
    async def test() -> None:
        async with AnalysisServer() as server:
            async with connect(server.uri) as ws:
                await start(ws)
                await ws.send(FRAMES[0])
                await ws.recv()
                ws.transport.abort()
            assert await server.wait_closed_count(1) == [None]
            assert server.open_connections == 0

    run(test)


def test_frames_larger_than_websockets_default_limit_are_accepted():
    big = b"\x01" * (3 * 2**20)

    async def test() -> None:
        async with AnalysisServer() as server, connect(server.uri) as ws:
            await start(ws)
            await ws.send(big)
            assert await recv_json(ws) == {
                "frame": 0,
                "view": "front",
                "bytes": len(big),
                "digest": digest(big),
            }

    run(test)


def test_garbage_replies_are_not_json():
    async def test() -> None:
        async with AnalysisServer(garbage=True) as server, connect(server.uri) as ws:
            await start(ws)
            await ws.send(FRAMES[0])
            assert await ws.recv() == "not json"

    run(test)


def test_out_of_order_replies_carry_the_wrong_index():
    async def test() -> None:
        async with AnalysisServer(out_of_order=True) as server:
            replies = await stream(server.uri, FRAMES)
            assert replies == [*expected_results(shift=1), {"type": "done", "frames": 5}]

    run(test)


def test_stop_closes_open_connections_with_1001():
    async def test() -> None:
        server = AnalysisServer()
        await server.start()
        async with connect(server.uri) as ws:
            await start(ws)
            await server.stop()
            with pytest.raises(ConnectionClosedOK) as closed:
                await ws.recv()
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1001
        assert server.close_codes == [1001]  # the client's echo
        assert server.open_connections == 0

    run(test)


def test_concurrent_streams_all_recorded():
    async def one(uri: str, i: int) -> None:
        async with connect(uri) as ws:
            await start(ws, view=f"v{i}", job=i)
            await ws.send(FRAMES[i % 5])
            await ws.recv()
            await ws.close(1001, "cancelled")

    async def test() -> None:
        async with AnalysisServer() as server:
            await asyncio.gather(*(one(server.uri, i) for i in range(30)))
            assert await server.wait_closed_count(30) == [1001] * 30
            assert sorted(server.jobs) == list(range(30))
            assert server.open_connections == 0
            assert server.connections_total == 30

    run(test)


def test_wait_closed_count_times_out_with_the_state():
    async def test() -> None:
        async with AnalysisServer() as server:
            with pytest.raises(TimeoutError, match="close_codes=\\[\\]"):
                await server.wait_closed_count(1, timeout=0.05)
            with pytest.raises(TimeoutError):
                server.wait_closed_count_sync(1, timeout=0.05)

    run(test)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="delay"):
        AnalysisServer(delay=-1)
    with pytest.raises(ValueError, match="drop_after"):
        AnalysisServer(drop_after=-1)


def test_running_server_on_a_thread_serves_another_loop_and_leaves_no_thread():
    before = set(threading.enumerate())
    with running_server(delay=0.01) as server:
        thread = server.thread
        assert thread is not None
        assert thread.is_alive()
        assert thread.daemon

        async def client() -> None:
            assert await stream(server.uri, FRAMES[:3]) == [
                *expected_results()[:3],
                {"type": "done", "frames": 3},
            ]
            # Awaiting from this loop while the server runs on its own.
            assert await server.wait_closed_count(1) == [1000]
            async with connect(server.uri) as ws:
                await start(ws)
                await ws.close(1001, "cancelled")

        run(client)
        assert server.wait_closed_count_sync(2) == [1000, 1001]
        assert server.close_reasons == ["", "cancelled"]
    assert not thread.is_alive()
    assert set(threading.enumerate()) == before


def test_running_server_reports_a_failed_start():
    with running_server() as first:
        port = first.port
        with pytest.raises(OSError), running_server(port=port):
            pass


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_cli_serves_a_stream_and_stops_on_signal(signum):
    args = [sys.executable, str(SERVER_PATH), "--port", "0", "--token", "T", "--out-of-order"]
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.startswith("listening on ws://127.0.0.1:"), line
            uri = line.split()[-1]
            assert int(uri.rsplit(":", 1)[1]) > 0

            async def client() -> None:
                with pytest.raises(InvalidStatus) as rejected:
                    async with connect(uri):
                        pass
                assert rejected.value.response.status_code == 401
                replies = await stream(
                    uri, FRAMES[:2], additional_headers={"Authorization": "Bearer T"}
                )
                assert [r.get("frame") for r in replies] == [1, 2, None]

            run(client)
            proc.send_signal(signum)
            _, stderr = proc.communicate(timeout=15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().endswith("stopped")


def test_cli_refuses_bad_arguments():
    proc = subprocess.run(
        [sys.executable, str(SERVER_PATH), "--drop-after", "-1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "--drop-after" in proc.stderr

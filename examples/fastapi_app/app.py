"""The Flask example's app on FastAPI and an `AsyncEngine`: upload, analyse, cancel, delete.

A JSON API; the user is the ``X-User`` header (a demo: there are no passwords).

* ``POST /sessions`` creates a session; ``PUT /sessions/<id>/files/<name>`` uploads one
  file into it (the request body); ``GET /sessions/<id>`` lists its files.
* ``POST /sessions/<id>/analysis`` starts an analysis as a task of the server's event
  loop: every file of the session is streamed, frame by frame, to the WebSocket analysis
  server (``examples/analysis_server.py``, started by the app on its own loop unless
  ``ANALYSIS_SERVER_URI`` names one) through `dbcancel.media.MediaAnalysisService`.
  ``GET /analysis/<id>`` shows its status and results, ``POST /analysis/<id>/cancel``
  cancels it.
* ``DELETE /analysis/<id>`` cancels an analysis, waits until its worker has stopped, then
  deletes its row; ``POST /video/delete`` with ``{"session_id": ...}`` does the same for
  every analysis of a session, then deletes its files and rows. Another user's session or
  analysis is a 404, and nothing is cancelled or deleted.
* ``POST /sessions/<id>/live`` makes an analysis for a live stream; the client then sends
  its frames over the WebSocket ``/analysis/<id>/stream`` (binary messages, one JSON
  result each, text ``end`` to finish). A cancel of the analysis closes that socket with
  1001 "cancelled" at once, even while the server waits for the client's next frame.

Every database call is awaited on `AsyncJobs` (`pip install 'dbcancel[asyncio,media]'`
plus FastAPI and uvicorn): a cancel, a wait for a worker to stop or a status read never
blocks the other requests of the process. Run it with uvicorn (see README.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import shutil
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import IO, Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Request, WebSocket
from fastapi.websockets import WebSocketDisconnect
from sqlalchemy import JSON, ForeignKey, String, delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from dbcancel import (
    AsyncJobs,
    CancellableMixin,
    Checkpoint,
    InvalidTransition,
    JobNotFound,
    Status,
)
from dbcancel.media import MediaAnalysisService

HERE = Path(__file__).resolve().parent
DATABASE_URL = os.environ.get("DATABASE_URL", f"sqlite+aiosqlite:///{HERE / 'instance' / 'app.db'}")
"""An async URL: ``sqlite+aiosqlite://``, ``postgresql+asyncpg://``,
``postgresql+psycopg://`` or ``mysql+aiomysql://``."""
UPLOAD_FOLDER = Path(os.environ.get("UPLOAD_FOLDER", HERE / "instance" / "uploads"))
FRAME_SIZE = int(os.environ.get("FRAME_SIZE", 64 * 1024))
"""Bytes per frame sent to the analysis server."""
STOP_TIMEOUT = float(os.environ.get("STOP_TIMEOUT", 10.0))
"""Seconds a deletion waits for the workers it cancelled to stop."""
INTERVAL = float(os.environ.get("ANALYSIS_INTERVAL", 0.5))


# -- models -------------------------------------------------------------------------------


class Base(DeclarativeBase):
    pass


class Session(Base):
    __tablename__ = "fastapi_session"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(64), index=True)


class UploadedFile(Base):
    __tablename__ = "fastapi_file"

    id: Mapped[int] = mapped_column(primary_key=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("fastapi_session.id"), index=True)
    name: Mapped[str] = mapped_column(String(255))


class Analysis(CancellableMixin, Base):
    __tablename__ = "fastapi_analysis"

    id: Mapped[int] = mapped_column(primary_key=True)
    session_id: Mapped[str] = mapped_column(String(32), index=True)
    user_id: Mapped[str] = mapped_column(String(64), index=True)
    view: Mapped[str] = mapped_column(String(32), default="front")
    results: Mapped[Any] = mapped_column(JSON, nullable=True)


engine = create_async_engine(DATABASE_URL)
sessions = async_sessionmaker(engine, expire_on_commit=False)
jobs = AsyncJobs(engine, Analysis, interval=INTERVAL)


# -- the analysis ------------------------------------------------------------------------


def frames_of(stream: IO[bytes]) -> Iterator[bytes]:
    while chunk := stream.read(FRAME_SIZE):
        yield chunk


async def analyze_session(analysis_id: int, service: MediaAnalysisService) -> None:
    """Stream every file of the analysis's session to the analysis server; store the
    results with the completion. A cancel stops it at once (``cancel_task=True``): the
    task is cancelled wherever it awaits, and the job ends ``cancelled``."""
    async with jobs.run(analysis_id, cancel_task=True) as cp:
        async with sessions() as db:
            analysis = await db.get_one(Analysis, analysis_id)
            names = (
                await db.scalars(
                    select(UploadedFile.name)
                    .where(UploadedFile.session_id == analysis.session_id)
                    .order_by(UploadedFile.id)
                )
            ).all()
        results = []
        for name in names:
            cp()  # a cancelled analysis opens no further file
            with (UPLOAD_FOLDER / analysis.session_id / name).open("rb") as stream:
                frames = await service.analyze(frames_of(stream), view=analysis.view, checkpoint=cp)
            results.append({"file": name, "frames": len(frames)})
        # Results and completion commit together; cancelled meanwhile, acomplete()
        # raises Cancelled and the results roll back.
        async with sessions.begin() as db:
            await db.execute(
                update(Analysis).where(Analysis.id == analysis_id).values(results=results)
            )
            await cp.acomplete(db)


# -- the app --------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    UPLOAD_FOLDER.mkdir(parents=True, exist_ok=True)
    app.state.tasks = set()
    async with contextlib.AsyncExitStack() as stack:
        uri = os.environ.get("ANALYSIS_SERVER_URI")
        if uri is None:
            sys.path.insert(0, str(HERE.parent))
            from analysis_server import AnalysisServer

            server = AnalysisServer(delay=float(os.environ.get("ANALYSIS_DELAY", 0.01)))
            await stack.enter_async_context(server)
            uri = server.uri
        app.state.service = MediaAnalysisService(uri)
        yield
        for task in app.state.tasks:  # shutting down: the jobs end failed, not cancelled
            task.cancel()
        await asyncio.gather(*app.state.tasks, return_exceptions=True)
    await engine.dispose()


app = FastAPI(title="dbcancel on FastAPI", lifespan=lifespan)


async def user(x_user: Annotated[str, Header()]) -> str:
    return x_user


User = Annotated[str, Depends(user)]


async def owned_session(db: AsyncSession, session_id: str, user_id: str) -> Session:
    session = await db.get(Session, session_id)
    if session is None or session.user_id != user_id:
        raise HTTPException(404, f"no session {session_id!r}")
    return session


def analysis_json(analysis: Analysis) -> dict[str, Any]:
    return {
        "id": analysis.id,
        "session_id": analysis.session_id,
        "status": analysis.status.value,
        "cancel_reason": analysis.cancel_reason,
        "error": analysis.error,
        "results": analysis.results,
    }


@app.post("/sessions")
async def create_session(user_id: User) -> dict[str, Any]:
    session_id = secrets.token_hex(8)
    async with sessions.begin() as db:
        db.add(Session(id=session_id, user_id=user_id))
    (UPLOAD_FOLDER / session_id).mkdir(parents=True)
    return {"id": session_id}


@app.put("/sessions/{session_id}/files/{name}")
async def upload_file(
    session_id: str, name: str, request: Request, user_id: User
) -> dict[str, Any]:
    if not name or name != Path(name).name or name.startswith("."):
        raise HTTPException(400, f"bad file name {name!r}")
    body = await request.body()
    async with sessions.begin() as db:
        await owned_session(db, session_id, user_id)
        db.add(UploadedFile(session_id=session_id, name=name))
        (UPLOAD_FOLDER / session_id / name).write_bytes(body)
    return {"name": name, "bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}


@app.get("/sessions/{session_id}")
async def show_session(session_id: str, user_id: User) -> dict[str, Any]:
    async with sessions() as db:
        await owned_session(db, session_id, user_id)
        names = await db.scalars(
            select(UploadedFile.name).where(UploadedFile.session_id == session_id)
        )
        return {"id": session_id, "files": list(names)}


@app.post("/sessions/{session_id}/analysis", status_code=202)
async def start_analysis(session_id: str, user_id: User, request: Request) -> dict[str, Any]:
    async with sessions.begin() as db:
        await owned_session(db, session_id, user_id)
        analysis = Analysis(session_id=session_id, user_id=user_id)
        db.add(analysis)
    task = asyncio.create_task(analyze_session(analysis.id, request.app.state.service))
    request.app.state.tasks.add(task)
    task.add_done_callback(request.app.state.tasks.discard)
    return {"id": analysis.id, "status": Status.PENDING.value}


@app.post("/sessions/{session_id}/live", status_code=201)
async def start_live(session_id: str, user_id: User) -> dict[str, Any]:
    async with sessions.begin() as db:
        await owned_session(db, session_id, user_id)
        analysis = Analysis(session_id=session_id, user_id=user_id, view="live")
        db.add(analysis)
    return {"id": analysis.id, "stream": f"/analysis/{analysis.id}/stream"}


@app.get("/analysis/{analysis_id}")
async def show_analysis(analysis_id: int, user_id: User) -> dict[str, Any]:
    async with sessions() as db:
        analysis = await db.get(Analysis, analysis_id)
    if analysis is None or analysis.user_id != user_id:
        raise HTTPException(404, f"no analysis {analysis_id}")
    return analysis_json(analysis)


@app.post("/analysis/{analysis_id}/cancel")
async def cancel_analysis(analysis_id: int, user_id: User) -> dict[str, Any]:
    try:
        # Ownership is part of the cancel's one conditional UPDATE.
        cancelled = await jobs.cancel(
            analysis_id, reason="cancelled by its owner", where={"user_id": user_id}
        )
    except JobNotFound:
        raise HTTPException(404, f"no analysis {analysis_id}") from None
    return {"id": analysis_id, "cancelled": cancelled}


@app.delete("/analysis/{analysis_id}")
async def delete_analysis(analysis_id: int, user_id: User) -> dict[str, Any]:
    """Cancel the analysis, wait until its worker has stopped, then delete its row."""
    try:
        await jobs.cancel(analysis_id, reason="deleted by its owner", where={"user_id": user_id})
        final = await jobs.wait(analysis_id, timeout=STOP_TIMEOUT)
    except JobNotFound:
        raise HTTPException(404, f"no analysis {analysis_id}") from None
    except TimeoutError:
        raise HTTPException(
            503, f"analysis {analysis_id} has not stopped yet; nothing was deleted, try again"
        ) from None
    async with sessions.begin() as db:
        await db.execute(
            delete(Analysis).where(Analysis.id == analysis_id, Analysis.user_id == user_id)
        )
    return {"deleted": analysis_id, "status": final.value}


@app.post("/video/delete")
async def delete_video(body: dict[str, str], user_id: User) -> dict[str, Any]:
    """Delete a session: cancel its analyses, wait for their workers, then files and rows.

    No worker reads a file once it is being deleted: every analysis of the session has
    stopped (left `jobs.run()`) before the first file goes.
    """
    session_id = body.get("session_id")
    if not isinstance(session_id, str):
        raise HTTPException(400, 'expected {"session_id": ...}')
    async with sessions() as db:
        await owned_session(db, session_id, user_id)
    await jobs.cancel_where(user_id=user_id, session_id=session_id)
    async with sessions() as db:
        running = (
            await db.scalars(
                select(Analysis.id).where(
                    Analysis.session_id == session_id, Analysis.finished_at.is_(None)
                )
            )
        ).all()
    try:
        async with asyncio.timeout(STOP_TIMEOUT):  # one budget for all of them
            for analysis_id in running:
                with contextlib.suppress(JobNotFound):  # deleted meanwhile
                    await jobs.wait(analysis_id)
    except TimeoutError:
        raise HTTPException(
            503,
            f"the analyses of session {session_id!r} have not stopped yet; nothing was "
            "deleted, try again",
        ) from None
    async with sessions.begin() as db:
        final = (
            await db.execute(
                select(Analysis.id, Analysis.status)
                .where(Analysis.session_id == session_id)
                .order_by(Analysis.id)
            )
        ).all()
        await db.execute(delete(Analysis).where(Analysis.session_id == session_id))
        files = (
            await db.execute(delete(UploadedFile).where(UploadedFile.session_id == session_id))
        ).rowcount
        await db.execute(delete(Session).where(Session.id == session_id))
    shutil.rmtree(UPLOAD_FOLDER / session_id, ignore_errors=True)
    return {
        "deleted": session_id,
        "files": files,
        "analyses": [{"id": id_, "status": status.value} for id_, status in final],
    }


@app.websocket("/analysis/{analysis_id}/stream")
async def stream(ws: WebSocket, analysis_id: int) -> None:
    """A live analysis: one JSON result per binary frame, until the client sends ``end``
    (the job completes), goes away (it fails) or the analysis is cancelled (the socket
    is closed with 1001 "cancelled" at once, whatever the server was awaiting)."""
    user_id = ws.headers.get("x-user", "")
    await ws.accept()
    cp: Checkpoint | None = None
    try:
        async with jobs.run(analysis_id, where={"user_id": user_id}, cancel_task=True) as cp:
            index = 0
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    raise WebSocketDisconnect(message.get("code", 1000))
                if message.get("text") == "end":
                    break
                frame = message.get("bytes")
                if frame is None:
                    await ws.close(1008, "expected a binary frame or end")
                    raise WebSocketDisconnect(1008)
                cp()
                digest = hashlib.sha256(frame).hexdigest()[:16]
                await ws.send_json({"frame": index, "bytes": len(frame), "digest": digest})
                index += 1
    except JobNotFound:
        await ws.close(1008, f"no analysis {analysis_id}")
        return
    except InvalidTransition as err:
        await ws.close(1008, f"analysis {analysis_id} is {err.current}")
        return
    except WebSocketDisconnect:
        return
    if cp is not None and cp.cancelled:
        await ws.close(1001, "cancelled")
    else:
        await ws.close(1000)

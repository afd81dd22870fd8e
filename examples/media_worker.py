"""Stream synthetic video frames of one analysis job to an analysis server, cancellably.

Terminal 1, the analysis server::

    python examples/analysis_server.py --port 8765 --delay 0.05

Terminal 2, the worker (creates a job, prints its id and the command that cancels it)::

    python examples/media_worker.py --url sqlite:///media_jobs.db --server ws://127.0.0.1:8765

Terminal 3, while it streams::

    python -m dbcancel cancel 1 --url sqlite:///media_jobs.db --table media_analysis

The worker notices the cancel within its poll interval (it polls the row off the event
loop), closes its connection with code 1001 "cancelled" and exits with status 3. A
server fault makes it exit with status 1 and the job ``failed``. By default, as in the
library, the process's shared runtime thread polls (one statement per interval for all its
jobs, and on PostgreSQL a cancel arrives by NOTIFY within milliseconds whatever the
interval); ``--no-watch`` runs threadless, each checkpoint polling its own row.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
import time
from collections.abc import AsyncIterator

from sqlalchemy import String, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from dbcancel import CancellableMixin, Cancelled, Jobs
from dbcancel.media import MediaAnalysisService, MediaError

EXIT_CANCELLED = 3


class Base(DeclarativeBase):
    pass


class MediaAnalysis(CancellableMixin, Base):
    __tablename__ = "media_analysis"

    id: Mapped[int] = mapped_column(primary_key=True)
    view: Mapped[str] = mapped_column(String(32))


async def synthetic_frames(count: int, size: int, fps: float) -> AsyncIterator[bytes]:
    """Frames of a fake video: deterministic bytes, produced at ``fps`` frames per second."""
    for index in range(count):
        seed = hashlib.sha256(index.to_bytes(8, "big")).digest()
        yield (seed * (size // len(seed) + 1))[:size]
        if fps > 0:
            await asyncio.sleep(1 / fps)


async def stream(args: argparse.Namespace, jobs: Jobs, job_id: int) -> int:
    service = MediaAnalysisService(args.server, token=args.token, receive_timeout=10)
    started = time.monotonic()
    done = 0

    async def frames() -> AsyncIterator[bytes]:
        nonlocal done
        async for frame in synthetic_frames(args.frames, args.frame_size, args.fps):
            yield frame
            done += 1
            bar = "#" * (20 * done // args.frames)
            print(f"\rjob {job_id} [{bar:<20}] {done}/{args.frames} frames", end="", flush=True)

    try:
        async with jobs.run(job_id) as cp:
            results = await service.analyze(frames(), view=args.view, checkpoint=cp)
    except Cancelled as exc:  # cancelled before it started: nothing was streamed
        print(f"job {job_id} was cancelled before it started ({exc.reason or 'no reason'})")
        return EXIT_CANCELLED
    print()
    if cp.cancelled:
        print(f"job {job_id} cancelled after {done} frames ({cp.reason or 'no reason'});")
        print(f"  connection closed with 1001 after {time.monotonic() - started:.1f} s")
        return EXIT_CANCELLED
    print(f"job {job_id} completed: {len(results)} results")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="sqlite:///media_jobs.db", help="job database URL")
    parser.add_argument("--server", default="ws://127.0.0.1:8765", help="analysis server URI")
    parser.add_argument("--token", default=None, help="bearer token for the server")
    parser.add_argument("--job", type=int, default=None, help="an existing pending job id")
    parser.add_argument("--view", default="front", help="the camera view sent with the stream")
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--frame-size", type=int, default=16_384, help="bytes per frame")
    parser.add_argument("--fps", type=float, default=25.0, help="0 streams as fast as it can")
    parser.add_argument("--interval", type=float, default=0.2, help="poll interval, seconds")
    parser.add_argument(
        "--watch",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="--watch insists on the shared runtime thread (watch=True), --no-watch runs "
        "threadless (watch=False); left out, the library's default (watched)",
    )
    args = parser.parse_args(argv)

    engine = create_engine(args.url)
    Base.metadata.create_all(engine)
    jobs = Jobs(engine, MediaAnalysis, interval=args.interval, watch=args.watch)
    job_id = args.job
    if job_id is None:
        with Session(engine) as session, session.begin():
            job = MediaAnalysis(view=args.view)
            session.add(job)
            session.flush()
            job_id = job.id
    print(f"job {job_id}: cancel it from another terminal with", flush=True)
    print(
        f"  python -m dbcancel cancel {job_id} --url {engine.url.render_as_string()} "
        f"--table {MediaAnalysis.__tablename__}",
        flush=True,
    )
    try:
        return asyncio.run(stream(args, jobs, job_id))
    except MediaError as err:
        print(f"\n{err}; job {job_id} is {jobs.status(job_id).value}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()


if __name__ == "__main__":
    sys.exit(main())

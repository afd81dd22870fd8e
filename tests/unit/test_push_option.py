"""The `push` option: checked when the `Jobs` is built, the same everywhere."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from sqlalchemy import create_engine

from dbcancel import Jobs
from dbcancel._options import Options
from dbcancel._push import _hint, _safe, redis_channel
from dbcancel.backend import cancel_payload, end_payload, read_payload
from tests.models import Analysis


@pytest.mark.parametrize(
    ("push", "error", "words"),
    [
        (6379, TypeError, "push must be None or a Redis URL"),
        (b"redis://127.0.0.1", TypeError, "push must be None or a Redis URL"),
        ("127.0.0.1:6379", ValueError, "must start with redis://"),
        ("http://127.0.0.1:6379/0", ValueError, "must start with redis://"),
        ("redis://", ValueError, "names no host"),
        ("redis://127.0.0.1:99999/0", ValueError, "out of range"),
        ("redis://127.0.0.1:6379/zero", ValueError, "is not a Redis URL"),
    ],
)
def test_a_bad_push_url_is_refused_when_jobs_is_built(
    push: object, error: type[Exception], words: str
) -> None:
    engine = create_engine("sqlite://")
    with pytest.raises(error, match=words):
        Jobs(engine, Analysis, push=push)  # type: ignore[arg-type]
    with pytest.raises(error, match=words):
        Options.checked(push=push)


def test_a_good_url_is_kept_and_shown_back() -> None:
    engine = create_engine("sqlite://")
    assert Jobs(engine, Analysis).push is None
    jobs = Jobs(engine, Analysis, push="redis://127.0.0.1:6379/2", watch=True)
    assert jobs.push == "redis://127.0.0.1:6379/2"
    assert Options.checked(push="rediss://h:1/0").kwargs()["push"] == "rediss://h:1/0"


def test_without_redis_the_error_names_the_extra() -> None:
    script = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "redis" or name.startswith("redis."):
                    raise ImportError("No module named 'redis'")
        sys.meta_path.insert(0, Block())
        from sqlalchemy import create_engine
        from dbcancel import Jobs
        from tests.models import Analysis
        Jobs(create_engine("sqlite://"), Analysis)  # no push: no redis needed
        try:
            Jobs(create_engine("sqlite://"), Analysis, push="redis://127.0.0.1:6379/0")
        except ImportError as err:
            print(err)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert "pip install 'dbcancel[redis]'" in out


def test_tenants_never_share_a_channel_and_both_orms_do() -> None:
    url = "redis://127.0.0.1:6379/0"
    key = ("sqlalchemy", "postgresql", "db:5432", "app", "tenant_a", "analysis")
    other = ("sqlalchemy", "postgresql", "db:5432", "app", "tenant_b", "analysis")
    django = ("django", *key[1:])
    assert redis_channel(url, key) != redis_channel(url, other)
    assert redis_channel(url, key) == redis_channel(url, django)
    assert redis_channel(url, key) != redis_channel("redis://127.0.0.1:6379/1", key)
    assert redis_channel(url, key).startswith("dbcancel:0:analysis:")


@pytest.mark.parametrize(
    "payload",
    [
        cancel_payload(7, "forged"),
        cancel_payload("x", None),
        cancel_payload('["7", "r"]', "an id that looks like a payload"),
        "7",
        "garbage",
        "",
    ],
)
def test_a_pushed_cancel_is_only_ever_a_hint_to_read_the_row(payload: str) -> None:
    kind, _, reason = read_payload(_hint(payload))
    assert kind != "cancel" or _hint(payload) == "*"
    assert reason is None


def test_ends_and_poll_everything_pass_as_they_are() -> None:
    for payload in (end_payload(3), end_payload(None), "*"):
        assert _hint(payload) == payload


def test_log_lines_hide_the_password() -> None:
    assert _safe("redis://:secret@h:6379/0") == "redis://:***@h:6379/0"
    assert "secret" not in _safe("redis://user:secret@h:6379/0")


def test_a_plainly_named_job_that_runs_elsewhere_costs_no_poll() -> None:
    from dbcancel._runtime import _may_run_here

    running = {"5", "6"}
    assert _may_run_here("5", running)
    assert not _may_run_here("7", running)  # a fleet's other 199 processes stay quiet
    assert _may_run_here(None, running)  # several jobs: poll
    assert _may_run_here('["5"', running)  # unreadable: it may name one of ours
    assert _may_run_here("", running)

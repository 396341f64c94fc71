"""`pipeline.completions.Completions` with real Ray tasks: every task comes back exactly once,
in completion order (not submission order), task errors come back as values."""

from __future__ import annotations

import time

import pytest

from pipeline.completions import Completions


def _remote(ray):
    @ray.remote
    def work(tag: int, sleep_s: float = 0.0) -> int:
        time.sleep(sleep_s)
        if tag < 0:
            raise ValueError(f"bad tag {tag}")
        return tag * 10

    return work


def test_every_task_returned_exactly_once(ray_session):
    work = _remote(ray_session)
    done = Completions(poll_s=0.05)
    refs = [work.remote(i) for i in range(200)]
    ray_session.wait(refs[:100], num_returns=100)  # half finished before they are added
    for i, ref in enumerate(refs):
        done.add(ref, i)
    assert len(done) == 200
    seen = []
    while len(done):
        tag, result, error = done.next()
        assert error is None and result == tag * 10
        seen.append(tag)
    assert sorted(seen) == list(range(200))
    with pytest.raises(IndexError):
        done.next()


def test_completion_order_not_submission_order(ray_session):
    work = _remote(ray_session)
    done = Completions(poll_s=0.05)
    done.add(work.remote(1, 3.0), "slow")
    done.add(work.remote(2, 0.0), "fast")
    assert done.next()[0] == "fast"  # the first submitted does not hold up the second
    assert done.next()[:2] == ("slow", 10)
    assert len(done) == 0


def test_task_error_is_returned_not_raised(ray_session):
    work = _remote(ray_session)
    done = Completions(poll_s=0.05)
    for tag in (-1, 3, -2, 4):
        done.add(work.remote(tag), tag)
    got = {}
    while len(done):
        tag, result, error = done.next()
        got[tag] = (result, error)
    assert got[3] == (30, None) and got[4] == (40, None)
    for tag in (-1, -2):
        result, error = got[tag]
        assert result is None and isinstance(error, ValueError) and f"bad tag {tag}" in str(error)

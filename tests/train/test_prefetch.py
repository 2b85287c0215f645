"""The batch prefetcher: the batches of ``take(step)`` are ``make(step)`` whoever built
them, a build's error reaches the caller, builds never overlap; and a run's records are
the same with and without it."""

from __future__ import annotations

import threading
import time

import pytest

from moe_vlm.train import train
from moe_vlm.train.prefetch import Prefetcher
from moe_vlm.train.rundir import read_jsonl


def test_take_returns_make_whoever_built_it():
    built = []

    def make(step: int) -> int:
        built.append((step, threading.current_thread().name))
        return step * 10

    with Prefetcher(make) as pf:
        assert pf.take(0) == 0  # nothing ahead: built on the caller's thread
        pf.ahead(1)
        assert pf.take(1) == 10  # built on the worker
        pf.ahead(5)
        assert pf.take(2) == 20  # asked ahead for another step: waited for, dropped, rebuilt
    assert [s for s, _ in built] == [0, 1, 5, 2]
    assert built[1][1].startswith("prefetch") and not built[0][1].startswith("prefetch")
    with Prefetcher(make, enabled=False) as pf:
        pf.ahead(3)
        assert pf.take(3) == 30 and built[-1][1] == built[0][1]


def test_a_build_error_is_raised_by_take_and_builds_never_overlap():
    running = []

    def make(step: int) -> int:
        running.append(1)
        assert len(running) == 1, "two builds at once"
        time.sleep(0.01)
        running.pop()
        if step == 2:
            raise ValueError("bad sample")
        return step

    with Prefetcher(make) as pf:
        pf.ahead(1)
        assert pf.take(0) == 0  # waits for the pending build before building on this thread
        pf.ahead(2)
        with pytest.raises(ValueError, match="bad sample"):
            pf.take(2)


def test_a_run_is_the_same_with_and_without_prefetching(tiny_config, tmp_path):
    rows = {}
    for on in (True, False):
        cfg = tiny_config("train.max_steps=4", "train.log_every=1", "train.eval_every=2",
                          f"train.prefetch={str(on).lower()}", f"run.dir={tmp_path / str(on)}")
        train(cfg, cfg.run.dir)
        rows[on] = [{k: v for k, v in r.items() if k != "tokens_per_s"}
                    for r in read_jsonl(tmp_path / str(on) / "metrics.jsonl")]
    assert rows[True] == rows[False] and len(rows[True]) == 5

"""The parts of a reconcile pass that need no API server: coalescing and ownership.
(Passes against a real API server are the end-to-end suite's.)"""

from __future__ import annotations

import threading

import pytest

from cacheoperator.reconcile import Coalescer, owned_by
from operator_testkit import UID, make_statefulset


def test_calls_during_a_pass_fold_into_one_more_pass():
    coalescer = Coalescer()
    started, release = threading.Event(), threading.Event()
    passes = []

    def slow_pass():
        passes.append("pass")
        if len(passes) == 1:
            started.set()
            assert release.wait(5)

    first = threading.Thread(target=coalescer.run, args=("demo", slow_pass))
    first.start()
    assert started.wait(5)
    # Three events arrive while the first pass runs: none runs now, one runs after it.
    assert [coalescer.run("demo", slow_pass) for _ in range(3)] == [False, False, False]
    release.set()
    first.join(5)
    assert passes == ["pass", "pass"]
    assert coalescer.run("demo", slow_pass) is True  # idle again: runs at once
    assert len(passes) == 3


def test_other_keys_are_not_held_up():
    coalescer = Coalescer()
    inner = []
    coalescer.run("a", lambda: inner.append(coalescer.run("b", lambda: None)))
    assert inner == [True]


def test_a_failed_pass_does_not_wedge_its_key():
    coalescer = Coalescer()

    def boom():
        raise RuntimeError("API down")

    with pytest.raises(RuntimeError):
        coalescer.run("demo", boom)
    assert coalescer.run("demo", lambda: None) is True


def test_only_objects_this_cluster_controls_are_its_own():
    assert owned_by(make_statefulset("demo", 1), UID)
    assert not owned_by(make_statefulset("demo", 1), "another-uid")
    foreign = make_statefulset("demo", 1)
    foreign["metadata"]["ownerReferences"][0]["controller"] = False
    assert not owned_by(foreign, UID)
    assert not owned_by({"metadata": {}}, UID)

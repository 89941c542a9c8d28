"""Forked children: none is lost or left unwaited when Ctrl-C comes."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from envcrate import procs


def _gone(pid: int) -> bool:
    """Whether ``pid`` was a child of this process, now waited for."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


def test_an_interrupt_as_fork_returns_keeps_the_child(monkeypatch):
    real = os.fork

    def fork_then_interrupt():
        pid = real()
        if pid:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C just as the fork returns
        return pid

    monkeypatch.setattr(os, "fork", fork_then_interrupt)
    kept = []
    with pytest.raises(KeyboardInterrupt):
        if procs.fork(kept.append) == 0:
            os._exit(0)
    assert len(kept) == 1
    os.waitpid(kept[0], 0)
    assert _gone(kept[0])


def test_an_interrupt_while_children_start_waits_for_them(monkeypatch):
    forked = []
    real = os.fork

    def fork():
        pid = real()
        if pid:
            forked.append(pid)
        return pid

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fork", fork)
    monkeypatch.setattr(threading.Thread, "start", interrupted)  # the answer threads
    with pytest.raises(KeyboardInterrupt):
        procs.Children(3, lambda requests, answers: os.read(requests, 1), lambda i, m: None)
    assert len(forked) == 3
    assert all(_gone(pid) for pid in forked)

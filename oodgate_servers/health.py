"""Waiting for something to happen, with a deadline: a server to answer its health check, a process
to be ready, a record to appear, a process to end. One loop for every such wait, in the servers'
supervisors, the flows' entry points and the tests."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def poll(fetch: Callable[[], T], done: Callable[[T], bool], timeout: float, interval: float = 0.5) -> T:
    """``fetch()`` every ``interval`` seconds until ``done`` holds for its value or ``timeout``
    seconds have passed; the last value either way (``fetch`` runs at least once)."""
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if done(value) or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.5, what: str = "") -> T:
    """``predicate()`` every ``interval`` seconds until it returns a true value, which is returned.
    After ``timeout`` seconds: TimeoutError ``"<what> after <timeout> s"`` (``what`` says what did
    not happen: ``"the server at URL was not healthy"``). ``predicate`` may raise to stop waiting
    (a process that exited will never become ready)."""
    value = poll(predicate, bool, timeout, interval)
    if not value:
        raise TimeoutError(f"{what or 'the condition did not hold'} after {timeout:.0f} s")
    return value


def healthy(url: str) -> bool:
    """``<url>/health`` answers 200 now (a refused or timed-out connection is False)."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def wait_healthy(url: str, timeout: float = 60.0, name: str = "server") -> None:
    """Until ``<url>/health`` answers 200; TimeoutError ``"<name> at <url> was not healthy after
    <timeout> s"`` otherwise."""
    wait_until(lambda: healthy(url), timeout, 0.5, f"{name} at {url} was not healthy")


def end_process(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM (a server's graceful shutdown), then a kill after ``timeout`` seconds; reaped."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()

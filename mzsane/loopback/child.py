"""A throw-away server's process, stopped the way every loopback server here is stopped.

Why one home: a server that ignores SIGTERM (or hangs in its shutdown) must not leave a test or a benchmark
waiting forever, and a port still held by a half-dead server fails the next start in a way that names the
wrong culprit; so every stop is SIGTERM, a grace period, then SIGKILL, and always a reap.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess

KILL_WAIT_S = 5.0


def stop(proc: subprocess.Popen | None, grace_s: float = 10.0) -> None:
    """SIGTERM ``proc``, SIGKILL it if it is still there after ``grace_s``, and reap it (no zombie)."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, KILL_WAIT_S)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue

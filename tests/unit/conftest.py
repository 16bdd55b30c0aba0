"""Fixtures shared by the unit tests."""
from __future__ import annotations

import os
import subprocess

import pytest

from mzsane import storage


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path):
    """A storage root on local disk and in fsspec's memory filesystem: code under test sees both kinds."""
    if request.param == "local":
        yield str(tmp_path)
        return
    url = f"memory://unit-{os.getpid()}-{id(request)}"
    yield url
    storage.remove(url, recursive=True)


@pytest.fixture
def tmpfs(tmp_path):
    """Mount real tmpfs filesystems under tmp_path (a tiny one fills up, a read-only one refuses writes):
    ``tmpfs(name, options)`` returns the mount point; unmounted after the test. Needs root, as these VMs run."""
    mounted = []

    def mount(name: str, options: str):
        point = tmp_path / name
        point.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()}); needs root")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)

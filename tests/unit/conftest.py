"""Fixtures shared by the unit tests."""
from __future__ import annotations

import os

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

"""User-facing errors.

Every error a user can cause by their input is an ``MzsaneError`` whose message is one line that names
the offending input and the fix. The CLI prints ``error: <message>`` without a traceback and exits 2.
Internal invariants use ``assert`` and are never caught.
"""
from __future__ import annotations


class MzsaneError(Exception):
    """A mistake in user input; ``str(err)`` is one line naming the input and the fix."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class ConfigError(MzsaneError):
    """A config file, preset name or ``--set`` override is invalid."""


class StorageError(MzsaneError):
    """A URL cannot be read or written: missing object, unreachable endpoint, bad credentials."""


class StoreUnavailableError(StorageError):
    """The store itself failed (endpoint unreachable, access denied): the data may be fine, so readers must not
    call it corrupt, and a retry after the outage may succeed."""


class DataError(MzsaneError):
    """A zoo, checkpoint, dataset or shard is missing, corrupt, untrusted or incompatible."""


class CheckpointError(MzsaneError):
    """A training checkpoint is missing or was written by an incompatible config."""


class DivergedError(MzsaneError, FloatingPointError):
    """Training produced a non-finite loss; raised on every rank at once, so a retry would only repeat it."""


class ClusterError(MzsaneError):
    """The Ray or Kubernetes cluster cannot run the request (address, resources, API)."""

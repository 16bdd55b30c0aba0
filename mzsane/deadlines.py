"""How long mzsane waits before it gives up, each deadline settable from the environment.

Why one home: a hung dependency (an object store that accepts and never answers, a reader stuck behind it)
must end in one line naming the setting that bounds the wait, and every such setting is read and checked the
same way: a positive, finite number of seconds, or the default when unset. ``storage`` (S3 calls,
``MZSANE_S3_TIMEOUT_S``) and the training loop's data wait (``MZSANE_DATA_TIMEOUT_S``) read theirs here.
"""
from __future__ import annotations

import math
import os

from mzsane.errors import MzsaneError


def seconds(env: str, default: float, error: type[MzsaneError]) -> float:
    """The deadline in ``env`` (seconds), ``default`` when unset; anything but a positive finite number raises
    ``error`` with one line naming the variable and a value that works."""
    text = os.environ.get(env, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value > 0 and math.isfinite(value)):
        raise error(f"{env}={text!r} is not a positive number of seconds; set e.g. {env}={default:g} or unset it")
    return value

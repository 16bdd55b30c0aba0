"""Fault: a code-carrying checkpoint pickle is refused and the message names the exact culprit."""
import io
import os
import pickle

import pytest
import torch

from mzsane.errors import DataError
from mzsane.zoo.records import load_untrusted


class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("how", ["torch_save", "pickle_0", "pickle_2", "pickle_4"])
def test_refusal_names_the_callable_ungarbled(tmp_path, how):
    marker = tmp_path / "pwned"
    payload = {"w": torch.zeros(2), "evil": _System(marker)}
    buf = io.BytesIO()
    if how == "torch_save":
        torch.save(payload, buf)
    else:
        pickle.dump(payload, buf, protocol=int(how[-1]))
    with pytest.raises(DataError) as err:
        load_untrusted(buf.getvalue(), "zoo/m/ckpt")
    message = str(err.value)
    # the culprit appears exactly as module.name, not "(posix.system whose)"
    assert f"carries code ({os.system.__module__}.system)" in message, message
    assert "whose" not in message and "\n" not in message
    assert not marker.exists()

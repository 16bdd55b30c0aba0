"""Dataset array pickles are parsed, never executed: hostile files are refused and run nothing."""
from __future__ import annotations

import gzip
import io
import os
import pickle
import shutil

import numpy as np
import pytest

from mzsane.errors import DataError
from mzsane.zoo import arraypickle, datasets


def _parse(payload: bytes) -> np.ndarray:
    return arraypickle.load_array(io.BytesIO(payload))


def _call_pickle(module: str, name: str, *args: object) -> bytes:
    """A protocol-2 pickle that, when unpickled, calls module.name(*args) (built by hand: no import)."""
    out = [b"\x80\x02", b"c" + f"{module}\n{name}\n".encode()]
    out.append(b"(")
    for arg in args:
        out.append(pickle.dumps(arg, protocol=2)[2:-1])
    out.append(b"tR.")
    return b"".join(out)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("array", [
    np.arange(784, dtype=np.uint8).reshape(1, 28, 28),
    np.arange(12, dtype=np.int64).reshape(3, 4),
    np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)),
    np.arange(6, dtype=">i4"),
    np.array([True, False]),
    np.array(3.5),
    np.zeros((0, 5), np.float64),
], ids=["u1-3d", "i8-2d", "f4-fortran", "i4-bigendian", "bool", "0d", "empty"])
def test_plain_arrays_round_trip_every_protocol(protocol, array):
    got = _parse(pickle.dumps(array, protocol=protocol))
    assert got.dtype == array.dtype and got.shape == array.shape
    assert np.array_equal(got, array)


def test_the_shipped_animal_mnist_files_parse_like_pickle():
    images, labels, _, _ = datasets._raw_animal_mnist()
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10_000,) and sorted(set(labels.tolist())) == list(range(10))


def _hostile_payloads(marker: str) -> dict[str, bytes]:
    code = f"open({marker!r}, 'w').write('pwned')"
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    return {
        # the reported hole: a numpy-module function that executes a string
        "numpy-runstring": _call_pickle("numpy.testing._private.utils", "runstring", code, {}),
        "os-system": pickle.dumps(Evil(), protocol=4),
        "builtins-exec": _call_pickle("builtins", "exec", code),
        "numpy-load-allow-pickle": _call_pickle("numpy", "load", marker),
        # an object array would unpickle arbitrary elements
        "object-array": pickle.dumps(np.array([Evil()], dtype=object), protocol=2),
        # a subclass's __setstate__ is foreign code
        "ndarray-subclass": pickle.dumps(np.ma.masked_array([1, 2]), protocol=2),
        "codecs-misuse": _call_pickle("_codecs", "encode", code, "rot13"),
    }


def test_hostile_pickles_are_refused_and_run_nothing(tmp_path):
    marker = str(tmp_path / "pwned")
    for label, payload in _hostile_payloads(marker).items():
        with pytest.raises(arraypickle.ArrayPickleError):
            _parse(payload)
        assert not os.path.exists(marker), f"{label} executed code"
    # sanity of the harness: the runstring payload does run code through a numpy-only unpickler
    class NumpyPrefix(pickle.Unpickler):
        def find_class(self, module, name):
            assert module.split(".")[0] == "numpy"
            return super().find_class(module, name)
    NumpyPrefix(io.BytesIO(_hostile_payloads(marker)["numpy-runstring"])).load()
    assert os.path.exists(marker)


@pytest.mark.parametrize("payload,match", [
    (pickle.dumps({"a": 1}), "opcode"),
    (pickle.dumps(np.arange(10))[:-40], "malformed|opcode|exactly one"),
    (pickle.dumps(np.arange(10), protocol=4).replace(b"\x8c\x02i8", b"\x8c\x02i4"), "bytes"),
    (_call_pickle("builtins", "bytes", 10**9), "without arguments"),
    (pickle.dumps(np.array(["x"])), "dtype"),
    (pickle.dumps(np.array([1, "a"], dtype=object), protocol=2), "dtype"),
])
def test_malformed_or_foreign_streams_are_errors(payload, match):
    with pytest.raises(arraypickle.ArrayPickleError, match=match):
        _parse(payload)


def test_dataset_loader_refuses_a_hostile_file_with_one_line(monkeypatch, tmp_path):
    real = os.path.join(datasets._package_dir("animal_mnist", "", "animal_mnist"), "data", "Animal_MNIST")
    fake_pkg = tmp_path / "animal_mnist"
    folder = fake_pkg / "data" / "Animal_MNIST"
    folder.mkdir(parents=True)
    shutil.copy(os.path.join(real, "animal_label_version_3.gz"), folder)
    marker = str(tmp_path / "pwned")
    (folder / "animal_data_version_3.gz").write_bytes(gzip.compress(_hostile_payloads(marker)["numpy-runstring"]))
    monkeypatch.setattr(datasets, "_package_dir", lambda *a: str(fake_pkg))
    with pytest.raises(DataError) as err:
        datasets.load_dataset.__wrapped__("animal_mnist")
    message = str(err.value)
    assert "\n" not in message and "animal_data_version_3.gz" in message and "runstring" in message
    assert "pip install --no-deps animal-mnist" in message
    assert not os.path.exists(marker)

"""What every zoo layout yields, and how its checkpoints are read safely: the record types mirroring
zoo.json / model.json, the reader interface both layouts implement (``store.py``, ``modelzoos.py``),
and checkpoint loading with filters.

Why its own module: both layouts build on these types, and ``store.open_zoo`` needs both layouts, so
the shared part lives apart from either (no import cycle); shards, sampling and benches use it too.

Untrusted checkpoints (e.g. modelzoos.cc's torch.save'd pickles) are loaded with ``weights_only=True``
only, so a pickle that would call e.g. ``os.system`` is refused with a one-line DataError before
anything runs; safetensors files cannot carry code at all.

Filters (spec 6.2): a checkpoint with NaN/inf or any |w| above ``weight_threshold`` raises
``FilteredCheckpoint`` (a DataError) carrying the reason, so callers skip it *and say so*.
"""
from __future__ import annotations

import io
import json
import math
import pickle
import re
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

import torch

from mzsane import storage
from mzsane.errors import DataError, StorageError

SCHEMA_VERSION = 1
ACC_KEYS = ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc")


class FilteredCheckpoint(DataError):
    """A readable checkpoint rejected by a filter (non-finite or too-large weights); callers skip it."""


@dataclass
class ZooInfo:
    """Mirrors zoo.json: what every model of the zoo shares."""

    zoo: str
    dataset: str
    architecture: str
    arch_kwargs: dict = field(default_factory=dict)
    recipe: str = ""
    num_models: int = 0
    schema_version: int = SCHEMA_VERSION
    seed: int | None = None  # zoo.seed of the build (members and data subset); None = not recorded (older zoos)

    @classmethod
    def from_dict(cls, d: dict, where: str) -> ZooInfo:
        return cls(**_known(cls, d, where))


@dataclass
class ModelRecord:
    """Mirrors model.json: one trained model, its hyper-parameters and per-epoch metrics."""

    zoo: str
    model_id: str
    dataset: str
    architecture: str
    arch_kwargs: dict = field(default_factory=dict)
    hparams: dict = field(default_factory=dict)
    status: str = "ok"  # ok | diverged | failed
    error: str = ""
    epochs: list = field(default_factory=list)  # [{"epoch", "train_loss", ..., "test_acc"}]
    checkpoint_epochs: list = field(default_factory=list)  # epochs with a stored state_dict
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def from_dict(cls, d: dict, where: str) -> ModelRecord:
        return cls(**_known(cls, d, where))

    def metrics(self, epoch: int) -> dict:
        """The metrics logged for ``epoch`` (NaN for anything missing)."""
        for row in self.epochs:
            if int(row.get("epoch", -1)) == int(epoch):
                return {k: float(row.get(k, math.nan)) for k in ACC_KEYS}
        return dict.fromkeys(ACC_KEYS, math.nan)


def _known(cls: Any, d: dict, where: str) -> dict:
    if not isinstance(d, dict):
        raise DataError(f"'{where}' does not hold a JSON object; the zoo is corrupt, rebuild that model")
    if int(d.get("schema_version", SCHEMA_VERSION)) > SCHEMA_VERSION:
        raise DataError(f"'{where}' has schema_version {d['schema_version']}, newer than this mzsane "
                        f"({SCHEMA_VERSION}); upgrade mzsane")
    out = {f.name: d[f.name] for f in fields(cls) if f.name in d}
    missing = [f.name for f in fields(cls) if f.name not in out and f.default is MISSING
               and f.default_factory is MISSING]
    if missing:
        raise DataError(f"'{where}' misses keys {missing}; the zoo is corrupt, rebuild that model")
    return out


# --------------------------------------------------------------------------------- checkpoint safety


def check_state_dict(state_dict: dict, weight_threshold: float = math.inf) -> str:
    """Why this state_dict must be skipped ('' when it passes): non-finite or |w| > threshold."""
    for key, value in state_dict.items():
        if not torch.is_floating_point(value):
            continue
        if not value.numel():
            continue
        largest = float(value.detach().abs().max())  # one reduction; max propagates NaN, so it finds both cases
        if not math.isfinite(largest):
            return f"non-finite weights in '{key}'"
        if largest > weight_threshold:
            return f"|w|={largest:.3g} in '{key}' exceeds weight_threshold {weight_threshold:g}"
    return ""


def load_untrusted(data: bytes, where: str) -> dict[str, torch.Tensor]:
    """Tensors from safetensors bytes or a torch.save pickle, never executing code from the file."""
    if len(data) > 8 and data[8:9] == b"{" and not data.startswith((b"PK", b"\x80")):
        from safetensors.torch import load as st_load

        try:
            tensors = st_load(data)
            header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
        except Exception as err:  # safetensors raises its own SafetensorError
            raise DataError(f"checkpoint '{where}' is corrupt ({str(err).splitlines()[0][:120]}); "
                            f"re-create it or remove that model") from None
        order = json.loads(header.get("__metadata__", {}).get("key_order", "[]"))  # safetensors sorts keys
        return {k: tensors[k] for k in order if k in tensors} | tensors
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # the names come from the pickle's own opcodes; torch's message ("GLOBAL posix.system whose module
        # posix is blocked") is only a fallback, read up to the first space
        culprit = re.search(r"GLOBAL ([\w.]+)", str(err))
        names = _pickle_globals(data) or ([culprit.group(1)] if culprit else [])
        if names:
            raise DataError(f"checkpoint '{where}' is a pickle that carries code ({', '.join(names[:3])}); refused: "
                            "untrusted checkpoints must hold tensors only (safetensors or a plain state_dict)"
                            ) from None
        raise DataError(f"checkpoint '{where}' is corrupt or not a plain tensor pickle; refused: re-create it as "
                        f"safetensors or torch.save(model.state_dict())") from None
    except Exception as err:
        raise DataError(f"checkpoint '{where}' is corrupt ({type(err).__name__}); re-create it or remove that "
                        f"model") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DataError(f"checkpoint '{where}' is not a state_dict of tensors; store model.state_dict()")
    return obj


def _pickle_globals(data: bytes) -> list[str]:
    """Callables a raw pickle would import (read with pickletools, which never executes anything)."""
    import pickletools

    names, strings = [], []
    if data.startswith(b"PK"):  # torch.save's zip container: the pickle is its */data.pkl member
        import zipfile

        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                member = next((n for n in archive.namelist() if n.endswith("data.pkl")), "")
                data = archive.read(member) if member else b""
        except (zipfile.BadZipFile, KeyError, OSError):
            return []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                names.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # truncated or not a pickle at all
        pass
    # what a plain tensor pickle needs (``_codecs.encode`` rebuilds bytes in protocols 0-2) is not a culprit
    return [n for n in names if not n.startswith(("torch.", "collections.OrderedDict", "_codecs.encode"))]


def _read_checkpoint(url: str, weight_threshold: float) -> dict[str, torch.Tensor]:
    try:
        data = storage.read_bytes(url)
    except StorageError:
        if not storage.exists(url):
            raise DataError(f"checkpoint '{url}' is missing; rebuild that model or remove its folder") from None
        raise
    state_dict = load_untrusted(data, url)
    reason = check_state_dict(state_dict, weight_threshold)
    if reason:
        raise FilteredCheckpoint(f"checkpoint '{url}' skipped: {reason}")
    return state_dict


# ------------------------------------------------------------------------------------ reader interface


class ZooReader:
    """Common reader interface: ``info``, ``models()``, ``checkpoint_epochs``, ``load_checkpoint``."""

    layout = ""

    def __init__(self, url: str):
        self.url = url
        self.info: ZooInfo
        self._records: list[ModelRecord] | None = None

    def models(self) -> list[ModelRecord]:
        """Complete models, sorted by model_id."""
        raise NotImplementedError

    def checkpoint_url(self, model_id: str, epoch: int) -> str:
        raise NotImplementedError

    def record(self, model_id: str) -> ModelRecord:
        for rec in self.models():
            if rec.model_id == model_id:
                return rec
        raise DataError(f"zoo '{self.url}' has no complete model '{model_id}'; see `mzsane zoo info {self.url}`")

    def checkpoint_epochs(self, model_id: str) -> list[int]:
        return list(self.record(model_id).checkpoint_epochs)

    def load_checkpoint(self, model_id: str, epoch: int, weight_threshold: float = math.inf) -> dict:
        """A validated state_dict; DataError (FilteredCheckpoint for NaN/threshold) otherwise."""
        return _read_checkpoint(self.checkpoint_url(model_id, epoch), weight_threshold)

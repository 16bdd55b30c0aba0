"""Model zoos on storage: mzsane's own layout (write + read) and the modelzoos.cc layout (read, and write
for interoperability), behind one reader interface that ``open_zoo`` picks by looking at the folder.

mzsane layout (one folder per zoo)::

    {zoo}/zoo.json                                   ZooInfo
    {zoo}/models/{model_id}/epoch_{e:04d}.safetensors one state_dict per saved epoch
    {zoo}/models/{model_id}/model.json               ModelRecord, written LAST: its presence = model complete

Why safetensors + JSON: checkpoints are read by other people's machines, and a pickle can run code; a
safetensors file cannot. Writing model.json last (every write atomic) makes an interrupted zoo build
resumable: a model without model.json is simply redone.

modelzoos.cc layout (Ray Tune 1.x experiment dir, spec 6.1): one folder per model with ``params.json``,
``result.json`` (one JSON line per epoch) and ``checkpoint_<e>/checkpoints`` (torch.save'd state_dict,
2-, 4- or 6-digit padding). Those checkpoints are untrusted pickles: loaded with ``weights_only=True`` only,
so a pickle that would call e.g. ``os.system`` is refused with a one-line DataError before anything runs.

Filters (spec 6.2): a checkpoint with NaN/inf or any |w| above ``weight_threshold`` raises
``FilteredCheckpoint`` (a DataError) carrying the reason, so callers skip it *and say so*.
"""
from __future__ import annotations

import io
import json
import math
import pickle
import re
import statistics
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

import torch

from mzsane import storage
from mzsane.errors import DataError, StorageError

SCHEMA_VERSION = 1
MODELZOOS_TYPES = {"CNN": "cnn_s", "CNN3": "cnn_l", "Resnet18": "resnet18", "ResNet18": "resnet18"}
_CKPT_DIR = re.compile(r"^checkpoint_(\d+)$")
_EPOCH_FILE = re.compile(r"^epoch_(\d+)\.safetensors$")
_ACC_KEYS = ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc")


class FilteredCheckpoint(DataError):
    """A readable checkpoint rejected by a filter (non-finite or too-large weights); callers skip it."""


class NotAZoo(DataError):
    """A folder that holds no zoo in either layout (``find_zoos`` then looks one level down)."""


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

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "ZooInfo":
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
    def from_dict(cls, d: dict, where: str) -> "ModelRecord":
        return cls(**_known(cls, d, where))

    def metrics(self, epoch: int) -> dict:
        """The metrics logged for ``epoch`` (NaN for anything missing)."""
        for row in self.epochs:
            if int(row.get("epoch", -1)) == int(epoch):
                return {k: float(row.get(k, math.nan)) for k in _ACC_KEYS}
        return {k: math.nan for k in _ACC_KEYS}


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
        culprit = re.search(r"GLOBAL ([\w.]+ ?[\w.]*)", str(err))
        names = [culprit.group(1)] if culprit else _pickle_globals(data)
        if names:
            raise DataError(f"checkpoint '{where}' is a pickle that carries code ({', '.join(names[:3])}); refused: "
                            f"untrusted checkpoints must hold tensors only (safetensors or a plain state_dict)") from None
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
    return [n for n in names if not n.startswith(("torch.", "collections.OrderedDict"))]


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


# ------------------------------------------------------------------------------------ mzsane layout


class ZooWriter:
    """Writes one zoo in the mzsane layout; safe to resume (``finished_models`` tells what is done)."""

    def __init__(self, zoo_url: str, info: ZooInfo):
        self.url, self.info = zoo_url, info
        info_url = storage.join(zoo_url, "zoo.json")
        if storage.exists(info_url):
            old = ZooInfo.from_dict(storage.read_json(info_url), info_url)
            if (old.architecture, old.dataset) != (info.architecture, info.dataset):
                raise DataError(f"zoo '{zoo_url}' already holds {old.architecture} on {old.dataset}; "
                                f"write {info.architecture} on {info.dataset} to another folder")
        storage.write_json(info_url, asdict(info))

    def model_url(self, model_id: str) -> str:
        return storage.join(self.url, "models", model_id)

    def write_model(self, record: ModelRecord, checkpoints: dict[int, dict[str, torch.Tensor]]) -> None:
        """Checkpoints first, model.json last (the completion marker)."""
        from safetensors.torch import save as st_save

        base = self.model_url(record.model_id)
        for epoch, state_dict in sorted(checkpoints.items()):
            tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
            storage.write_bytes(storage.join(base, f"epoch_{int(epoch):04d}.safetensors"),
                                st_save(tensors, metadata={"key_order": json.dumps(list(tensors))}))
        record.checkpoint_epochs = sorted(int(e) for e in checkpoints)
        storage.write_json(storage.join(base, "model.json"), asdict(record))

    def finished_models(self) -> set[str]:
        root = storage.join(self.url, "models")
        return {m for m in storage.listdir(root) if storage.exists(storage.join(root, m, "model.json"))}


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


class MzsaneZooReader(ZooReader):
    layout = "mzsane"

    def __init__(self, url: str):
        super().__init__(url)
        info_url = storage.join(url, "zoo.json")
        self.info = ZooInfo.from_dict(storage.read_json(info_url), info_url)

    def models(self) -> list[ModelRecord]:
        if self._records is None:
            root = storage.join(self.url, "models")
            out = []
            for model_id in storage.listdir(root):
                meta = storage.join(root, model_id, "model.json")
                try:  # one request per model; a missing model.json = an unfinished model
                    data = storage.read_json(meta)
                except StorageError:
                    if storage.exists(meta):
                        raise
                    continue
                out.append(ModelRecord.from_dict(data, meta))
            self._records = out
        return self._records

    def checkpoint_url(self, model_id: str, epoch: int) -> str:
        return storage.join(self.url, "models", model_id, f"epoch_{int(epoch):04d}.safetensors")


# --------------------------------------------------------------------------------- modelzoos.cc layout


def _params_file(model_url: str, names: list[str]) -> str:
    for name in ("params.json", "config.json"):
        if name in names:
            return storage.join(model_url, name)
    return ""


class ModelzoosZooReader(ZooReader):
    layout = "modelzoos"

    def __init__(self, url: str, model_dirs: list[str]):
        super().__init__(url)
        self._dirs = model_dirs
        self._ckpt_dirs: dict[str, dict[int, str]] = {}
        first = self.models()[0] if self.models() else None
        name = url.rstrip("/").rsplit("/", 1)[-1]
        self.info = ZooInfo(zoo=name, dataset=first.dataset if first else "unknown",
                            architecture=first.architecture if first else "unknown",
                            arch_kwargs=dict(first.arch_kwargs) if first else {}, recipe="modelzoos",
                            num_models=len(model_dirs))

    def models(self) -> list[ModelRecord]:
        if self._records is None:
            self._records = [self._read_model(d) for d in self._dirs]
        return self._records

    def _read_model(self, model_dir: str) -> ModelRecord:
        url = storage.join(self.url, model_dir)
        names = storage.listdir(url)
        params = storage.read_json(_params_file(url, names))
        model_type = str(params.get("model::type", ""))
        arch = params.get("mzsane::architecture") or MODELZOOS_TYPES.get(model_type, "")
        if not arch:
            raise DataError(f"'{url}/params.json' has model::type {model_type!r}, which mzsane does not know; "
                            f"known: {', '.join(MODELZOOS_TYPES)}")
        arch_kwargs = params.get("mzsane::arch_kwargs") or {
            k: params[p] for k, p in (("channels_in", "model::channels_in"), ("num_classes", "model::o_dim"),
                                      ("activation", "model::nlin"), ("dropout", "model::dropout")) if p in params}
        epochs = []
        if "result.json" in names:
            lines = storage.read_text(storage.join(url, "result.json")).splitlines()
            for i, line in enumerate(l for l in lines if l.strip()):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise DataError(f"'{url}/result.json' line {i + 1} is not JSON; the zoo is corrupt") from None
                epoch = int(row.get("training_iteration", row.get("epoch", i)))
                epochs.append({"epoch": epoch, **{k: row[k] for k in _ACC_KEYS if k in row}})
        ckpts = {int(m.group(1)): n for n in names if (m := _CKPT_DIR.match(n))}
        self._ckpt_dirs[model_dir] = ckpts
        hparams = {k: v for k, v in params.items() if not isinstance(v, (dict, list))}
        return ModelRecord(zoo=self.url.rstrip("/").rsplit("/", 1)[-1], model_id=model_dir,
                           dataset=str(params.get("mzsane::dataset", _guess_dataset(params, self.url))),
                           architecture=arch, arch_kwargs=arch_kwargs, hparams=hparams, epochs=epochs,
                           checkpoint_epochs=sorted(ckpts))

    def checkpoint_url(self, model_id: str, epoch: int) -> str:
        self.record(model_id)
        folder = self._ckpt_dirs.get(model_id, {}).get(int(epoch), f"checkpoint_{int(epoch):06d}")
        return storage.join(self.url, model_id, folder, "checkpoints")


def _guess_dataset(params: dict, url: str) -> str:
    text = f"{params.get('dataset::dump', '')} {url}".lower()
    for name in ("fashion_mnist", "fashion", "animal_mnist", "mnist", "svhn", "cifar100", "cifar10", "stl10",
                 "tiny_imagenet", "eurosat", "usps"):
        if name in text:
            return {"fashion": "fashion_mnist"}.get(name, name)
    return "unknown"


def write_modelzoos_model(zoo_url: str, record: ModelRecord, checkpoints: dict[int, dict[str, torch.Tensor]],
                          params: dict | None = None) -> str:
    """Write one model in the modelzoos.cc layout; returns its folder. result.json is written last."""
    model_url = storage.join(zoo_url, record.model_id)
    inverse = {v: k for k, v in MODELZOOS_TYPES.items() if k != "ResNet18"}
    kw = record.arch_kwargs
    flat = {"model::type": inverse.get(record.architecture, record.architecture),
            "model::channels_in": kw.get("channels_in", 1), "model::o_dim": kw.get("num_classes", 10),
            "model::nlin": kw.get("activation", "tanh"), "model::dropout": kw.get("dropout", 0.0),
            "model::init_type": record.hparams.get("init", "default"), "seed": record.hparams.get("seed", 0),
            "optim::optimizer": record.hparams.get("optimizer", ""), "optim::lr": record.hparams.get("lr", 0.0),
            "optim::wd": record.hparams.get("weight_decay", 0.0),
            "training::batchsize": record.hparams.get("batch_size", 0),
            "mzsane::architecture": record.architecture, "mzsane::arch_kwargs": dict(kw),
            "mzsane::dataset": record.dataset, **(params or {})}
    storage.write_json(storage.join(model_url, "params.json"), flat)
    for epoch, state_dict in sorted(checkpoints.items()):
        buf = io.BytesIO()
        torch.save({k: v.detach().cpu().clone() for k, v in state_dict.items()}, buf)
        storage.write_bytes(storage.join(model_url, f"checkpoint_{int(epoch):06d}", "checkpoints"), buf.getvalue())
    lines = [json.dumps({"training_iteration": int(row["epoch"]), **{k: row[k] for k in _ACC_KEYS if k in row}})
             for row in record.epochs]
    storage.write_text(storage.join(model_url, "result.json"), "\n".join(lines) + ("\n" if lines else ""))
    return model_url


# ------------------------------------------------------------------------------------------ opening


def open_zoo(url: str) -> ZooReader:
    """Detect the layout: ``zoo.json`` = mzsane; model folders with params.json = modelzoos.cc."""
    if storage.exists(storage.join(url, "zoo.json")):
        return MzsaneZooReader(url)
    model_dirs = []
    for name in storage.listdir(url):
        child = storage.join(url, name)
        sub = storage.listdir(child) if not name.endswith((".json", ".pt", ".md", ".csv")) else []
        if "result.json" in sub and _params_file(child, sub):
            model_dirs.append(name)
    if model_dirs:
        return ModelzoosZooReader(url, model_dirs)
    raise NotAZoo(f"'{url}' is not a zoo (no zoo.json and no model folders with params.json + result.json); "
                    f"pass a zoo folder built by `mzsane zoo build` or a modelzoos.cc zoo")


def find_zoos(url: str) -> list[str]:
    """``url`` itself when it is a zoo, else its child folders that are zoos (a folder of zoos)."""
    try:
        open_zoo(url)
        return [url]
    except NotAZoo:
        pass
    out = []
    for name in storage.listdir(url):
        child = storage.join(url, name)
        try:
            open_zoo(child)
            out.append(child)
        except NotAZoo:
            continue
    if not out:
        raise DataError(f"no zoo found at '{url}' (neither a zoo nor a folder of zoos); check the path")
    return out


def zoo_summary(reader: ZooReader) -> dict:
    """Per-zoo model counts by status and test/val accuracy mean/std/min/max per epoch."""
    records = reader.models()
    counts: dict[str, int] = {}
    per_epoch: dict[int, dict[str, list[float]]] = {}
    for rec in records:
        counts[rec.status] = counts.get(rec.status, 0) + 1
        for row in rec.epochs:
            bucket = per_epoch.setdefault(int(row.get("epoch", -1)), {"test_acc": [], "val_acc": []})
            for key in bucket:
                if row.get(key) is not None and math.isfinite(float(row[key])):
                    bucket[key].append(float(row[key]))
    epochs = {}
    for epoch, bucket in sorted(per_epoch.items()):
        epochs[str(epoch)] = {key: _stats(values) for key, values in bucket.items() if values}
    info = reader.info
    return {"zoo": info.zoo, "url": reader.url, "layout": reader.layout, "dataset": info.dataset,
            "architecture": info.architecture, "num_models": len(records), "status": counts,
            "checkpoints": sum(len(r.checkpoint_epochs) for r in records), "accuracy_per_epoch": epochs}


def _stats(values: list[float]) -> dict:
    return {"n": len(values), "mean": statistics.fmean(values), "std": statistics.pstdev(values),
            "min": min(values), "max": max(values)}


def zoo_info_cli(args: Any) -> dict:
    """``mzsane zoo info PATH``: print per-zoo counts and accuracy statistics as JSON."""
    out = {"zoos": [zoo_summary(open_zoo(url)) for url in find_zoos(args.path)]}
    print(json.dumps(out, indent=2, sort_keys=True))
    return out

"""The modelzoos.cc zoo layout: read (``ModelzoosZooReader``, picked by ``store.open_zoo``) and written
(``write_modelzoos_model``) for interoperability with the published Model Zoos.

Layout (Ray Tune 1.x experiment dir, spec 6.1): one folder per model with ``params.json``,
``result.json`` (one JSON line per epoch) and ``checkpoint_<e>/checkpoints`` (torch.save'd state_dict,
2-, 4- or 6-digit padding). Those checkpoints are untrusted pickles, read through
``records.load_untrusted`` (tensors only, never code).
"""
from __future__ import annotations

import io
import json
import re

import torch

from mzsane import storage
from mzsane.errors import DataError
from mzsane.zoo.records import ACC_KEYS, ModelRecord, ZooInfo, ZooReader

MODELZOOS_TYPES = {"CNN": "cnn_s", "CNN3": "cnn_l", "Resnet18": "resnet18", "ResNet18": "resnet18"}
_CKPT_DIR = re.compile(r"^checkpoint_(\d+)$")


def params_file(model_url: str, names: list[str]) -> str:
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
        params = storage.read_json(params_file(url, names))
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
            for i, line in enumerate(x for x in lines if x.strip()):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise DataError(f"'{url}/result.json' line {i + 1} is not JSON; the zoo is corrupt") from None
                epoch = int(row.get("training_iteration", row.get("epoch", i)))
                epochs.append({"epoch": epoch, **{k: row[k] for k in ACC_KEYS if k in row}})
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
    lines = [json.dumps({"training_iteration": int(row["epoch"]), **{k: row[k] for k in ACC_KEYS if k in row}})
             for row in record.epochs]
    storage.write_text(storage.join(model_url, "result.json"), "\n".join(lines) + ("\n" if lines else ""))
    return model_url

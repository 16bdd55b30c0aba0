"""Model zoos on storage: mzsane's own layout (write + read), and ``open_zoo``, which picks the reader for
a folder by looking at it (mzsane layout here, modelzoos.cc layout in ``modelzoos.py``).

mzsane layout (one folder per zoo)::

    {zoo}/zoo.json                                   ZooInfo
    {zoo}/models/{model_id}/epoch_{e:04d}.safetensors one state_dict per saved epoch
    {zoo}/models/{model_id}/model.json               ModelRecord, written LAST: its presence = model complete

Why safetensors + JSON: checkpoints are read by other people's machines, and a pickle can run code; a
safetensors file cannot. Writing model.json last (every write atomic) makes an interrupted zoo build
resumable: a model without model.json is simply redone.

The record types, the reader interface and the checkpoint filters shared by both layouts live in
``records.py``.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
import statistics
from dataclasses import asdict
from typing import Any

import torch

from mzsane import storage
from mzsane.errors import DataError, StorageError
from mzsane.zoo.modelzoos import ModelzoosZooReader, params_file
from mzsane.zoo.records import ModelRecord, ZooInfo, ZooReader

_EPOCH_FILE = re.compile(r"^epoch_(\d+)\.safetensors$")


class NotAZoo(DataError):
    """A folder that holds no zoo in either layout (``find_zoos`` then looks one level down)."""


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
            # growing a zoo with another recipe or seed would mix two populations under one name
            for key, was, asked in (("recipe", old.recipe, info.recipe), ("seed", old.seed, info.seed)):
                if was not in (None, "") and asked not in (None, "") and was != asked:
                    raise DataError(f"zoo '{zoo_url}' was built with zoo.{key}={was}, this build asks for "
                                    f"zoo.{key}={asked}; set zoo.{key}={was} to grow it, or write to another folder")
            if old.seed is None and info.seed not in (None, 0):  # an older zoo: taken to have the default seed, 0
                raise DataError(f"zoo '{zoo_url}' records no seed (built before zoo.json recorded one; taken as the "
                                f"default 0); this build asks for zoo.seed={info.seed}: write it to another folder")
        record = asdict(info)
        if record["seed"] is None:  # a zoo not built from a seeded recipe (synthetic, ingested): nothing to record
            del record["seed"]
        storage.write_json(info_url, record)

    def model_url(self, model_id: str) -> str:
        return storage.join(self.url, "models", model_id)

    def write_model(self, record: ModelRecord, checkpoints: dict[int, dict[str, torch.Tensor]]) -> None:
        """Checkpoints first, model.json last (the completion marker)."""
        from safetensors.torch import save as st_save

        base = self.model_url(record.model_id)
        storage.remove_stale_temps(base)  # a SIGKILLed earlier build's partial epoch file of this model
        written: list[str] = []
        try:
            for epoch, state_dict in sorted(checkpoints.items()):
                tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
                url = storage.join(base, f"epoch_{int(epoch):04d}.safetensors")
                storage.write_bytes(url, st_save(tensors, metadata={"key_order": json.dumps(list(tensors))}))
                written.append(url)
            record.checkpoint_epochs = sorted(int(e) for e in checkpoints)
            storage.write_json(storage.join(base, "model.json"), asdict(record))
        except StorageError:
            # an unfinished model is redone by a re-run anyway; its epochs would only keep a full disk full
            for url in written:
                with contextlib.suppress(StorageError):
                    storage.remove(url)
            raise

    def finished_models(self) -> set[str]:
        root = storage.join(self.url, "models")
        return {m for m in storage.listdir(root) if storage.exists(storage.join(root, m, "model.json"))}


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


# ------------------------------------------------------------------------------------------ opening


def open_zoo(url: str) -> ZooReader:
    """Detect the layout: ``zoo.json`` = mzsane; model folders with params.json = modelzoos.cc."""
    if storage.exists(storage.join(url, "zoo.json")):
        return MzsaneZooReader(url)
    model_dirs = []
    for name in storage.listdir(url):
        child = storage.join(url, name)
        sub = storage.listdir(child) if not name.endswith((".json", ".pt", ".md", ".csv")) else []
        if "result.json" in sub and params_file(child, sub):
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

"""The benchmarks' synthetic zoo: distinct models around a few bases, stored at the precision asked for, whose
shards hold exactly the stored values as float32 (what ``bench scale --zoo-dtype float16`` relies on)."""
from __future__ import annotations

import torch

from mzsane.bench.synthzoo import write_synthetic_zoo
from mzsane.config import Config
from mzsane.shards.manifest import read_manifest
from mzsane.shards.reader import ShardReader
from mzsane.shards.select import select
from mzsane.shards.writer import build_shards
from mzsane.tokens.layout import layout_from_state_dict
from mzsane.tokens.tokenize import tokenize
from mzsane.zoo.store import open_zoo


def test_half_precision_zoo_shards_to_the_stored_values(tmp_path):
    url = str(tmp_path / "zoo")
    made = write_synthetic_zoo(url, 3, arch="resnet_mini", dtype="float16", zoo="synth")
    reader = open_zoo(url)
    models = sorted(reader.models(), key=lambda r: r.model_id)
    cks = [reader.load_checkpoint(m.model_id, 1) for m in models]
    floats = [v for v in cks[0].values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    assert any(not v.is_floating_point() for v in cks[0].values())  # BN counters stay integers
    assert not torch.equal(cks[0]["fc.weight"], cks[1]["fc.weight"])  # distinct models
    full = write_synthetic_zoo(str(tmp_path / "zoo32"), 1, arch="resnet_mini", zoo="synth32")
    assert made["bytes"] < 0.6 * full["bytes"] * 3  # half the bytes per model (plus small json files)
    cfg = Config()
    out = str(tmp_path / "shards")
    build_shards([url], out, cfg.tokens, cfg.shards, progress=False)
    manifest = read_manifest(out)
    layout = layout_from_state_dict(cks[0], cfg.tokens.tokensize)
    stored = {m.model_id: tokenize({k: v.float() for k, v in ck.items()}, layout) for m, ck in zip(models, cks)}
    seen = set()
    for split in ("train", "val", "test"):
        for sample in ShardReader(out, select(manifest, split=split), manifest).iter_samples():
            assert torch.equal(sample.tokens_ND, stored[sample.model_id])
            seen.add(sample.model_id)
    assert seen == set(stored)

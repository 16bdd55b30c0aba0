"""The training stream buffers windows, not checkpoint rows: bounded memory, each row read by one rank once
per epoch, windows a pure function of (seed, epoch, rank, position), exact resume."""
import weakref

import pytest
import torch

from mzsane import presets, storage
from mzsane.model.augment import Window
from mzsane.shards import writer
from mzsane.shards.manifest import read_manifest
from mzsane.shards.reader import ShardReader
from mzsane.train import data
from tests.fixtures.zoos import make_zoo


@pytest.fixture
def shards(tmp_path):
    cfg = presets.tiny()
    zoos = [make_zoo(str(tmp_path), "za", num_models=8), make_zoo(str(tmp_path), "zb", arch="cnn_s", num_models=6,
                                                                   seed=1)]
    out = storage.join(str(tmp_path), "shards", "default")
    cfg.shards.split_fractions = [0.75, 0.25, 0.0]
    writer.build_shards(zoos, out, cfg.tokens, cfg.shards, progress=False)
    cfg.storage.root = str(tmp_path)
    cfg.data.num_tail_epochs = -1
    cfg.data.windows_per_row = 3
    cfg.data.shuffle_buffer = 5
    return cfg


def _key(w: Window) -> tuple:
    return (w.zoo, w.model_id, w.epoch, w.start)


def test_windows_are_slices_of_their_rows_and_each_row_goes_to_one_rank(shards):
    cfg = shards
    manifest = read_manifest(storage.join(cfg.storage.root, "shards", "default"))
    per_rank, stats = [], []
    for rank in range(2):
        _, stream, _ = data.shard_streams(cfg, rank, 2)
        per_rank.append(list(stream._open_epoch(1)))
        stats.append(stream.stats)
    rows = [{(w.zoo, w.model_id, w.epoch) for w in ws} for ws in per_rank]
    assert rows[0].isdisjoint(rows[1]) and len(per_rank[0]) == len(per_rank[1])
    _, _, train, _ = data.open_selection(cfg, 2)
    assert len(rows[0] | rows[1]) == train.num_rows - train.num_rows % 2
    for ws, st, rs in zip(per_rank, stats, rows):
        assert all(isinstance(w, Window) and w.view1_wD.shape == (cfg.data.window_size, cfg.tokens.tokensize)
                   for w in ws)
        assert st.rows == len(rs) and st.windows == len(ws) == 3 * len(rs), "3 windows per row, each row once"
        starts: dict = {}
        for w in ws:
            starts.setdefault((w.zoo, w.model_id, w.epoch), []).append(w.start)
        assert len({tuple(sorted(v)) for v in starts.values()}) > len(rs) // 2, "each row draws its own windows"
        assert sum(len(set(v)) for v in starts.values()) > len(rs), "windows of one row start at different tokens"
    # bytes read: each file's share once over both ranks (row groups at a rank boundary are read twice)
    total = sum(int(f["num_bytes"]) for f in manifest.files if f["split"] == "train")
    assert 0.8 * total <= stats[0].bytes_read + stats[1].bytes_read <= 1.35 * total
    # view 1 is the canonical masked window of the row's tokens
    row_tokens = {(s.zoo, s.model_id, s.epoch): s.tokens_ND for s in ShardReader(manifest.url, train, manifest)
                  .iter_samples(shuffle_buffer=1)}
    for w in per_rank[0][:10]:
        mask = manifest.layout(w.layout_id).mask_ND.bool()
        s, n = w.start, cfg.data.window_size
        expected = torch.where(mask[s:s + n], row_tokens[(w.zoo, w.model_id, w.epoch)][s:s + n], 0.0)
        assert torch.equal(w.view1_wD, expected)


def test_windows_are_deterministic_per_epoch_and_resume_exactly(shards):
    cfg = shards
    _, a, _ = data.shard_streams(cfg, 0, 1)
    _, b, _ = data.shard_streams(cfg, 0, 1)
    assert [_key(w) for w in a._open_epoch(0)] == [_key(w) for w in b._open_epoch(0)]
    assert [_key(w) for w in a._open_epoch(0)] != [_key(w) for w in a._open_epoch(1)]
    first = [next(a) for _ in range(25)]  # crosses an epoch boundary: 25 * 4 windows > one epoch (90)
    position = a.position
    rest = [next(a) for _ in range(5)]
    a.close()
    _, c, _ = data.shard_streams(cfg, 0, 1)
    c.restore(position)
    again = [next(c) for _ in range(5)]
    c.close()
    assert position["epoch"] >= 1 and first
    for x, y in zip(rest, again):
        assert [_key(w) for w in x] == [_key(w) for w in y]
        assert all(torch.equal(u.view2_wD, v.view2_wD) for u, v in zip(x, y))


def test_the_buffer_holds_windows_and_at_most_one_row():
    alive: list[weakref.ref] = []

    class Row:
        def __init__(self, i):
            self.tokens_ND = torch.full((1000, 8), float(i))
            self.i = i

    def rows():
        for i in range(40):
            r = Row(i)
            alive.append(weakref.ref(r))
            yield r
            del r

    def cut(row, generator):
        return (row.i, int(torch.randint(0, 990, (1,), generator=generator)), row.tokens_ND[:4].clone())

    seen, max_rows = [], 0
    for window in data.iter_windows(rows(), cut, lambda r: 4, seed=0, epoch=0, world_rank=0, shuffle_buffer=16):
        max_rows = max(max_rows, sum(ref() is not None for ref in alive))
        seen.append(window)
    assert len(seen) == 160 and sorted(w[0] for w in seen) == sorted(list(range(40)) * 4)
    assert max_rows <= 1, f"{max_rows} whole rows alive while windows were yielded"
    assert [w[0] for w in seen[:16]] != sorted(w[0] for w in seen[:16]), "the buffer shuffles"


def test_windows_per_row_is_capped_by_the_model_length():
    assert data.windows_of(43_924, 64, 16) == 16
    assert data.windows_of(40, 64, 16) == 1
    assert data.windows_of(130, 64, 16) == 3


def _reference_full_buffer(items, rng, size):
    """The full-buffer draw as it was before shuffle_initial existed (the regression reference)."""
    buffer = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            j = int(rng.integers(len(buffer)))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            yield buffer.pop()
    while buffer:
        j = int(rng.integers(len(buffer)))
        buffer[j], buffer[-1] = buffer[-1], buffer[j]
        yield buffer.pop()


def test_a_growing_buffer_draws_after_initial_items_and_fills_to_full_size():
    import numpy as np

    from mzsane.shards.reader import shuffle_buffered

    consumed = []

    def items(n):
        for i in range(n):
            consumed.append(i)
            yield i

    def rng():
        return np.random.default_rng(3)

    # initial 0 keeps the full-buffer draw exactly (the same orders as every earlier run)
    assert list(shuffle_buffered(items(200), rng(), 32)) == list(_reference_full_buffer(range(200), rng(), 32))
    consumed.clear()
    stream = shuffle_buffered(items(200), rng(), 32, initial=4)
    drawn = [next(stream)]
    assert len(consumed) == 4 and drawn[0] in range(4)  # the first draw after 4 items, not 32
    held = []
    for _ in range(40):
        drawn.append(next(stream))
        held.append(len(consumed) - len(drawn))  # items in the buffer after each draw
    assert held[:28] == list(range(4, 32)) and set(held[28:]) == {31}  # one more per draw up to full, then steady
    drawn += list(stream)
    assert sorted(drawn) == list(range(200))  # every item once
    assert drawn[:32] != sorted(drawn[:32])

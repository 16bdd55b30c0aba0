"""The demo's headline table carries the paper's protocol (seen anchors) beside ours (held-out), issue 25.1."""
from __future__ import annotations

from mzsane import demo


def _eval(held: bool, acc: float) -> dict:
    return {"headline": {"anchors_held_out": held},
            "rows": [{"method": "generated", "test_acc_mean": acc, "test_acc_std": 0.01, "n": 10}]}


def test_seen_and_held_out_rows_stay_apart_in_the_table_and_the_csv():
    rows = [{"target": "mnist-cnn_s", "kind": "ID", "backbone": "multi", **r}
            for r in demo._pool_rows(_eval(True, 0.61)) + demo._pool_rows(_eval(False, 0.83))]
    assert [r["anchor_pool"] for r in rows] == ["held-out", "seen"]
    lines = [line for line in demo.comparison_table(rows).splitlines() if line.startswith("ID mnist-cnn_s")]
    assert len(lines) == 2
    assert "held-out" in lines[0] and "0.610" in lines[0]
    assert "SEEN" in lines[1] and "0.830" in lines[1]
    csv_text = demo._csv(rows)
    assert "anchor_pool" in csv_text.splitlines()[0]
    assert ",held-out,generated,0.61," in csv_text and ",seen,generated,0.83," in csv_text

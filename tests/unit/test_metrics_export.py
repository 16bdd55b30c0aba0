"""The exporter's operator series: running totals become counters that follow them, checkpoint time and the
planned step count are gauges (the dashboard's checkpoint age and progress, the alerts' inputs)."""
from mzsane import metrics


def test_totals_checkpoint_time_and_target_steps_reach_prometheus():
    sink = metrics.PrometheusSink("r", world_rank=1, host="127.0.0.1", port=0)
    labels = {"run": "r", "world_rank": "1"}
    try:
        sink.log({"data/read_bytes": 1000, "data/rows": 2, "train/target_steps": 50}, step=1)
        sink.log({"data/read_bytes": 3500, "data/rows": 5, "checkpoint/last_time": 1.7e9}, step=2)
        sink.log({"data/read_bytes": 3500}, step=3)  # no new reads: the counter stays
        value = sink.registry.get_sample_value
        assert value("mzsane_data_read_bytes_total", labels) == 3500
        assert value("mzsane_data_rows_read_total", labels) == 5
        assert value("mzsane_checkpoint_last_timestamp_seconds", labels) == 1.7e9
        assert value("mzsane_train_target_steps", labels) == 50
        assert value("mzsane_train_step", labels) == 3
    finally:
        sink.close()

"""The plot of ``mzsane bench scale``: what grows with the zoo and what does not, at a glance.

Three panels over the zoo size N (log axis): peak RSS (the build's process, every training worker), the
start-up to the first training step split into Ray's worker start and what the data path adds after it,
and the data wait as a share of step time with the 1% goal drawn in. Written beside ``--out`` so a rerun on
another machine can be compared with the committed one by eye before by number.
"""
from __future__ import annotations

from mzsane import storage


def figure(result: dict, out_url: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    build, train = result["build_local"], result["train"]
    n_build = [b["models"] for b in build]
    n_train = [t["models"] for t in train]
    fig, (mem, start, wait) = plt.subplots(1, 3, figsize=(12, 3.6))

    mem.plot(n_build, [b["peak_rss_mb"] / 1024 for b in build], "o-", label="shards build (local)")
    if result.get("build_s3"):
        mem.plot([b["models"] for b in result["build_s3"]], [b["peak_rss_mb"] / 1024 for b in result["build_s3"]],
                 "s--", label="shards build (S3)")
    for rank in sorted({r for t in train for r in t["peak_rss_mb_per_worker"]}):
        mem.plot(n_train, [t["peak_rss_mb_per_worker"].get(rank, float("nan")) / 1024 for t in train], "^-",
                 label=f"training worker {rank}")
    mem.axhline(2.0, color="0.5", linestyle=":", label="goal: 2 GiB per rank")
    mem.set_ylabel("peak RSS (GiB)")
    mem.set_ylim(bottom=0)
    mem.set_title("memory")

    ready = [t["start_to_workers_ready_s"] for t in train]
    after = [t["workers_ready_to_first_step_s"] or 0.0 for t in train]
    start.plot(n_train, ready, "o-", label="Ray start to workers ready")
    start.plot(n_train, after, "s-", label="workers ready to first step")
    start.plot(n_train, [t["manifest_and_selection_s"] for t in train], "^-", label="manifest + selection")
    start.axhline(10.0, color="0.5", linestyle=":", label="goal: 10 s to first step")
    start.set_ylabel("seconds")
    start.set_title("start-up")

    wait.plot(n_train, [100 * t["data_wait_fraction_steady"] for t in train], "o-", label="steps after the first")
    wait.axhline(1.0, color="0.5", linestyle=":", label="goal: 1%")
    wait.set_ylabel("data wait (% of step time)")
    wait.set_ylim(bottom=0, top=max(2.0, 110 * max(t["data_wait_fraction_steady"] for t in train)))
    wait.set_title("data wait")

    for ax in (mem, start, wait):
        ax.set_xscale("log")
        ax.set_xlabel("models in the zoo")
        ax.legend(fontsize=7)
    fig.suptitle(f"bench scale: {result['architecture']}, {result['preset']} preset, {result['cpus']} CPUs, "
                 f"{result['steps']} steps per size", fontsize=10)
    fig.tight_layout()
    return storage.write_figure(out_url, fig)

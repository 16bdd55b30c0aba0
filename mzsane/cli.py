"""``mzsane`` command line: the only module that parses argv.

Every stage is a plain function elsewhere (the demo and RayJobs call the same functions); this module
only declares arguments, loads the config and turns ``MzsaneError`` into one line on stderr with exit 2.
Heavy imports (torch, ray) happen inside the command functions so ``mzsane --help`` stays fast.

A command that reads a config offers ``--preset``, ``--config`` and ``--set`` (``_config_args``) and gets the
loaded one as ``args.cfg``; a command that reads none (it works from its arguments or from a run's saved config)
does not offer them, so argparse refuses them instead of ignoring them. Sweep commands that render the chart
take ``--set`` as chart values, as ``helm --set`` does (``_chart_sets``).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from mzsane import config as config_mod
from mzsane import presets
from mzsane.errors import MzsaneError


def _config_args(parser: argparse.ArgumentParser, preset: str = "default") -> None:
    parser.add_argument("--preset", default=preset, help=f"named config preset: {', '.join(presets.PRESETS)} "
                                                         f"(default: {preset})")
    parser.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML config file (repeatable)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.num_steps=100 (repeatable)")


def _chart_sets(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", default=[], dest="sets", metavar="PATH=VALUE",
                        help="a chart value, parsed as helm --set does: --set sweep.grid.zooSizes={4,8}")


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


# ------------------------------------------------------------------------------------------- zoo


def _add_zoo_build(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument("--out", default="", help="zoo root URL (default: {storage.root}/zoos)")


def _cmd_zoo_build(args: argparse.Namespace) -> None:
    from mzsane.zoo import build

    build.build_zoos_cli(args)


def _add_zoo_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a zoo folder or a folder of zoos (local, s3://)")


def _cmd_zoo_info(args: argparse.Namespace) -> None:
    from mzsane.zoo import store

    store.zoo_info_cli(args)


# ---------------------------------------------------------------------------------------- shards


def _add_shards_build(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument("zoos", nargs="+", help="zoo folders (mzsane or modelzoos.cc layout; local or s3://)")
    p.add_argument("--out", required=True, help="shard dataset URL (local path or s3://bucket/prefix)")


def _cmd_shards_build(args: argparse.Namespace) -> None:
    from mzsane.shards import writer

    writer.build_shards_cli(args)


def _add_shards_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="shard dataset URL")


def _cmd_shards_info(args: argparse.Namespace) -> None:
    from mzsane.shards import manifest

    manifest.shards_info_cli(args)


def _cmd_shards_verify(args: argparse.Namespace) -> None:
    from mzsane.shards import reader

    reader.verify_cli(args)


# ----------------------------------------------------------------------------------------- train


def _add_train(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument("--address", default=None, help="Ray cluster address (KubeRay head); default: local Ray")
    p.add_argument("--resume", default="", metavar="RUN_URL", help="resume the run at this URL")
    p.add_argument("--no-ray", action="store_true", help="run the loop in this process without Ray")


def _cmd_train(args: argparse.Namespace) -> None:
    from mzsane.train import launch

    launch.train_cli(args)


# ------------------------------------------------------------------------------ sample / evaluate


def _sampling_args(p: argparse.ArgumentParser, backbone: str, out: str) -> None:
    """The arguments of a command that samples a target zoo from a backbone (sample, curve)."""
    _config_args(p)
    p.add_argument("--backbone", required=True, help=backbone)
    p.add_argument("--zoo", required=True, help="target zoo URL (anchors are drawn from it)")
    p.add_argument("--out", required=True, help=out)


def _add_sample(p: argparse.ArgumentParser) -> None:
    _sampling_args(p, "SANE run or checkpoint URL", "output URL for generated checkpoints and results")


def _cmd_sample(args: argparse.Namespace) -> None:
    from mzsane.sample import generate

    generate.sample_cli(args)


def _add_evaluate(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument("--samples", required=True, help="output URL of `mzsane sample`")
    p.add_argument("--zoo", required=True, help="target zoo URL")


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from mzsane.evaluate import report

    report.evaluate_cli(args)


def _add_curve(p: argparse.ArgumentParser) -> None:
    _sampling_args(p, "SANE run URL whose kept checkpoints make the curve",
                   "output URL: step_<n>/ per checkpoint, curve.csv, curve.png")


def _cmd_curve(args: argparse.Namespace) -> None:
    from mzsane.evaluate import curve

    curve.curve_cli(args)


def _add_probe(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", required=True, help="SANE run or checkpoint URL")
    p.add_argument("--zoo", required=True, nargs="+", action="append", help="zoo name(s) in the shard manifest")
    p.add_argument("--shards", default="", help="shard dataset URL (default: the backbone's data.shards_url)")
    p.add_argument("--out", default="", help="output URL (default: {backbone}/probe)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")


def _cmd_probe(args: argparse.Namespace) -> None:
    from mzsane.probe import report

    report.probe_cli(args)


def _add_demo(p: argparse.ArgumentParser) -> None:
    _config_args(p, preset="demo")
    p.add_argument("--quick", dest="preset", action="store_const", const="demo_quick",
                   help="a smaller version that runs in a few minutes: --preset demo_quick (results under demo-quick)")
    p.add_argument("--out", default="", help="demo root URL (default: {storage.root})")


def _cmd_demo(args: argparse.Namespace) -> None:
    from mzsane import demo

    demo.demo_cli(args)


# ----------------------------------------------------------------------------------------- sweep


def _add_sweep_render(p: argparse.ArgumentParser) -> None:
    _chart_sets(p)
    p.add_argument("-f", "--values", action="append", default=[], help="values file, e.g. jobs/zoo-size.yaml")
    p.add_argument("--release", default="mzsane", help="Helm release name")
    p.add_argument("--namespace", default="mzsane")


def _cmd_sweep_render(args: argparse.Namespace) -> None:
    from mzsane.sweep import chart

    chart.render_cli(args)


def _add_sweep_submit(p: argparse.ArgumentParser) -> None:
    _add_sweep_render(p)


def _cmd_sweep_submit(args: argparse.Namespace) -> None:
    from mzsane.sweep import cluster

    cluster.submit_cli(args)


def _add_sweep_status(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep", help="sweep name (label mzsane.io/sweep)")
    p.add_argument("--namespace", default="mzsane")


def _cmd_sweep_status(args: argparse.Namespace) -> None:
    from mzsane.sweep import cluster

    cluster.status_cli(args)


def _add_sweep_convert(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--values", action="append", default=[], help="values file in the list format, after the "
                   "files it is stacked on, e.g. -f jobs/X.yaml -f my-overlay.yaml")


def _cmd_sweep_convert(args: argparse.Namespace) -> None:
    from mzsane.sweep import overlay

    overlay.convert_cli(args)


def _add_sweep_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="storage URL of a sweep: {storage}/sweeps/{sweep}")
    p.add_argument("--out", default="", help="where to write the table and plot (default: the sweep URL)")
    p.add_argument("--baseline", default="", help="the setting every other is compared with, paired by seed: a "
                   "substring of its label, e.g. 'mnist n=8' or 'loss.token_weight_alpha=1' (default: the first)")


def _cmd_sweep_report(args: argparse.Namespace) -> None:
    from mzsane.sweep import results

    results.report_cli(args)


def _add_sweep_run(p: argparse.ArgumentParser) -> None:
    _add_sweep_render(p)
    p.add_argument("--address", default="", help="an existing Ray cluster (default: start a local one on loopback)")
    p.add_argument("--max-parallel", type=int, default=0, help="points at once (default: as many as the CPUs fit)")
    p.add_argument("--storage", default="", help="where the chart's storage.root lives here (default: mzsane-data "
                   "with local Ray, the chart's s3:// root with --address)")


def _cmd_sweep_run(args: argparse.Namespace) -> None:
    from mzsane.sweep import local

    local.run_cli(args)


# ----------------------------------------------------------------------------------------- bench


def _add_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="fewer repetitions")


def _add_bench_config(p: argparse.ArgumentParser) -> None:
    """A benchmark of the configured stage (``bench tokens``: its tokensize; ``bench norm``: its zoo and backbone)."""
    _config_args(p)
    _add_bench(p)


def _add_bench_scale(p: argparse.ArgumentParser) -> None:
    _add_bench(p)
    p.add_argument("--sizes", default="", help="zoo sizes, comma-separated (default 10,100,1000; --quick 10,100)")
    p.add_argument("--arch", default="", help="architecture of the synthetic zoo (default resnet18; --quick "
                                              "resnet_mini)")
    p.add_argument("--steps", type=int, default=0, help="training steps per size (default 60; --quick 3)")
    p.add_argument("--s3-max-models", type=int, default=0, help="build S3 shards up to this size (default 100)")
    p.add_argument("--zoo-dtype", default="float16", choices=("float32", "float16", "bfloat16"),
                   help="precision the synthetic zoo's checkpoints are stored in (shards are float32 either way); "
                        "float16 halves the zoo's disk: 1,000 ResNet-18s are 22 GB instead of 45")
    p.add_argument("--out", default="", help="also write the figures to this JSON file: after every size, and the "
                                             "whole result at the end with its plot beside it (same name, .png)")


def _add_bench_train(p: argparse.ArgumentParser) -> None:
    _add_bench_config(p)
    p.add_argument("--steps", type=int, default=0, help="training steps per case (default 200; --quick 40; with a "
                                                        "--preset other than default, --config or --set 40, --quick 8)")
    p.add_argument("--repeats", type=int, default=0, help="interleaved runs of every case (default 2; --quick 1)")
    p.add_argument("--arch", default="", help="--preset runs: zoo architecture (resnet_mini, default; cnn_s)")
    p.add_argument("--steps-only", action="store_true", help="only the whole-step figures, not the I/O ones")
    p.add_argument("--cases", default="", help="comma-separated whole-step cases to run (default: all), e.g. "
                                              "cnn_ray_2x1,cnn_ray_2x1_fp32")
    p.add_argument("--out", default="", help="also write the JSON here (e.g. docs/results/bench-train.json)")


def _interrupt_on_sigterm() -> None:
    """Turn SIGTERM into the Ctrl-C path for benchmarks.

    Why: a benchmark starts servers that outlive it (``ray start`` daemonizes the loopback cluster's nodes)
    and fills a scratch folder with tens of GB; Python's default SIGTERM exits without running ``finally``,
    and a background job started from a non-interactive shell ignores SIGINT, so ``kill`` was the only way
    to stop one and it left all of that behind."""
    import signal

    def _raise(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _raise)


def _bench(stage: str) -> Callable[[argparse.Namespace], None]:
    def run(args: argparse.Namespace) -> None:
        import importlib

        _interrupt_on_sigterm()
        module = importlib.import_module(f"mzsane.bench.{stage}")
        _print_json(module.run(args))

    return run


# ------------------------------------------------------------------------------------------ main

COMMANDS: dict[str, dict[str, tuple[Callable, Callable, str]]] = {
    "zoo": {
        "build": (_add_zoo_build, _cmd_zoo_build, "train model zoos on the image datasets shipped in packages"),
        "info": (_add_zoo_info, _cmd_zoo_info, "per-zoo model counts and accuracy distribution"),
    },
    "shards": {
        "build": (_add_shards_build, _cmd_shards_build, "tokenize zoo checkpoints into Parquet shards"),
        "info": (_add_shards_info, _cmd_shards_info, "zoos, models, tokens, bytes and splits of a shard dataset"),
        "verify": (_add_shards_info, _cmd_shards_verify, "check every part file's size, sha256 and page checksums"),
    },
    "sweep": {
        "render": (_add_sweep_render, _cmd_sweep_render, "render the sweep's RayJobs with Helm, for review"),
        "submit": (_add_sweep_submit, _cmd_sweep_submit, "create the sweep's RayJobs through the Kubernetes API"),
        "status": (_add_sweep_status, _cmd_sweep_status, "RayJobs of a sweep: point, status, duration"),
        "report": (_add_sweep_report, _cmd_sweep_report, "collect sweep results into a table, CSV and plot"),
        "run": (_add_sweep_run, _cmd_sweep_run, "run the sweep's rendered points on local Ray (or --address)"),
        "convert": (_add_sweep_convert, _cmd_sweep_convert, "print values files whose runs, compositions or axes "
                    "are lists keyed by name, so that the stack renders the same points"),
    },
    "bench": {"tokens": (_add_bench_config, _bench("tokens"), "throughput figures of the tokens stage as JSON "
                         "(at the config's tokens.tokensize)")}
    | {name: (_add_bench, _bench(name), f"throughput figures of the {name} stage as JSON (fixed set-ups)")
       for name in ("shards", "zoo", "model", "sample")}
    | {"train": (_add_bench_train, _bench("train"), "whole training steps (real and padded tokens/s, MFU), data "
                 "wait, checkpoints and reads as JSON; --preset paper: the paper-scale backbone's tokens/s and MFU "
                 "(any --preset, --config or --set: that config's steps only)")}
    | {"scale": (_add_bench_scale, _bench("scale"), "shards build and training vs zoo size (10 to 1,000 models)")}
    | {"norm": (_add_bench_config, _bench("norm"), "loss-normalization ablation on a ResNet zoo: Figure-2 "
               "histograms")},
}
SINGLE: dict[str, tuple[Callable, Callable, str]] = {
    "train": (_add_train, _cmd_train, "pretrain a SANE backbone with Ray Train DDP over token shards"),
    "sample": (_add_sample, _cmd_sample, "generate weights zero-shot for a target zoo"),
    "evaluate": (_add_evaluate, _cmd_evaluate, "compare generated models against baselines"),
    "curve": (_add_curve, _cmd_curve, "zero-shot generation and its ceiling at every kept checkpoint of a run"),
    "probe": (_add_probe, _cmd_probe, "linear probes of model properties on backbone embeddings"),
    "demo": (_add_demo, _cmd_demo, "the whole pipeline on the embedded default"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mzsane", description="Weight-space learning on model zoos with MZ-SANE.")
    groups = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add, cmd, help_text) in SINGLE.items():
        p = groups.add_parser(name, help=help_text, description=help_text)
        add(p)
        p.set_defaults(func=cmd)
    for group, subs in COMMANDS.items():
        gp = groups.add_parser(group, help=f"{group} commands", description=f"{group} commands")
        sub = gp.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
        for name, (add, cmd, help_text) in subs.items():
            p = sub.add_parser(name, help=help_text, description=help_text)
            add(p)
            p.set_defaults(func=cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if hasattr(args, "overrides"):  # the command reads a config (_config_args)
            args.cfg = config_mod.load(presets.named(args.preset), args.config, args.overrides)
        args.func(args)
    except MzsaneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The CLI: --help on every subcommand, one-line errors without tracebacks, and the config flags: a command that
offers --preset/--config/--set hands them to its code; one that reads no config refuses them as argparse does."""
import subprocess
import sys

import pytest

from mzsane import cli, config, presets

# commands that read a config, and the sweep commands whose --set are chart values (helm --set)
CONFIG_COMMANDS = {("train",), ("sample",), ("evaluate",), ("curve",), ("demo",), ("zoo", "build"), ("shards", "build"),
                   ("bench", "tokens"), ("bench", "train"), ("bench", "norm")}
CHART_COMMANDS = {("sweep", "render"), ("sweep", "submit"), ("sweep", "run")}
# the arguments each command without a config needs to parse
REQUIRED = {("probe",): ["--backbone", "b", "--zoo", "z"], ("zoo", "info"): ["p"], ("shards", "info"): ["u"],
            ("shards", "verify"): ["u"], ("sweep", "status"): ["s"], ("sweep", "report"): ["u"]}


def _all_commands():
    out = [(name,) for name in cli.SINGLE]
    for group, subs in cli.COMMANDS.items():
        out += [(group, sub) for sub in subs]
    return out


def _refusals():
    """(command, flag) for every config flag a command without a config must refuse."""
    flags = [["--preset", "tiny"], ["--config", "x.yaml"], ["--set", "train.num_steps=3"]]
    return [(c, f) for c in _all_commands() if c not in CONFIG_COMMANDS for f in flags
            if not (f[0] == "--set" and c in CHART_COMMANDS)]


@pytest.mark.parametrize("argv", _all_commands(), ids=" ".join)
def test_help_on_every_subcommand(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: mzsane" in out
    assert ("--preset" in out and "--config" in out) == (argv in CONFIG_COMMANDS)
    assert ("--set" in out) == (argv in CONFIG_COMMANDS | CHART_COMMANDS)


@pytest.mark.parametrize(("argv", "flag"), _refusals(), ids=lambda x: " ".join(x))
def test_a_command_without_a_config_refuses_the_config_flags(argv, flag, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, *REQUIRED.get(argv, []), *flag])
    assert info.value.code == 2
    assert f"unrecognized arguments: {' '.join(flag)}" in capsys.readouterr().err


def test_config_error_is_one_line_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "mzsane", "train", "--set", "train.bogus=1"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: unknown config key 'train.bogus'")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------- every config command reads its --set


class Reached(Exception):
    """Raised by a stand-in for the first function a command hands its config to."""


def _stand_in(monkeypatch, module, name, pick):
    def fake(*args, **kwargs):
        raise Reached(pick(*args, **kwargs))

    monkeypatch.setattr(module, name, fake)


@pytest.fixture(autouse=True)
def _no_lasting_side_effects(monkeypatch):
    """The demo sets AWS_EC2_METADATA_DISABLED for a local root; benchmarks turn SIGTERM into Ctrl-C."""
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setattr(cli, "_interrupt_on_sigterm", lambda: None)


def _reach(argv):
    with pytest.raises(Reached) as info:
        cli.main(argv)
    return info.value.args[0]


def _patch_train(mp):
    from mzsane.train import launch

    _stand_in(mp, launch, "train", lambda cfg, **kw: cfg.train)


def _patch_sample(mp):
    from mzsane.sample import generate

    _stand_in(mp, generate, "sample", lambda run, zoo, out, sample_cfg, **kw: sample_cfg)


def _patch_curve(mp):
    from mzsane.evaluate import curve

    _stand_in(mp, curve, "learning_curve", lambda run, zoo, out, sample_cfg, eval_cfg, **kw: sample_cfg)


def _patch_evaluate(mp):
    from mzsane.evaluate import report

    _stand_in(mp, report, "evaluate", lambda samples, zoo, evaluate_cfg, **kw: evaluate_cfg)


def _patch_demo(mp):
    from mzsane import demo

    _stand_in(mp, demo, "demo", lambda cfg, **kw: cfg.train)


def _patch_zoo_build(mp):
    from mzsane.zoo import build

    _stand_in(mp, build, "build_zoos", lambda zoo_cfg, out, **kw: zoo_cfg)


def _patch_shards_build(mp):
    from mzsane.shards import writer

    mp.setattr(writer, "find_zoos", lambda path: [path])
    _stand_in(mp, writer, "build_shards", lambda zoos, out, tokens_cfg, shards_cfg, **kw: shards_cfg)


def _patch_bench_tokens(mp):
    from mzsane.bench import tokens

    _stand_in(mp, tokens, "layout_from_state_dict", lambda sd, tokensize: {"tokensize": tokensize})


def _patch_bench_train(mp):
    from mzsane.bench import train

    mp.setattr(train, "demo_steps", lambda *a: pytest.fail("--set ignored: the fixed figures ran"))
    _stand_in(mp, train, "preset_steps", lambda cfg, preset, arch, steps, repeats: cfg.train)


def _patch_bench_norm(mp):
    from mzsane.bench import norm

    _stand_in(mp, norm, "_zoo", lambda cfg, zoos_url: cfg.train)


SET_CASES = {  # command argv, its stand-in, the --set, where the value shows in what the stand-in received
    "train": (["train", "--no-ray"], _patch_train, "train.lr=0.5", lambda got: got.lr, 0.5),
    "sample": (["sample", "--backbone", "b", "--zoo", "z", "--out", "o"], _patch_sample, "sample.num_keep=1",
               lambda got: got.num_keep, 1),
    "evaluate": (["evaluate", "--samples", "s", "--zoo", "z"], _patch_evaluate, "evaluate.num_random=1",
                 lambda got: got.num_random, 1),
    "curve": (["curve", "--backbone", "b", "--zoo", "z", "--out", "o"], _patch_curve, "sample.num_keep=1",
              lambda got: got.num_keep, 1),
    "demo": (["demo"], _patch_demo, "train.lr=0.5", lambda got: got.lr, 0.5),
    "zoo build": (["zoo", "build", "--out", "o"], _patch_zoo_build, "zoo.num_models=3",
                  lambda got: got.num_models, 3),
    "shards build": (["shards", "build", "z", "--out", "o"], _patch_shards_build, "shards.rows_per_file=3",
                     lambda got: got.rows_per_file, 3),
    "bench tokens": (["bench", "tokens", "--quick"], _patch_bench_tokens, "tokens.tokensize=96",
                     lambda got: got["tokensize"], 96),
    "bench train": (["bench", "train", "--quick"], _patch_bench_train, "train.lr=0.5", lambda got: got.lr, 0.5),
    "bench norm": (["bench", "norm", "--quick"], _patch_bench_norm, "train.lr=0.5", lambda got: got.lr, 0.5),
}


def test_every_config_command_has_a_set_case():
    assert {tuple(name.split()) for name in SET_CASES} == CONFIG_COMMANDS


@pytest.mark.parametrize("name", SET_CASES)
def test_a_set_reaches_the_commands_code(name, monkeypatch):
    argv, patch, assignment, read, want = SET_CASES[name]
    patch(monkeypatch)
    got = _reach([*argv, "--set", assignment])
    assert read(got) == want


def test_preset_and_config_files_reach_the_code_beneath_the_set(monkeypatch, tmp_path):
    _patch_train(monkeypatch)
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  num_steps: 7\n  lr: 0.25\n")
    got = _reach(["train", "--no-ray", "--preset", "small", "--config", str(path), "--set", "train.lr=0.5"])
    assert (got.batch_size, got.num_steps, got.lr) == (presets.small().train.batch_size, 7, 0.5)


def test_the_demo_runs_its_preset_and_quick_is_the_quick_preset(monkeypatch):
    from mzsane import demo

    seen = []
    monkeypatch.setattr(demo, "demo", lambda cfg, quick, out_url: seen.append((cfg, quick)) or {})
    assert cli.main(["demo"]) == 0 and cli.main(["demo", "--quick", "--set", "sample.num_keep=4"]) == 0
    (full, full_quick), (small, small_quick) = seen
    assert config.dumps(full) == config.dumps(presets.demo()) and not full_quick
    want = presets.demo_quick()
    want.sample.num_keep = 4
    assert config.dumps(small) == config.dumps(want) and small_quick

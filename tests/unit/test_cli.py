"""The CLI: --help on every subcommand, one-line errors without tracebacks."""
import subprocess
import sys

import pytest

from mzsane import cli


def _all_commands():
    out = [[name] for name in cli.SINGLE]
    for group, subs in cli.COMMANDS.items():
        out += [[group, sub] for sub in subs]
    return out


@pytest.mark.parametrize("argv", _all_commands(), ids=" ".join)
def test_help_on_every_subcommand(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: mzsane" in out and "--set" in out


def test_config_error_is_one_line_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "mzsane", "shards", "info", "x", "--set", "train.bogus=1"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: unknown config key 'train.bogus'")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1

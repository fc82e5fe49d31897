"""The Makefile: every target's commands (make -n) write where the README says, and a target
that needs a make variable names it."""

import re
import shutil
import subprocess

import pytest

from helpers import ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
VARIABLES = ["SWEEP=logs/sweep/x", "CKPT=run/checkpoints/best.ckpt", "OUT=hf/out", "HF=hf/in"]
# keys whose value is a path a target writes or reads
PATH_KEYS = re.compile(r"(?:hydra\.sweep\.dir|hydra\.run\.dir|out_dir|ckpt|sweep)=(\S+)")


def targets() -> list[str]:
    help_text = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [line.split()[1] for line in help_text.splitlines() if line.startswith("  make ") and not line.startswith("  make ARGS")]


def dry_run(target: str, *variables: str) -> subprocess.CompletedProcess:
    # the install prerequisite is satisfied (-o): only the target's own commands are printed
    return subprocess.run(["make", "-n", "-o", ".venv/.installed-stamp", target, *variables], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_help_lists_every_target_in_phony():
    phony = set(re.search(r"^\.PHONY:(.*?)(?<!\\)$", (ROOT / "Makefile").read_text(), re.M | re.S).group(1).replace("\\", " ").split())
    listed = targets()
    assert {"train", "test", "test-fast", "lint", "gpu-check", "sweep", "hparams", "ablation", "induction", "report"} <= set(listed)
    assert set(listed) <= phony, set(listed) - phony


@pytest.mark.parametrize("target", [t for t in targets() if t not in ("help",)])
def test_no_target_writes_to_a_path_starting_with_a_dash(target):
    proc = dry_run(target, *VARIABLES)
    assert proc.returncode == 0, proc.stderr
    for path in PATH_KEYS.findall(proc.stdout):
        assert not path.startswith(("-", "/-")), f"make {target}: {path}"
        # a timestamped directory below logs/<target>/
        if target in ("compare", "zoo", "sweep", "hparams", "ablation", "induction", "synthetic"):
            assert re.match(rf"logs/{target}/\d{{4}}-\d\d-\d\d_\d\d-\d\d-\d\d(/|$)", path), f"make {target}: {path}"


@pytest.mark.parametrize("target,variable", [("report", "SWEEP"), ("export", "CKPT"), ("export", "OUT"), ("import", "HF")])
def test_a_missing_make_variable_is_named(target, variable):
    given = [v for v in VARIABLES if not v.startswith(f"{variable}=")]
    proc = subprocess.run(["make", "-o", ".venv/.installed-stamp", target, *given], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert f"error: make {target} needs {variable}=" in proc.stderr, proc.stderr

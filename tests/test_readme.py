"""Every script answers -h, bad input ends in one line, exit 2, and default paths are anchored at the repository
(the documented commands are checked in test_docs.py)."""
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

SCRIPTS = ["convert_hf.py", "fetch.py", "train.py", "generate.py", "eval.py", "bench_train.py", "bench_generate.py",
           "data.py", "bench_data.py", "chat_data.py", "demo.py"]
SCRIPTS += ["export.py", "bench_export.py"]
SCRIPTS += ["ablate.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    r = subprocess.run([sys.executable, script, "-h"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "usage:" in r.stdout and "default" in r.stdout


@pytest.mark.parametrize("argv", [
    ["convert_hf.py", "/nonexistent/model"],
    ["train.py", "--exit-layers", "15", "--checkpoint", "/nonexistent"],
    ["generate.py", "--checkpoint", "/nonexistent"],
    ["eval.py", "--tasks", "arc_easy", "--checkpoint", "/nonexistent"],
    ["train.py", "--exit-layers", "15", "--seq-len", "0"],
    ["generate.py", "--top-p", "2"],
    ["chat_data.py", "--n-train", "0"],
    ["demo.py", "--exits", "15,x"],
])
def test_bad_input_is_one_line_exit_2(argv):
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]  # argparse's own errors print the usage first
    assert "Traceback" not in r.stderr and last.startswith(f"{argv[0]}: error: ")


@pytest.mark.parametrize("script", SCRIPTS)
def test_path_defaults_are_anchored_at_the_repository(script):
    # a relative default would be resolved against the working directory: scripts run from elsewhere would miss it
    # (tests/test_default_model.py also runs generate.py from another directory on the real model)
    parser = importlib.import_module(script.removesuffix(".py")).get_parser()
    paths = [a.default for a in parser._actions if isinstance(a.default, (str, Path)) and "/" in str(a.default)]
    assert all(Path(p).is_absolute() and Path(p).is_relative_to(ROOT) for p in paths), paths

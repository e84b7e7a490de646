"""Every script answers -h, bad input ends in one line, exit 2, and default paths are anchored at the repository
(the documented commands are checked in test_docs.py)."""
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_script

SCRIPTS = ["convert_hf.py", "fetch.py", "train.py", "generate.py", "eval.py", "bench_train.py", "bench_generate.py",
           "data.py", "bench_data.py", "chat_data.py", "demo.py"]
SCRIPTS += ["export.py", "bench_export.py"]
SCRIPTS += ["ablate.py", "quantize.py", "serve.py", "bench_serve.py", "gpu_check.py", "pretrain_table.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    code, out, _ = run_script(script, "-h")
    assert code == 0 and out.startswith(f"usage: {script}") and "default" in out
    # in-process above; as a script, the __main__ every script shares (one runs in a fresh interpreter below)
    assert re.search(r'\nif __name__ == "__main__":\n    run_cli\(main, \w', (ROOT / script).read_text())


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
    code, _, err = run_script(*argv)
    assert code == 2, err
    last = err.strip().splitlines()[-1]  # argparse's own errors print the usage first
    assert "Traceback" not in err and last.startswith(f"{argv[0]}: error: ")


def test_one_line_error_in_a_fresh_interpreter():
    # the tests above run scripts in-process; this one runs the whole path once: __main__, run_cli, exit code, stderr
    r = subprocess.run([sys.executable, "generate.py", "--checkpoint", "/nonexistent"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("generate.py: error: /nonexistent/config.json not found")


@pytest.mark.parametrize("script", SCRIPTS)
def test_path_defaults_are_anchored_at_the_repository(script):
    # a relative default would be resolved against the working directory: scripts run from elsewhere would miss it
    # (tests/test_default_model.py also runs generate.py from another directory on the real model)
    parser = importlib.import_module(script.removesuffix(".py")).get_parser()
    paths = [a.default for a in parser._actions if isinstance(a.default, (str, Path)) and "/" in str(a.default)]
    assert all(Path(p).is_absolute() and Path(p).is_relative_to(ROOT) for p in paths), paths

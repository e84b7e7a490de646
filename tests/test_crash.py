"""Crashes and Ctrl-C: a training run killed (SIGKILL) at random points loses at most the steps since its last saved
state and resumes to the very exits an uninterrupted run writes; files killed mid-write keep their previous complete
version; Ctrl-C stops training with its state saved and exit code 130, and any other script with 130 and no
traceback."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import CORPUS, ROOT, make_tiny_checkpoint, tiny_args
from safetensors.torch import load_file

import train
from balcony import BalconyModel
from model import Transformer

STEPS = 40


@pytest.fixture
def setup(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "tiny")
    (tmp_path / "data").mkdir()
    for i in range(3):
        (tmp_path / "data" / f"play{i}.txt").write_text(CORPUS[i * 100:] + CORPUS)
    return ckpt, tmp_path / "data"


def train_argv(tmp_path, ckpt, data, out, *extra):
    # a state after every step, so a kill lands before, during or after a save; no periodic evaluation
    return ["--exit-layers", "1,2", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(tmp_path / out),
            "--cache-dir", str(tmp_path / "cache"), "--seq-len", "32", "--batch-size", "2", "--eval-windows", "1",
            "--max-steps", str(STEPS), "--warmup-steps", "2", "--eval-every", "1000", "--save-every", "1", *extra]


def start_training(argv):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def logged_steps(log_path) -> list:
    lines = log_path.read_text().splitlines() if log_path.exists() else []
    return [json.loads(line)["step"] for line in lines if '"lr"' in line]


def wait_for_steps(proc, log_path, after: int, timeout=600):
    """Wait until the run has logged a training step past `after`; None if it ended first."""
    t0 = time.time()
    while not [s for s in logged_steps(log_path) if s > after]:
        if proc.poll() is not None:
            return None
        assert time.time() - t0 < timeout, "training logged no step"
        time.sleep(0.02)
    return max(logged_steps(log_path))


@pytest.mark.slow
def test_sigkill_loses_at_most_the_steps_since_the_last_state(setup, tmp_path):
    ckpt, data = setup
    assert train.main(train.parse_args(train_argv(tmp_path, ckpt, data, "ref.safetensors"))) == 0
    state, log = tmp_path / "run.state.pt", tmp_path / "run.log.jsonl"
    rng, resumed_from = random.Random(0), 0
    for attempt in range(3):  # run, kill, resume, kill, resume, kill; then resume to the end in-process
        proc = start_training(train_argv(tmp_path, ckpt, data, "run.safetensors", *["--resume"] * (attempt > 0)))
        # a random step among this attempt's ten (well before the end), then a random point inside a step: in the
        # update, in the log write, in the state write. Steps, not seconds: CI runs all 40 steps in half a second.
        target = rng.randrange(attempt * 10, attempt * 10 + 8)
        if wait_for_steps(proc, log, max(target, *logged_steps(log), 0)) is None:  # new progress, not old lines
            pytest.fail(f"training ended before it could be killed: {proc.communicate()[1][-2000:]}")
        time.sleep(rng.uniform(0, 0.02))
        proc.kill()
        proc.communicate()
        last = max(logged_steps(log))
        saved = torch.load(state, weights_only=True)["step"]
        assert last - 1 <= saved <= last and saved >= resumed_from  # at most the step in flight is lost
        resumed_from = saved
    assert train.main(train.parse_args(train_argv(tmp_path, ckpt, data, "run.safetensors", "--resume"))) == 0
    a, b = load_file(tmp_path / "ref.safetensors"), load_file(tmp_path / "run.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the uninterrupted run's exits


# A separate process writes the file over and over: forking pytest itself deadlocks once an earlier test has used
# torch's thread pool (OpenMP does not survive fork), so the writer is a fresh interpreter.
WRITER = """
import sys
from pathlib import Path

import torch
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
import train
from balcony import BalconyModel
from conftest import tiny_args
from model import Transformer
kind, path = sys.argv[2], Path(sys.argv[3])
torch.manual_seed(0)
bm = BalconyModel(Transformer(tiny_args(dim=256, hidden_dim=768, n_heads=4, n_kv_heads=4)), [1, 2, 3])
opt = torch.optim.AdamW(bm.exits.parameters())
for i in range(1, 10**6):
    with torch.no_grad():
        next(bm.exits.parameters()).fill_(i)  # each version differs
    if kind == "exits":
        bm.save_exits(path)
    else:
        train.save_state(path, bm, opt, i, "fingerprint", {})
    print(i, flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["exits", "state"])
def test_files_killed_mid_write_keep_their_previous_version(tmp_path, kind):
    # exits of ~10 MB, so that writing is most of each loop and most kills land inside a write. (torch.save writes in
    # many pieces: without the temp file and rename, this test fails. safetensors writes its buffer in one system
    # call, which SIGKILL does not split, so there only the rename protects against an error or power loss mid-write.)
    torch.manual_seed(0)  # the writer's model, so its exit files carry this model's fingerprint
    bm = BalconyModel(Transformer(tiny_args(dim=256, hidden_dim=768, n_heads=4, n_kv_heads=4)), [1, 2, 3])
    path = tmp_path / ("balcony.safetensors" if kind == "exits" else "b.state.pt")
    if kind == "exits":
        bm.save_exits(path)  # a first complete version
    else:
        train.save_state(path, bm, torch.optim.AdamW(bm.exits.parameters()), 0, "fingerprint", {})

    def check():  # both raise on a truncated or damaged file; a version > 0 shows the writer's file was read
        if kind == "exits":
            loaded = BalconyModel(bm.model, [1, 2, 3])
            loaded.load_exits(path)
            return next(loaded.exits.parameters()).flatten()[0].item()
        return torch.load(path, weights_only=True)["step"]

    rng = random.Random(1)
    for _ in range(4):  # SIGKILL the writer at a random moment after its first complete write
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(ROOT), kind, str(path)], stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout.readline().strip(), "the writer died before its first write"
        time.sleep(rng.uniform(0, 0.3))
        proc.kill()
        proc.communicate()
        assert check() > 0


def test_ctrl_c_saves_the_state_and_exits_130(setup, tmp_path):
    ckpt, data = setup
    log = tmp_path / "run.log.jsonl"
    proc = start_training(train_argv(tmp_path, ckpt, data, "run.safetensors"))
    assert wait_for_steps(proc, log, 0) is not None
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    saved = torch.load(tmp_path / "run.state.pt", weights_only=True)["step"]
    assert saved == max(logged_steps(log)) and f"stopped at step {saved}" in out  # the step in flight finished
    assert not (tmp_path / "run.safetensors").exists()  # no exits file for an unfinished run


def test_ctrl_c_in_generate_exits_130_without_traceback(tiny_ckpt, tmp_path):
    # 200 prompts one at a time (the tiny model decodes one in a fraction of a second): the first printed answer
    # says it is generating, and the Ctrl-C lands while the rest are still to come, however slow the signal
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("To be\n" * 200)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "generate.py"), "--checkpoint", str(tiny_ckpt),
                             "--max-new-tokens", "250", "--batch-size", "1", "--prompts", str(prompts)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            # a shell's background job ignores SIGINT, and Python keeps an ignored SIGINT ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout.read(1)  # generating
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 130 and b"Traceback" not in err, err.decode()[-2000:]

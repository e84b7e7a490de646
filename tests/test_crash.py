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


def test_sigkill_loses_at_most_the_steps_since_the_last_state(setup, tmp_path):
    ckpt, data = setup
    assert train.main(train.parse_args(train_argv(tmp_path, ckpt, data, "ref.safetensors"))) == 0
    state, log = tmp_path / "run.state.pt", tmp_path / "run.log.jsonl"
    rng, resumed_from = random.Random(0), 0
    for attempt in range(3):  # run, kill, resume, kill, resume, kill; then resume to the end in-process
        proc = start_training(train_argv(tmp_path, ckpt, data, "run.safetensors", *["--resume"] * (attempt > 0)))
        if wait_for_steps(proc, log, max(logged_steps(log), default=0)) is None:  # new progress, not old lines
            pytest.fail(f"training ended before it could be killed: {proc.communicate()[1][-2000:]}")
        time.sleep(rng.uniform(0, 0.3))  # a random point: in a step, in the log write, in the state write
        proc.kill()
        proc.communicate()
        last = max(logged_steps(log))
        saved = torch.load(state, weights_only=True)["step"]
        assert last - 1 <= saved <= last and saved >= resumed_from  # at most the step in flight is lost
        resumed_from = saved
    assert train.main(train.parse_args(train_argv(tmp_path, ckpt, data, "run.safetensors", "--resume"))) == 0
    a, b = load_file(tmp_path / "ref.safetensors"), load_file(tmp_path / "run.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the uninterrupted run's exits


def killed_while_writing(write, check, kills=6):
    """Fork a child that writes a file over and over; SIGKILL it at random moments; the file must stay complete.
    check() reads it back and returns the version found: children that wrote nothing would prove nothing."""
    rng, versions = random.Random(1), []
    for _ in range(kills):
        pid = os.fork()
        if pid == 0:  # the child: write forever, never return into pytest
            try:
                for i in range(1, 10**6):
                    write(i)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.1, 0.5))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        versions.append(check())
    assert sum(v > 0 for v in versions) >= kills // 2, versions


@pytest.mark.parametrize("kind", ["exits", "state"])
def test_files_killed_mid_write_keep_their_previous_version(tmp_path, kind):
    # exits of ~10 MB, so that writing is most of each loop and most kills land inside a write. (torch.save writes in
    # many pieces: without the temp file and rename, this test fails. safetensors writes its buffer in one system
    # call, which SIGKILL does not split, so there only the rename protects against an error or power loss mid-write.)
    torch.manual_seed(0)
    bm = BalconyModel(Transformer(tiny_args(dim=256, hidden_dim=768, n_heads=4, n_kv_heads=4)), [1, 2, 3])
    path = tmp_path / ("balcony.safetensors" if kind == "exits" else "b.state.pt")
    opt = torch.optim.AdamW(bm.exits.parameters())

    def write(i):
        with torch.no_grad():
            next(bm.exits.parameters()).fill_(i)  # each version differs
        if kind == "exits":
            bm.save_exits(path)
        else:
            train.save_state(path, bm, opt, i, "fingerprint", {})

    def check():  # both raise on a truncated or damaged file
        if kind == "exits":
            loaded = BalconyModel(bm.model, [1, 2, 3])
            loaded.load_exits(path)
            return next(loaded.exits.parameters()).flatten()[0].item()
        return torch.load(path, weights_only=True)["step"]

    write(0)  # a first complete version
    killed_while_writing(write, check)


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


def test_ctrl_c_in_generate_exits_130_without_traceback(tiny_ckpt):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "generate.py"), "--checkpoint", str(tiny_ckpt),
                             "--max-new-tokens", "250", "--prompt", "To be"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(1)  # generating
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 130 and b"Traceback" not in err, err.decode()[-2000:]

"""train.py on tiny random checkpoints: frozen backbone, exits-only optimiser, loss going down, exact resume,
2-process DDP == 1 process, one-line refusals."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import CORPUS, ROOT, make_tiny_checkpoint

import train
from balcony import BalconyModel
from model import Transformer


@pytest.fixture
def setup(tmp_path):
    """A tiny checkpoint and a small corpus of three .txt files and one .jsonl file."""
    ckpt = make_tiny_checkpoint(tmp_path / "tiny")
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        (data / f"play{i}.txt").write_text(CORPUS[i * 100:] + CORPUS)
    (data / "docs.jsonl").write_text("\n".join(json.dumps({"text": CORPUS[i * 40:i * 40 + 400]}) for i in range(30)))
    return ckpt, data


def argv(tmp_path, ckpt, data, out="balcony.safetensors", *extra):
    return ["--exit-layers", "1,2", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(tmp_path / out),
            "--cache-dir", str(tmp_path / "cache"), "--seq-len", "32", "--batch-size", "2", "--eval-windows", "4",
            "--max-steps", "6", "--warmup-steps", "2", *extra]


def read_exits(path):
    from safetensors.torch import load_file
    return load_file(str(path))


def test_backbone_untouched_and_only_exits_optimised(setup, tmp_path, monkeypatch):
    ckpt, data = setup
    models, optimisers = [], []

    class SpyBalcony(BalconyModel):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            models.append(self)

    class SpyAdamW(torch.optim.AdamW):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            optimisers.append(self)

    monkeypatch.setattr(train, "BalconyModel", SpyBalcony)
    monkeypatch.setattr(train.torch.optim, "AdamW", SpyAdamW)
    before = read_exits(ckpt / "model.safetensors")
    assert train.main(train.parse_args(argv(tmp_path, ckpt, data, "b.safetensors", "--loss", "kl+ce"))) == 0
    bm, opt = models[0], optimisers[0]
    backbone = bm.model.checkpoint_state_dict()
    assert set(backbone) == set(before)
    for name, t in before.items():
        assert torch.equal(backbone[name], t), name  # bit-identical after training
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    assert trained == {id(p) for p in bm.exits.parameters()}
    assert not trained & {id(p) for p in bm.model.parameters()}
    # and the exits did move away from their init (a copy of the last layer)
    assert not torch.equal(bm.exits["1"].layer.attention.wq.weight, bm.model.layers[-1].attention.wq.weight)


def test_loss_goes_down(setup, tmp_path):
    ckpt, data = setup
    args = argv(tmp_path, ckpt, data, "b.safetensors", "--init", "random", "--lr", "3e-3", "--max-steps", "30",
                "--eval-every", "30")
    assert train.main(train.parse_args(args)) == 0
    log = [json.loads(line) for line in (tmp_path / "b.log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "kl" in r]
    assert len(steps) == 30
    first, last = np.mean([r["kl"] for r in steps[:5]], axis=0), np.mean([r["kl"] for r in steps[-5:]], axis=0)
    assert (last < 0.5 * first).all(), (first, last)
    final = [r for r in log if r.get("eval") == "balcony"][-1]
    assert final["step"] == 30 and list(final["val_kl"]) == ["1", "2", "full"] and final["val_kl"]["full"] < 1e-5


def test_resume_continues_exactly(setup, tmp_path):
    ckpt, data = setup
    # an uninterrupted run of 6 steps leaves its step-3 state behind (no state is written at the last step)
    extra = ("--grad-accum", "2", "--save-every", "3", "--eval-every", "100")
    assert train.main(train.parse_args(argv(tmp_path, ckpt, data, "a.safetensors", *extra))) == 0
    assert torch.load(tmp_path / "a.state.pt", weights_only=True)["step"] == 3
    shutil.copy(tmp_path / "a.state.pt", tmp_path / "b.state.pt")
    assert train.main(train.parse_args(argv(tmp_path, ckpt, data, "b.safetensors", *extra, "--resume"))) == 0
    a, b = read_exits(tmp_path / "a.safetensors"), read_exits(tmp_path / "b.safetensors")
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_two_process_ddp_matches_one_process(setup, tmp_path):
    ckpt, data = setup
    common = ("--max-steps", "3", "--eval-every", "100", "--save-every", "100")
    one = argv(tmp_path, ckpt, data, "one.safetensors", *common, "--grad-accum", "2")  # global batch 2 * 2 * 1
    assert train.main(train.parse_args(one)) == 0
    two = argv(tmp_path, ckpt, data, "two.safetensors", *common)  # global batch 2 * 1 * 2
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(ROOT / "train.py"), *two], capture_output=True, text=True, cwd=ROOT, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = read_exits(tmp_path / "one.safetensors"), read_exits(tmp_path / "two.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    init = BalconyModel(Transformer.from_checkpoint(ckpt), [1, 2]).exits.state_dict()
    assert not torch.equal(a["exits.1.layer.feed_forward.w1.weight"], init["1.layer.feed_forward.w1.weight"])


def test_bad_state_is_refused_in_one_line(setup, tmp_path):
    ckpt, data = setup
    base = argv(tmp_path, ckpt, data, "b.safetensors", "--max-steps", "4", "--save-every", "2", "--eval-every", "100")
    assert train.main(train.parse_args(base)) == 0
    other_model = str(make_tiny_checkpoint(tmp_path / "other", seed=1))
    cases = {"another base model": ["--checkpoint", other_model], "not --exit-layers [1, 3]": ["--exit-layers", "1,3"],
             "lr 0.001 -> 0.002": ["--lr", "2e-3"], "not a readable training state": []}
    for expected, change in cases.items():
        if not change:  # last: damage the file
            state = tmp_path / "b.state.pt"
            state.write_bytes(state.read_bytes()[:200])
        args = argv(tmp_path, ckpt, data, "b.safetensors", "--max-steps", "4", "--resume", *change)  # later flags win
        r = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        lines = [line for line in r.stderr.splitlines() if line.startswith("train.py: error:")]
        assert len(lines) == 1 and "b.state.pt" in lines[0] and expected in lines[0], r.stderr


def test_lr_schedule():
    lrs = [train.get_lr(s, 5e-4, 10, 100) for s in range(101)]
    assert lrs[0] < lrs[5] < lrs[9] <= 5e-4
    assert max(lrs) == pytest.approx(5e-4, rel=0.01)
    assert lrs[100] == pytest.approx(5e-5)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))

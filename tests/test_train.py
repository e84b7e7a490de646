"""train.py on tiny random checkpoints: frozen backbone, exits-only optimiser, loss going down, exact resume,
2-process DDP == 1 process, one-line refusals."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import CORPUS, ROOT, make_tiny_checkpoint, run_script, tiny_args

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


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_backbone_untouched_and_only_exits_optimised(setup, tmp_path, monkeypatch, dtype):
    """--dtype bfloat16: the backbone is stored in bf16 (cast once), the exits and AdamW's state stay fp32."""
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
    args = argv(tmp_path, ckpt, data, "b.safetensors", "--loss", "kl+ce", "--dtype", dtype)
    assert train.main(train.parse_args(args)) == 0
    bm, opt = models[0], optimisers[0]
    backbone = bm.model.checkpoint_state_dict()
    assert set(backbone) == set(before)
    for name, t in before.items():
        assert torch.equal(backbone[name], t.to(getattr(torch, dtype))), name  # bit-identical after training
    assert all(p.dtype == torch.float32 for p in bm.exits.parameters())
    assert all(v.dtype == torch.float32 for st in opt.state.values() for k, v in st.items() if k != "step")
    assert all(t.dtype == torch.float32 for t in read_exits(tmp_path / "b.safetensors").values())
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    assert trained == {id(p) for p in bm.exits.parameters()}
    assert not trained & {id(p) for p in bm.model.parameters()}
    # and the exits did move away from their init (a copy of the last layer)
    assert not torch.equal(bm.exits["1"].layer.attention.wq.weight, bm.model.layers[-1].attention.wq.weight)


@pytest.mark.slow
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


def log_steps(path):
    log = [json.loads(line) for line in path.read_text().splitlines()]
    return [r["step"] for r in log if "kl" in r], [r["step"] for r in log if r.get("eval") == "no_balcony"]


def assert_same_exits(a_path, b_path):
    a, b = read_exits(a_path), read_exits(b_path)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_interrupted_run_resumes_exactly(setup, tmp_path, monkeypatch):
    ckpt, data = setup
    extra = ("--grad-accum", "2", "--eval-every", "100")
    assert train.main(train.parse_args(argv(tmp_path, ckpt, data, "a.safetensors", *extra))) == 0
    # b: as if Ctrl-C came during step 3; the loop saves the state after that step and stops
    stops = iter([False, False, True])
    monkeypatch.setattr(train, "stop_requested", lambda ddp, device: next(stops))
    assert train.main(train.parse_args(argv(tmp_path, ckpt, data, "b.safetensors", *extra))) == 130
    monkeypatch.undo()
    assert torch.load(tmp_path / "b.state.pt", weights_only=True)["step"] == 3
    with open(tmp_path / "b.log.jsonl", "a") as f:  # a line logged after the save (a crash) is dropped on resume
        f.write(json.dumps({"step": 4, "kl": [9.0, 9.0]}) + "\n")
    assert train.main(train.parse_args(argv(tmp_path, ckpt, data, "b.safetensors", *extra, "--resume"))) == 0
    assert_same_exits(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert log_steps(tmp_path / "b.log.jsonl") == log_steps(tmp_path / "a.log.jsonl") == ([1, 2, 3, 4, 5, 6], [0])


def test_finished_run_resumes_with_more_steps(setup, tmp_path, monkeypatch):
    """A finished 4-step run, resumed with --max-steps 6, continues exactly: its exits equal, bit for bit, those of
    one uninterrupted 6-step run whose learning rate follows the 4-step schedule for steps 0..3 and the 6-step one
    from step 4 (the schedule switches at the resume, as the README says); the state (exits, AdamW moments, data
    position, RNG) carries over unchanged."""
    ckpt, data = setup
    extra = ("--eval-every", "100", "--warmup-steps", "1")
    assert train.main(train.parse_args(argv(tmp_path, ckpt, data, "b.safetensors", *extra, "--max-steps", "4"))) == 0
    assert torch.load(tmp_path / "b.state.pt", weights_only=True)["step"] == 4
    # killed after the last state but before the exits were written: resuming at the same --max-steps writes them
    written = read_exits(tmp_path / "b.safetensors")
    (tmp_path / "b.safetensors").unlink()
    assert train.main(train.parse_args(argv(tmp_path, ckpt, data, "b.safetensors", *extra, "--max-steps", "4",
                                            "--resume"))) == 0
    assert all(torch.equal(t, read_exits(tmp_path / "b.safetensors")[k]) for k, t in written.items())
    resumed = argv(tmp_path, ckpt, data, "b.safetensors", *extra, "--max-steps", "6", "--resume")
    assert train.main(train.parse_args(resumed)) == 0

    get_lr = train.get_lr
    monkeypatch.setattr(train, "get_lr", lambda s, lr, w, n: get_lr(s, lr, w, 4 if s < 4 else n))
    assert train.main(train.parse_args(argv(tmp_path, ckpt, data, "a.safetensors", *extra, "--max-steps", "6"))) == 0
    assert_same_exits(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert log_steps(tmp_path / "b.log.jsonl") == ([1, 2, 3, 4, 5, 6], [0])
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "b.log.jsonl").read_text().splitlines()) if "lr" in r]
    assert lrs == [get_lr(s, train.get_parser().get_default("lr"), 1, 4 if s < 4 else 6) for s in range(6)]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_process_and_resume(setup, tmp_path, mode):
    """2 processes (gloo, CPU) with batch 2 each against 1 process accumulating two batches of 2: the same global
    batch, so the same exits. Each trains 2 steps, then resumes to 3: resuming works under DDP and FSDP too."""
    ckpt, data = setup
    common = ("--eval-every", "100", "--save-every", "100")
    for steps, resume in (("2", ()), ("3", ("--resume",))):
        one = argv(tmp_path, ckpt, data, "one.safetensors", *common, "--grad-accum", "2", "--max-steps", steps, *resume)
        assert train.main(train.parse_args(one)) == 0
        two = argv(tmp_path, ckpt, data, "two.safetensors", *common, "--max-steps", steps, *resume,
                   *(["--fsdp"] if mode == "fsdp" else []))
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            str(ROOT / "train.py"), *two], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = read_exits(tmp_path / "one.safetensors"), read_exits(tmp_path / "two.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    init = BalconyModel(Transformer.from_checkpoint(ckpt), [1, 2]).exits.state_dict()
    assert not torch.equal(a["exits.1.layer.feed_forward.w1.weight"], init["1.layer.feed_forward.w1.weight"])


def _ddp_worker(rank, init_file, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(rank)  # a different backbone on each rank
    model = Transformer(tiny_args())
    torch.manual_seed(0)  # the same exits
    bm = BalconyModel(model, [1, 2], init="random")
    before = {k: v.clone() for k, v in bm.model.state_dict().items()}
    wrapped = train.wrap_ddp(train.ExitLoss(bm, 16, 0.0), torch.device("cpu"))
    x = torch.randint(0, 320, (2, 8))
    wrapped(x, x)[0].backward()
    results[rank] = (all(torch.equal(v, bm.model.state_dict()[k]) for k, v in before.items()),
                     {k: p.grad.clone() for k, p in bm.exits.named_parameters()})
    dist.destroy_process_group()


def test_ddp_sends_no_backbone_and_averages_exit_gradients(tmp_path):
    """DDP normally broadcasts rank 0's parameters and buffers at start-up; wrap_ddp leaves the frozen backbone out:
    a rank whose backbone differs keeps its own, while the exits' gradients are still averaged."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), results), nprocs=2)
    assert results[0][0] and results[1][0]  # each rank's backbone is its own
    for k, g in results[0][1].items():
        torch.testing.assert_close(g, results[1][1][k])


@pytest.mark.slow
def test_bad_state_is_refused_in_one_line(setup, tmp_path):
    ckpt, data = setup
    base = argv(tmp_path, ckpt, data, "b.safetensors", "--max-steps", "4", "--save-every", "2", "--eval-every", "100")
    assert train.main(train.parse_args(base)) == 0
    other_model = str(make_tiny_checkpoint(tmp_path / "other", seed=1))
    cases = {"another base model": ["--checkpoint", other_model], "not --exit-layers [1, 3]": ["--exit-layers", "1,3"],
             "lr 0.001 -> 0.002": ["--lr", "2e-3"], "at step 4, past --max-steps 3": ["--max-steps", "3"],
             "not a readable training state": []}
    for expected, change in cases.items():
        if not change:  # last: damage the file
            state = tmp_path / "b.state.pt"
            state.write_bytes(state.read_bytes()[:200])
        args = argv(tmp_path, ckpt, data, "b.safetensors", "--max-steps", "4", "--resume", *change)  # later flags win
        code, _, err = run_script("train.py", *args)
        lines = [line for line in err.splitlines() if line.startswith("train.py: error:")]
        assert code == 2 and len(lines) == 1 and "b.state.pt" in lines[0] and expected in lines[0], err


def test_lr_schedule():
    lrs = [train.get_lr(s, 5e-4, 10, 100) for s in range(101)]
    assert lrs[0] < lrs[5] < lrs[9] <= 5e-4
    assert max(lrs) == pytest.approx(5e-4, rel=0.01)
    assert lrs[100] == pytest.approx(5e-5)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_bench_authors_formulation_is_the_same_objective():
    """bench_train.py's peer: the transformers model with all hidden states and F.kl_div per exit gives ExitLoss's
    value and the same exit gradients (compared by norm: the two hold their exits under different names)."""
    import bench_train

    torch.manual_seed(0)
    model = Transformer(tiny_args()).requires_grad_(False)  # fp32: the authors' loss casts logits with .float()
    x = torch.randint(0, 320, (2, 12))
    bm = BalconyModel(model, [1, 2])
    ours = train.ExitLoss(bm, 5, 0.0)(x, x)[0]
    ours.backward()
    authors = bench_train.AuthorsLoss(bench_train.hf_model(model), [1, 2])
    theirs = authors(x)
    theirs.backward()
    assert ours > 1e-3
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=0)
    norms = lambda ps: sorted(p.grad.norm().item() for p in ps if p.grad is not None)  # noqa: E731
    torch.testing.assert_close(norms(authors.parameters()), norms(bm.exits.parameters()), rtol=1e-4, atol=0)


def test_bench_floor_does_the_counted_matrix_products():
    """bench_train.py's floor step does exactly the FLOPs flops_per_token counts, less attention's (which it skips):
    a floor that missed a product would flatter every formulation."""
    import bench_train
    from torch.utils.flop_counter import FlopCounterMode

    a, n_exits, batch, seq = tiny_args(), 2, 2, 12
    step = bench_train.matmul_floor(Transformer(a).requires_grad_(False), n_exits, batch * seq)
    with FlopCounterMode(display=False) as counter:
        step()
    attention = 4 * seq * a.n_heads * a.head_dim * (a.n_layers + 3 * n_exits)
    assert counter.get_total_flops() == batch * seq * (bench_train.flops_per_token(a, n_exits, seq) - attention)


def val_metrics(log):
    return [{k: v for k, v in r.items() if k.startswith("val_")} for r in map(json.loads, log.read_text().splitlines())
            if "eval" in r]


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_fsdp_validation_with_uneven_batches_matches_one_process(setup, tmp_path, nproc):
    """6 validation windows in batches of 2 are 3 batches: 2 ranks get 2 and 1 (FSDP's all-gathers went out of step
    and the run hung). The short rank pads with an uncounted forward: the metrics are the single process's. One
    torchrun process with --fsdp is accepted."""
    ckpt, data = setup
    common = ("--eval-windows", "6", "--eval-every", "1", "--max-steps", "1")
    one = argv(tmp_path, ckpt, data, "one.safetensors", *common, "--grad-accum", "2")
    assert train.main(train.parse_args(one)) == 0
    two = argv(tmp_path, ckpt, data, "two.safetensors", *common, "--fsdp", "--grad-accum", str(3 - nproc))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                        str(ROOT / "train.py"), *two], capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = val_metrics(tmp_path / "one.log.jsonl"), val_metrics(tmp_path / "two.log.jsonl")
    assert len(one) == len(two) == 2  # before training (no balcony) and after the step
    for a, b in zip(one, two):
        for key in a:
            for exit in a[key]:
                assert a[key][exit] == pytest.approx(b[key][exit], rel=1e-5, abs=1e-6), (key, exit)


def test_compile_wraps_ddp_not_the_reverse(tmp_path):
    # PyTorch's DDP notes: wrap in DDP, then compile, so dynamo splits the graph at DDP's gradient buckets and the
    # all-reduces overlap the backward; train.py compiled first and wrapped the compiled module
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        bm = BalconyModel(Transformer(tiny_args()), [1, 2])
        wrapped = train.wrap_loss(train.ExitLoss(bm, 16), torch.device("cpu"), ddp=True, compile=True)
        assert isinstance(wrapped, torch._dynamo.eval_frame.OptimizedModule) and isinstance(wrapped._orig_mod, DDP)
        with wrapped.no_sync():  # train.py's accumulation steps reach DDP through the compiled wrapper
            pass
    finally:
        dist.destroy_process_group()

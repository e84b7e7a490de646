"""Table 4's modes on tiny random models: --loss ce is the mean cross-entropy over submodels (against a plain
per-submodel F.cross_entropy), --from-scratch trains every weight, writes a checkpoint folder that generate.py and
export.py take, and resumes exactly; --balcony none exits are the final norm and head of layer k's state, exactly;
bad combinations stop with one line; pretrain_table.py runs the table end to end."""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, TINY, make_tiny_checkpoint, tiny_args
from safetensors.torch import load_file, save_file
from test_train import argv, setup  # noqa: F401  (setup: the fixture, a tiny checkpoint and a small corpus)

import pretrain_table
import train
from balcony import BalconyModel
from cli import UsageError
from export import exit_as_llama
from generate import generate
from model import Transformer
from tokenizer import Tokenizer

PROMPT = [5, 17, 33, 100, 7, 250, 12]
SHAPE = {k: v for k, v in TINY.items() if k != "vocab_size"}  # a --from-scratch preset: the vocabulary is the tokenizer's


@pytest.fixture(autouse=True)
def tiny_preset(monkeypatch):
    monkeypatch.setitem(train.SCRATCH_PRESETS, "test", SHAPE)
    n = torch.get_num_threads()  # tiny models gain nothing from threads on a busy machine
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_norms(model: Transformer, seed=3):
    """Norm weights away from ones, so that a missing or swapped norm shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
    return model


def per_submodel_ce(bm: BalconyModel, x, y):
    """The plain formula: each submodel's logits in full, F.cross_entropy against the next tokens, then the mean over
    the exits and full depth (the base model's own forward)."""
    m, (cos, sin) = bm.model, bm.model.rope(x.size(1))
    h, ces = m.tok_embeddings(x), []
    for i, layer in enumerate(m.layers, 1):
        h = layer(h, cos, sin)
        if i in bm.exit_layers:
            ex = bm.exits[str(i)]
            out = m.norm(h) if bm.kind == "none" else ex.norm(ex.layer(h, cos, sin))
            ces.append(F.cross_entropy(m.output(out).flatten(0, 1), y.flatten()))
    ces.append(F.cross_entropy(m(x).flatten(0, 1), y.flatten()))
    return torch.stack(ces).mean()


@pytest.mark.parametrize("kind", ["block", "none"])
def test_submodel_loss_is_the_mean_ce_over_exits_and_full_depth(kind):
    torch.manual_seed(0)
    bm = BalconyModel(random_norms(Transformer(tiny_args())), [1, 3], init="random", kind=kind, train_backbone=True)
    bm.requires_grad_(True)
    x, y = torch.randint(0, 320, (2, 19)), torch.randint(0, 320, (2, 19))
    loss, kl, ce = train.SubmodelLoss(bm, 7)(x, y)  # chunks of 7 tokens: 38 is no multiple, the last is short
    loss.backward()
    grads = {n: p.grad.clone() for n, p in bm.named_parameters()}
    bm.zero_grad()
    ref = per_submodel_ce(bm, x, y)
    ref.backward()
    assert kl is None and ce.shape == (3,)
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ce.mean(), ref.detach(), atol=1e-6, rtol=1e-6)
    for n, p in bm.named_parameters():  # every weight learns, the last layer and final norm included
        assert p.grad.abs().max() > 0, n
        torch.testing.assert_close(grads[n], p.grad, atol=1e-6, rtol=1e-5)


def test_balcony_none_exit_is_exactly_the_final_norm_and_head_of_layer_k(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "tiny")
    model = random_norms(Transformer.from_checkpoint(ckpt))
    save_file({k: v.contiguous() for k, v in model.checkpoint_state_dict().items()}, ckpt / "model.safetensors")
    bm = BalconyModel(model, [1, 2], kind="none").eval()
    assert not list(bm.exits.parameters()) and not bm.exits.state_dict()  # no weights of its own
    states = []
    for layer in model.layers:
        layer.register_forward_hook(lambda mod, i, o: states.append(o))
    idx = torch.randint(0, 320, (2, 11))
    with torch.no_grad():
        model(idx)
        for k in (1, 2):
            assert torch.equal(bm(idx, exit=k), model.output(model.norm(states[k - 1])))
        # export: layers 1..k, the final norm and the head, as a plain Llama
        args, sd = exit_as_llama(bm, 2)
        plain = Transformer(args)
        plain.load_state_dict(sd, strict=False)
        assert args.n_layers == 2 and torch.equal(plain(idx), bm(idx, exit=2))
    # the exits file round-trips with its kind, and decoding with a cache equals uncached greedy, batched or not
    bm.save_exits(tmp_path / "tiny" / "balcony.safetensors")
    loaded = BalconyModel.from_checkpoint(ckpt, None, (2,))
    assert loaded.kind == "none" and loaded.exit_layers == [1, 2]
    seq = list(PROMPT)
    with torch.no_grad():
        for _ in range(6):
            seq.append(int(loaded(torch.tensor([seq]), exit=2)[0, -1].argmax()))
    assert generate(loaded, [PROMPT], 6, exit=2)[0]["tokens"] == seq[len(PROMPT):]
    prompts, exits, n_new = [PROMPT, PROMPT[:4], PROMPT[2:]], [2, 1, None], [6, 3, 5]  # rows finish apart
    alone = [generate(loaded, [p], n, exit=e)[0]["tokens"] for p, e, n in zip(prompts, exits, n_new)]
    assert [r["tokens"] for r in generate(loaded, prompts, n_new, exit=exits)] == alone


def test_from_scratch_trains_every_weight_and_writes_a_checkpoint(setup, tmp_path, monkeypatch):
    ckpt, data = setup
    start, optimised = {}, []

    class SpyBalcony(BalconyModel):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            start.update({n: p.detach().clone() for n, p in self.named_parameters()})

    class SpyAdamW(torch.optim.AdamW):
        def __init__(self, params, *a, **k):
            params = list(params)
            optimised.append({id(p) for p in params})
            super().__init__(params, *a, **k)

    monkeypatch.setattr(train, "BalconyModel", SpyBalcony)
    monkeypatch.setattr(train.torch.optim, "AdamW", SpyAdamW)
    out = tmp_path / "scratch"
    assert train.main(train.parse_args(argv(tmp_path, ckpt, data, "scratch", "--from-scratch", "test"))) == 0
    assert len(start) == len(optimised[0])  # every parameter is optimised
    trained = {**{f"model.{k}": v for k, v in load_file(out / "model.safetensors").items()},
               **load_file(out / "balcony.safetensors")}
    assert set(start) == set(trained)  # the tied head is the embedding
    for n, p in start.items():  # every weight moved, norms and the last layer included
        assert not torch.equal(p, trained[n]), n
    args = json.loads((out / "config.json").read_text())
    assert args["vocab_size"] == Tokenizer.from_checkpoint(ckpt).vocab_size and args["n_layers"] == TINY["n_layers"]
    assert (out / "tokenizer.json").read_bytes() == (ckpt / "tokenizer.json").read_bytes()
    log = [json.loads(line) for line in (out / "balcony.log.jsonl").read_text().splitlines()]
    assert [len(r["ce"]) for r in log if "ce" in r] == [3] * 6  # exits 1, 2 and full depth, each step
    # generate.py and export.py take the folder as it is
    bm = BalconyModel.from_checkpoint(out, None, (1,))
    assert bm.kind == "block" and bm.exit_layers == [1, 2]
    assert len(generate(bm, [PROMPT], 4, exit=1)[0]["tokens"]) == 4


def test_from_scratch_resumes_exactly(setup, tmp_path, monkeypatch):
    ckpt, data = setup
    extra = ("--from-scratch", "test", "--balcony", "none", "--eval-every", "100")
    assert train.main(train.parse_args(argv(tmp_path, ckpt, data, "a", *extra))) == 0
    stops = iter([False, False, True])  # Ctrl-C during step 3
    with monkeypatch.context() as m:
        m.setattr(train, "stop_requested", lambda ddp, device: next(stops))
        assert train.main(train.parse_args(argv(tmp_path, ckpt, data, "b", *extra))) == 130
    assert train.main(train.parse_args(argv(tmp_path, ckpt, data, "b", *extra, "--resume"))) == 0
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


BAD = [
    (["--from-scratch", "huge"], "unknown --from-scratch preset 'huge'; known: tiny-16, llm-1b, test"),
    (["--from-scratch", "test", "--train-backbone"], "already trains every weight; drop --train-backbone"),
    (["--from-scratch", "test", "--loss", "kl"], "no trained full model to distil from"),
    (["--from-scratch", "test", "--init", "last"], "balconies start random"),
    (["--balcony", "none"], "on a frozen backbone nothing would train"),
    (["--loss", "ce"], "trains every weight: add --train-backbone or --from-scratch"),
    (["--tokenizer", "x"], "chooses a new model's vocabulary"),
    (["--exit-layers", "none"], "leaves no exit to train"),
    (["--kl-weight", "0"], "leaves nothing to train"),
]


@pytest.mark.parametrize("extra,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_combinations_stop_with_one_line(setup, tmp_path, extra, message):
    ckpt, data = setup
    with pytest.raises(UsageError, match=message):
        train.main(train.parse_args(argv(tmp_path, ckpt, data, "x", *extra)))


def test_from_scratch_needs_a_new_folder(setup, tmp_path):
    ckpt, data = setup
    with pytest.raises(UsageError, match="--from-scratch changes the model"):
        train.main(train.parse_args(argv(tmp_path, ckpt, data, "x", "--from-scratch", "test", "--out", str(ckpt))))


def test_cli_says_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--from-scratch", "huge", "--exit-layers", "4",
                        "--out", str(tmp_path / "x")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == ["train.py: error: unknown --from-scratch preset 'huge'; known: tiny-16, "
                                             "llm-1b"]


def test_pretrain_table_end_to_end(setup, tmp_path, monkeypatch, capsys):
    """Seven runs at two steps each on a 16-layer model of width 32: Table 4's rows, and the frozen Balcony run's full
    depth is the plain model, exactly; the Sorted fine-tuned one's is not."""
    ckpt, data = setup
    monkeypatch.setitem(train.SCRATCH_PRESETS, "test", dict(SHAPE, dim=32, n_layers=16, n_heads=2, n_kv_heads=1,
                                                            hidden_dim=64))
    args = ["--preset", "test", "--vocab-size", "0", "--checkpoint", str(ckpt), "--data", str(data), "--max-steps",
            "2", "--tune-steps", "2", "--seq-len", "16", "--batch-size", "2", "--eval-windows", "2", "--cache-dir",
            str(tmp_path / "cache"), "--out", str(tmp_path / "t4")]
    assert pretrain_table.main(pretrain_table.parse_args(args)) is None
    table = (tmp_path / "t4" / "table.md").read_text()
    rows = [line.split(" | ")[:2] for line in table.splitlines() if line.startswith("| pretraining") or
            line.startswith("| standard")]
    sizes = ["XL", "L", "M", "S"]
    assert [r[1] for r in rows] == ["plain (baseline)"] + [f"{m}-{s}" for s in sizes for m in ("Balcony", "Sorted")] \
        + [f"{m}-{s}{u}" for s in sizes for m, u in (("Balcony", ""), ("Sorted", ""), ("Balcony", " (unfrozen)"),
                                                       ("plain", ", no exit training"))] \
        + ["plain trained on the tuning tokens too (control)"]
    res = json.loads((tmp_path / "t4" / "results.json").read_text())
    assert res["balcony"]["16"] == res["plain"]["16"] == res["untrained"]["16"] != res["sorted"]["16"]
    assert res["plain-tuned"]["16"] != res["plain"]["16"]
    assert res["balcony-pre"]["12"][0] - res["sorted-pre"]["12"][0] == sum(  # one decoder block and its norm more
        p.numel() for p in Transformer(tiny_args(**train.SCRATCH_PRESETS["test"])).layers[0].parameters())
    assert table in capsys.readouterr().out
    with pytest.raises(UsageError, match="holds runs trained with"):  # another budget in the same folder
        pretrain_table.main(pretrain_table.parse_args([*args, "--max-steps", "3"]))


def test_tokenizer_trained_on_the_training_files_alone(tmp_path):
    plays = tmp_path / "plays"
    plays.mkdir()
    (plays / "hamlet_gut.txt").write_text("Zyxwvut qqq " * 50)  # held out: its words must not become tokens
    (plays / "lear_gut.txt").write_text("To be, or not to be, that is the question. " * 50)
    files = sorted(plays.iterdir())
    tok = Tokenizer.from_checkpoint(pretrain_table.train_tokenizer(files, 300, tmp_path / "tok"))
    text = "To be, or not to be: Zyxwvut!"
    assert tok.decode(tok.encode(text)) == text and 257 < tok.vocab_size <= 300  # merges stop when pairs run out
    assert len(tok.encode(" question")) == 1 and len(tok.encode(" Zyxwvut")) > 3
    with pytest.raises(UsageError, match="--vocab-size 0"):
        pretrain_table.train_tokenizer([tmp_path / "docs.jsonl"], 300, tmp_path / "tok2")


def test_llm_1b_preset_has_table_4s_parameter_counts():
    """The GPU preset is the paper's LLM-1B: its submodels' non-embedding sizes are Table 4's #Params column
    (973M full; Balcony 790M / 547M / 304M, Sorted 729M / 486M / 243M at layers 12, 8, 4)."""
    with torch.device("meta"):
        model = train.scratch_model("llm-1b", 49152)
        counts = {kind: pretrain_table.submodel_params(BalconyModel(model, [4, 8, 12], init="random", kind=kind))
                  for kind in ("block", "none")}
    millions = {kind: {k: n // 10**6 for k, n in c.items()} for kind, c in counts.items()}  # the paper truncates
    assert millions == {"block": {4: 304, 8: 547, 12: 790, 16: 973}, "none": {4: 243, 8: 486, 12: 729, 16: 973}}

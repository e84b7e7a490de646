"""Section 4.3's ablations on tiny random models: each balcony kind (train.py --balcony) has the parameters and runs
exactly the modules it should, starts from the matching parts of the last layer, decodes with a cache and drafts for
speculative decoding; exit files record the kind and refuse a mismatch; --kl-weight scales the KL term;
--train-backbone moves the backbone (up to the last exit) and writes a checkpoint folder, the default moves nothing."""
import json

import pytest
import torch
from conftest import make_tiny_checkpoint, tiny_args
from safetensors.torch import load_file, save_file
from test_train import setup  # noqa: F401  (the fixture: a tiny checkpoint and a small corpus)

import train
from balcony import KINDS, BalconyModel
from cli import UsageError
from generate import generate
from model import Transformer
from tokenizer import Tokenizer

PROMPT = [5, 17, 33, 100, 7, 250, 12]
ATTN = {"layer.attention", "layer.attention_norm", *(f"layer.attention.{w}" for w in ("wq", "wk", "wv", "wo"))}
MLP = {"layer.feed_forward", "layer.ffn_norm", *(f"layer.feed_forward.{w}" for w in ("w1", "w2", "w3"))}
MODULES = {"block": ATTN | MLP, "mlp": MLP, "attn": ATTN}  # besides the exit itself, its layer and its norm


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()  # tiny models gain nothing from threads on a busy machine
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_balcony(kind, exits=(1, 2), seed=0, noise=0.05) -> BalconyModel:
    torch.manual_seed(seed)
    bm = BalconyModel(Transformer(tiny_args()), exits, kind=kind)
    with torch.no_grad():  # copies of the last layer's parts would agree with each other; make the exits differ
        for p in bm.exits.parameters():
            p.add_(noise * torch.randn_like(p))
    return bm.eval()


@pytest.mark.parametrize("kind", KINDS)
def test_parameter_count_and_exactly_the_expected_modules_run(kind):
    a = tiny_args()
    attn = 2 * a.dim * a.n_heads * a.head_dim + 2 * a.dim * a.n_kv_heads * a.head_dim + a.dim  # wq wo, wk wv, norm
    mlp = 3 * a.dim * a.hidden_dim + a.dim  # w1 w2 w3, norm
    bm = tiny_balcony(kind, exits=(1, 3))
    expected = {"block": attn + mlp, "mlp": mlp, "attn": attn}[kind] + a.dim  # + the exit norm
    assert all(sum(p.numel() for p in ex.parameters()) == expected for ex in bm.exits.values())

    ran = []
    for i, layer in enumerate(bm.model.layers):
        layer.register_forward_hook(lambda m, i_, o, i=i: ran.append(f"backbone.{i}"))
    for k, ex in bm.exits.items():
        for name, m in ex.named_modules():
            m.register_forward_hook(lambda m, i_, o, name=f"exit{k}.{name}".rstrip("."): ran.append(name))
    names = {"exit3", "exit3.layer", "exit3.norm", *(f"exit3.{n}" for n in MODULES[kind])}
    assert {f"exit3.{n}".rstrip(".") for n, _ in bm.exits["3"].named_modules()} == names  # nothing else exists
    with torch.no_grad():
        bm(torch.randint(0, 320, (1, 8)), exit=3)
    assert sorted(ran) == sorted([f"backbone.{i}" for i in range(3)] + list(names))  # each once, exit 1 never


@pytest.mark.parametrize("kind", KINDS)
def test_initialised_from_the_matching_parts_of_the_last_layer(kind):
    torch.manual_seed(0)
    model = Transformer(tiny_args())
    bm, last = BalconyModel(model, [2], kind=kind), model.layers[-1]
    x = torch.randn(2, 8, model.args.dim)
    cos, sin = model.rope(8)
    with torch.no_grad():
        ref = {"block": lambda: last(x, cos, sin),
               "mlp": lambda: x + last.feed_forward(last.ffn_norm(x)),
               "attn": lambda: x + last.attention(last.attention_norm(x), cos, sin)}[kind]()
        torch.testing.assert_close(bm.exit_hidden(2, x), model.norm(ref), atol=1e-6, rtol=1e-6)
    random = BalconyModel(model, [2], init="random", kind=kind).exits["2"].layer.state_dict()
    assert not any(torch.equal(t, last.state_dict()[name]) for name, t in random.items() if "norm" not in name)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_decodes_with_a_cache_and_drafts_speculatively(kind):
    bm = tiny_balcony(kind)
    seq = list(PROMPT)
    with torch.no_grad():  # greedy by uncached forwards at exit 2
        for _ in range(8):
            seq.append(int(bm(torch.tensor([seq]), exit=2)[0, -1].argmax()))
    assert generate(bm, [PROMPT], 8, exit=2)[0]["tokens"] == seq[len(PROMPT):]
    if kind == "mlp":  # no attention, so no cache
        assert not any(hasattr(ex.layer, "attention") for ex in bm.exits.values())
    else:  # a cache for the exit that ran, none for the other
        assert bm.exits["2"].layer.attention.kv_cache is not None and bm.exits["1"].layer.attention.kv_cache is None
    # a batch with a row per exit, stopping at different lengths (finished rows leave the caches), as rows alone
    prompts, exits, n_new = [PROMPT, PROMPT[:4], PROMPT[2:]], [2, 1, None], [8, 3, 5]
    alone = [generate(bm, [p], m, exit=e)[0]["tokens"] for p, e, m in zip(prompts, exits, n_new)]
    assert [r["tokens"] for r in generate(bm, prompts, n_new, exit=exits)] == alone
    full = generate(bm, [PROMPT], 16)[0]["tokens"]
    spec = generate(bm, [PROMPT], 16, draft_exit=2, speculate_k=3)[0]
    assert spec["tokens"] == full and spec["drafted"] > 0


def test_exit_file_records_the_kind_and_a_mismatch_is_refused(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "base")
    for kind in KINDS:
        bm = BalconyModel(Transformer.from_checkpoint(ckpt), [1, 2], init="random", kind=kind)
        bm.save_exits(tmp_path / f"{kind}.safetensors")
        loaded = BalconyModel.from_checkpoint(ckpt, tmp_path / f"{kind}.safetensors")  # reads the kind from the file
        assert loaded.kind == kind
        for (n1, t1), (n2, t2) in zip(bm.exits.state_dict().items(), loaded.exits.state_dict().items()):
            assert n1 == n2 and torch.equal(t1, t2)
    with pytest.raises(UsageError, match=r"holds 'mlp' balconies \(train.py --balcony mlp\), not 'block' ones"):
        BalconyModel(Transformer.from_checkpoint(ckpt), [1, 2]).load_exits(tmp_path / "mlp.safetensors")
    with pytest.raises(UsageError, match="holds 'block' balconies"):
        BalconyModel(Transformer.from_checkpoint(ckpt), [1, 2], kind="attn").load_exits(tmp_path / "block.safetensors")
    # a file written before kinds existed holds full blocks
    sd = load_file(tmp_path / "block.safetensors")
    meta, _ = BalconyModel.read_exits_file(tmp_path / "block.safetensors")
    old = {k: v for k, v in meta.items() if k not in ("balcony_kind", "kind")}
    save_file(sd, tmp_path / "old.safetensors", metadata={**old, "exit_layers": json.dumps(old["exit_layers"])})
    assert BalconyModel.from_checkpoint(ckpt, tmp_path / "old.safetensors").kind == "block"


def test_kl_weight_scales_the_kl_term():
    torch.manual_seed(0)
    bm = BalconyModel(Transformer(tiny_args()), [1, 2], init="random")
    x, y = torch.randint(0, 320, (2, 12)), torch.randint(0, 320, (2, 12))

    def loss_and_grads(kl_weight, ce_weight):
        bm.zero_grad()
        loss, kl, ce = train.ExitLoss(bm, 7, ce_weight=ce_weight, kl_weight=kl_weight)(x, y)
        loss.backward()
        return loss, kl, ce, [p.grad.clone() for p in bm.exits.parameters()]

    loss, kl, ce, grads = loss_and_grads(1.0, 0.0)
    assert ce is None and torch.equal(loss, kl.sum())
    half = loss_and_grads(0.5, 0.0)
    torch.testing.assert_close(half[0], 0.5 * kl.sum())
    for g, h in zip(grads, half[3]):
        torch.testing.assert_close(h, 0.5 * g)
    # the paper's CE ablation: 0.001 KL + 1 CE; the logged KL and CE stay unweighted
    paper = loss_and_grads(0.001, 1.0)
    torch.testing.assert_close(paper[1], kl)
    torch.testing.assert_close(paper[0], 0.001 * kl.sum() + paper[2].sum())
    assert paper[2].sum() > 100 * 0.001 * kl.sum()  # CE dominates: the weights reached the loss


def argv(tmp_path, ckpt, data, out, *extra):
    return ["--exit-layers", "1,2", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(tmp_path / out),
            "--cache-dir", str(tmp_path / "cache"), "--seq-len", "32", "--batch-size", "2", "--eval-windows", "2",
            "--max-steps", "4", "--warmup-steps", "1", "--eval-every", "100", *extra]


@pytest.mark.parametrize("kind", ["mlp", "attn"])
def test_default_leaves_the_backbone_bit_identical_for_every_kind(setup, tmp_path, monkeypatch, kind):
    ckpt, data = setup
    models = []
    monkeypatch.setattr(train, "BalconyModel", lambda *a, **k: models.append(BalconyModel(*a, **k)) or models[-1])
    before = load_file(ckpt / "model.safetensors")
    assert train.main(train.parse_args(argv(tmp_path, ckpt, data, "b.safetensors", "--balcony", kind))) == 0
    after = models[0].model.checkpoint_state_dict()
    assert all(torch.equal(after[k], t) for k, t in before.items())
    assert BalconyModel.read_exits_file(tmp_path / "b.safetensors")[0]["kind"] == kind


def test_train_backbone_writes_a_checkpoint_whose_backbone_moved(setup, tmp_path, monkeypatch):
    ckpt, data = setup
    before = load_file(ckpt / "model.safetensors")
    with pytest.raises(UsageError, match="--train-backbone changes the model"):
        train.main(train.parse_args(argv(tmp_path, ckpt, data, "x", "--train-backbone", "--out", str(ckpt))))
    run = argv(tmp_path, ckpt, data, "unfrozen", "--train-backbone")
    assert train.main(train.parse_args(run)) == 0
    out = tmp_path / "unfrozen"
    after = load_file(out / "model.safetensors")
    assert set(after) == set(before) and (out / "tokenizer.json").is_file()
    assert all(torch.equal(t, load_file(ckpt / "model.safetensors")[k]) for k, t in before.items())  # source kept
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    # the loss reaches layers 1..2 (the last exit) and the tied embedding/head; the teacher is detached, so layers
    # 3..4 and the final norm get no gradient
    assert "tok_embeddings.weight" in moved and any(k.startswith("layers.1.") for k in moved)
    assert not any(k.startswith(("layers.2.", "layers.3.", "norm.")) for k in moved)
    bm = BalconyModel.from_checkpoint(out, out / "balcony.safetensors")  # the exits belong to the new model
    with pytest.raises(UsageError, match="trained for another base model"):
        BalconyModel.from_checkpoint(ckpt, out / "balcony.safetensors")
    assert bm.exit_layers == [1, 2]

    # a run stopped after its first step (as by Ctrl-C) resumes with the backbone too, and ends where the
    # uninterrupted one did
    resumed = argv(tmp_path, ckpt, data, "resumed", "--train-backbone")
    with monkeypatch.context() as m:
        m.setattr(train, "stop_requested", lambda *a: True)
        assert train.main(train.parse_args(resumed)) == 130
    assert train.main(train.parse_args([*resumed, "--resume"])) == 0
    again = load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(after[k], again[k]) for k in after)


def write_split(root, parts, rows):
    pa = pytest.importorskip("pyarrow")
    split = root.joinpath("hf_datasets", *parts)
    split.mkdir(parents=True)
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(split / "data-00000-of-00001.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table)


def test_ablation_grid_end_to_end(setup, tmp_path, capsys):
    import ablate

    ckpt, data = setup
    evals = tmp_path / "evals"
    write_split(evals, ["ai2_arc", "ARC-Easy", "validation"],
                [dict(question=f"Is {i} a number?", choices=dict(text=["yes", "no"], label=["A", "B"]), answerKey="A")
                 for i in range(4)])
    write_split(evals, ["piqa", "plain_text", "validation"],
                [dict(goal=f"To be {i}", sol1="or not", sol2="to be", label=i % 2) for i in range(4)])
    argv = ["--checkpoint", str(ckpt), "--exit-layers", "1,2", "--max-steps", "2", "--seq-len", "32", "--data",
            str(data), "--eval-windows", "2", "--limit", "3", "--evals-dir", str(evals), "--out", str(tmp_path / "ab")]
    assert ablate.main(ablate.parse_args(argv)) is None
    table = (tmp_path / "ab" / "table.md").read_text().splitlines()
    rows = [line.split(" | ")[:2] for line in table[2:]]
    assert rows == [[f"| {r}", e] for r in ablate.RUNS for e in ["1", "2"] + (["full"] if r == "unfrozen" else [])] \
        + [["| original model", "full"]]
    results = json.loads((tmp_path / "ab" / "results.json").read_text())
    assert results["original model full"]["kl"] < 1e-5 and results["original model full"]["top1"] == 1
    assert results["unfrozen full"]["kl"] > 1e-6  # its full depth moved
    assert results["paper 1"]["kl"] != results["random 1"]["kl"] != results["mlp 1"]["kl"]

    # the shared backbone pass scores each frozen run as that run alone would
    import eval as ev
    original = BalconyModel(Transformer.from_checkpoint(ckpt), []).eval()
    runs = {r: BalconyModel.from_exits_file(original.model, tmp_path / "ab" / f"{r}.safetensors")
            for r in ("paper", "mlp")}
    shared = ablate.SharedBackbone(runs)
    pairs, tok = [("To be, or not", " to be"), ("Whether 'tis", " nobler in the mind")], Tokenizer.from_checkpoint(ckpt)
    together = ev.score(shared, tok, pairs, [ablate.RunExit("mlp", 1), ablate.RunExit("mlp", 2), None], 2)[0]
    alone = ev.score(runs["mlp"], tok, pairs, [1, 2, None], 2)[0]
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    # a second call finds every run done; another budget in the same folder is refused
    stamp = (tmp_path / "ab" / "paper.safetensors").stat().st_mtime_ns
    assert ablate.main(ablate.parse_args(argv)) is None
    assert (tmp_path / "ab" / "paper.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(UsageError, match="holds runs trained with"):
        ablate.main(ablate.parse_args([*argv, "--max-steps", "3"]))


def test_export_refuses_a_half_block_exit():
    from export import exit_as_llama

    for kind in ("mlp", "attn"):
        bm = BalconyModel(Transformer(tiny_args()), [2], kind=kind)
        assert exit_as_llama(bm, None)[0].n_layers == 4  # full depth is the base model, whatever the balconies
        with pytest.raises(UsageError, match=f"exit 2 is a '{kind}' balcony"):
            exit_as_llama(bm, 2)


def test_every_ablation_run_trains_in_one_dtype_the_unfrozen_run_accepts(tmp_path, monkeypatch):
    # without --dtype each run took train.py's device default: bf16 on a GPU, where the unfrozen run (fp32 only) was
    # refused after five runs had trained
    import ablate

    dtypes = {}
    monkeypatch.setattr(train, "main", lambda args: dtypes.setdefault(args.exit_layers, []).append(args.dtype) or 0)
    args = ablate.parse_args(["--out", str(tmp_path), "--data", str(tmp_path), "--device", "cuda"])
    for name in ablate.RUNS:
        assert ablate.train_run(name, args, tmp_path) == 0
    assert dtypes == {args.exit_layers: ["float32"] * len(ablate.RUNS)}

"""eval.py on a tiny random model: scores equal an independent uncached forward, at full depth and at each exit,
batched or one by one; metrics are lm-eval's; prompts follow lm-eval's task definitions; bad input exits 2."""
import importlib.util
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import eval as ev
from balcony import BalconyModel
from conftest import ROOT
from model import Transformer
from tokenizer import Tokenizer

PAIRS = [("To be, or not to be,", " that is the question"), ("Whether 'tis nobler", " in the mind"),
         ("The slings and arrows of ", "outrageous fortune"), ("Or to take arms", " against a sea of troubles."),
         ("To be, or not to be,", " that"), ("0123", "456789")]


@pytest.fixture
def setup(tiny_ckpt):
    torch.manual_seed(0)
    bm = BalconyModel(Transformer.from_checkpoint(tiny_ckpt), [1, 2], init="random").eval()
    return bm, Tokenizer.from_checkpoint(tiny_ckpt)


def reference(bm, tok, ctx, cont, exit):
    # sum of log-probs of the continuation tokens from one uncached forward of the whole text
    ctx_ids, cont_ids = ev.encode_pair(tok, ctx, cont)
    idx = torch.tensor([ctx_ids + cont_ids])
    with torch.no_grad():
        logits = bm.model(idx) if exit is None else bm(idx, exit=exit)
    logp = F.log_softmax(logits[0, len(ctx_ids) - 1:-1].float(), dim=-1)
    target = torch.tensor(cont_ids)
    return logp[torch.arange(len(cont_ids)), target].sum().item(), bool((logp.argmax(-1) == target).all())


def test_encode_pair_moves_trailing_space(setup):
    _, tok = setup
    ctx, cont = ev.encode_pair(tok, "The slings and arrows of ", "outrageous")
    assert ctx == tok.encode("The slings and arrows of")
    assert ctx + cont == tok.encode("The slings and arrows of outrageous")


def test_loglik_equals_uncached_forward_at_every_exit(setup):
    bm, tok = setup
    exits = [None, 1, 2]
    ll, greedy = ev.score(bm, tok, PAIRS, exits, batch_size=4)
    for e, exit in enumerate(exits):
        for i, (ctx, cont) in enumerate(PAIRS):
            ref_ll, ref_greedy = reference(bm, tok, ctx, cont, exit)
            assert ll[e, i].item() == pytest.approx(ref_ll, abs=1e-4)
            assert greedy[e, i].item() == ref_greedy


def test_full_depth_equals_base_model(setup, tiny_ckpt):
    bm, tok = setup
    ll, _ = ev.score(bm, tok, PAIRS, [None, 1], batch_size=3)
    base_only = BalconyModel(Transformer.from_checkpoint(tiny_ckpt), []).eval()
    ll_base, _ = ev.score(base_only, tok, PAIRS, [None], batch_size=3)
    assert torch.equal(ll[0], ll_base[0])


def test_batching_matches_one_by_one(setup):
    bm, tok = setup
    batched, g1 = ev.score(bm, tok, PAIRS, [None, 2], batch_size=len(PAIRS))
    single = [ev.score(bm, tok, [p], [None, 2], batch_size=1) for p in PAIRS]
    torch.testing.assert_close(batched, torch.cat([s[0] for s in single], 1), atol=1e-5, rtol=0)
    assert torch.equal(g1, torch.cat([s[1] for s in single], 1))


def test_long_context_is_cut_from_the_left(setup):
    bm, tok = setup
    n = bm.model.args.max_seq_len
    long_ctx = "To be, or not to be, " * n  # far more than max_seq_len tokens
    ll, _ = ev.score(bm, tok, [(long_ctx, " that is")], [None], batch_size=1)
    ctx_ids, cont_ids = ev.encode_pair(tok, long_ctx, " that is")
    idx = torch.tensor([(ctx_ids + cont_ids)[-(n + 1):-1]])
    with torch.no_grad():
        logp = F.log_softmax(bm.model(idx)[0, -len(cont_ids):], dim=-1)
    assert ll[0, 0].item() == pytest.approx(logp[torch.arange(len(cont_ids)), cont_ids].sum().item(), abs=1e-4)


def test_acc_norm_divides_by_choice_length():
    items = [(["q"] * 2, ["a", "a much longer answer"], 1), (["q"] * 2, ["yes", "no"], 0)]
    ll = torch.tensor([-2.0, -3.0, -1.0, -5.0])  # item 1: raw picks "a" (wrong), per character picks the long one
    m = ev.choice_metrics(items, ll, torch.zeros(4, dtype=torch.bool))
    assert m == dict(acc=0.5, acc_norm=1.0)


def test_lambada_metrics():
    items = [(["ctx"], ["word"], 0)] * 3
    m = ev.choice_metrics(items, torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([True, False, True]))
    assert m["acc"] == pytest.approx(2 / 3) and m["ppl"] == pytest.approx(math.exp(2.0))


def test_ppl_kl_and_agreement(setup):
    bm, tok = setup
    tokens = torch.randint(0, bm.model.args.vocab_size, (16 * 5 + 3,), generator=torch.Generator().manual_seed(1))
    full, ex = ev.eval_ppl(bm, tokens, [None, 1], block=16, limit=4, batch_size=3)
    x = tokens[:64].view(4, 16)
    y = tokens[1:65].view(4, 16)
    with torch.no_grad():
        lf, le = bm.model(x).reshape(-1, 320), bm(x, exit=1).reshape(-1, 320)
    assert full["ppl"] == pytest.approx(math.exp(F.cross_entropy(lf, y.reshape(-1)).item()), rel=1e-5)
    assert ex["ppl"] == pytest.approx(math.exp(F.cross_entropy(le, y.reshape(-1)).item()), rel=1e-5)
    assert full["kl"] == pytest.approx(0, abs=1e-6) and full["top1_agree"] == 1
    kl = F.kl_div(F.log_softmax(le, -1), F.log_softmax(lf, -1), log_target=True, reduction="batchmean")
    assert ex["kl"] == pytest.approx(kl.item(), rel=1e-4)
    assert ex["top1_agree"] == pytest.approx((lf.argmax(-1) == le.argmax(-1)).float().mean().item())


def test_prompts_follow_lm_eval(monkeypatch):
    rows = {
        "winogrande": [dict(sentence="Sarah was a better surgeon than Maria so _ got the easier cases.",
                            option1="Sarah", option2="Maria", answer="2")],
        "hellaswag": [dict(activity_label="Roof shingle removal", ctx_a="A man is on a roof.", ctx_b="he",
                           endings=["is [header] ripping tiles off.", " starts [title] pulling up roofing."],
                           label="1")],
        "piqa": [dict(goal="Ready a cage?", sol1="Add bedding.", sol2="Add jeans.", label=0)],
        "boolq": [dict(passage="Ethanol is fuel.", question="is ethanol a fuel", answer=True)],
    }
    monkeypatch.setattr(ev, "read_split", lambda root, name, *parts: rows[name])
    assert ev.winogrande(None, 0) == [(["Sarah was a better surgeon than Maria so Sarah",
                                        "Sarah was a better surgeon than Maria so Maria"],
                                       ["got the easier cases."] * 2, 1)]
    assert ev.hellaswag(None, 0) == [(["Roof shingle removal: A man is on a roof. He"] * 2,
                                      ["is ripping tiles off.", "starts. pulling up roofing."], 1)]
    assert ev.piqa(None, 0)[0][0] == ["Question: Ready a cage?\nAnswer:"] * 2
    assert ev.boolq(None, 0) == [(["Ethanol is fuel.\nQuestion: is ethanol a fuel?\nAnswer:"] * 2, ["no", "yes"], 1)]


def test_mmlu_prompt(tmp_path, monkeypatch):
    (tmp_path / "hf_datasets" / "hails" / "mmlu_no_train" / "college_physics").mkdir(parents=True)
    dev = [dict(question=f"Q{i}? ", choices=["a", "b", "c", "d"], answer=i % 4) for i in range(6)]
    test = [dict(question="What?", choices=["w", "x", "y", "z"], answer=2)]
    monkeypatch.setattr(ev, "read_split", lambda root, *parts: dev if parts[-1] == "dev" else test)
    [(contexts, choices, gold)] = ev.mmlu(tmp_path, 2)
    assert contexts[0] == ("The following are multiple choice questions (with answers) about college physics.\n\n"
                           "Q0?\nA. a\nB. b\nC. c\nD. d\nAnswer: A\n\nQ1?\nA. a\nB. b\nC. c\nD. d\nAnswer: B\n\n"
                           "What?\nA. w\nB. x\nC. y\nD. z\nAnswer:")
    assert choices == list("ABCD") and gold == 2


def test_end_to_end_on_arc_arrow_file(tiny_ckpt, tmp_path):
    pa = pytest.importorskip("pyarrow")
    split = tmp_path / "evals" / "hf_datasets" / "ai2_arc" / "ARC-Easy" / "validation"
    split.mkdir(parents=True)
    rows = [dict(question=f"Is {i} a number?", choices=dict(text=["yes", "no", "maybe"], label=["A", "B", "C"]),
                 answerKey="A") for i in range(5)]
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(split / "data-00000-of-00001.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table)
    out, png = tmp_path / "eval.json", tmp_path / "plot.png"
    plot = ["--plot", str(png)] if importlib.util.find_spec("matplotlib") else []  # optional dependency
    r = subprocess.run([sys.executable, "eval.py", "--checkpoint", str(tiny_ckpt), "--exits", "full", "--tasks",
                        "arc_easy", "--evals-dir", str(tmp_path / "evals"), "--limit", "4", "--json", str(out), *plot],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert png.exists() or not plot
    res = json.loads(out.read_text())["results"]["arc_easy"]
    assert res["n"] == 4 and set(res["exits"]["full"]) == {"acc", "acc_norm"}
    assert "| full |" in r.stdout


@pytest.mark.parametrize("argv", [["--tasks", "nosuch"], ["--tasks", "ppl", "--data", "/nonexistent.txt"]])
def test_bad_cli_input_exits_2(argv):
    r = subprocess.run([sys.executable, "eval.py", *argv], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.startswith("eval.py: error: ") and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("argv", [["--exits", "15,abc"], ["--num-fewshot", "mmlu=x"], ["--num-fewshot", "lambada=2"],
                                  ["--limit", "nosuch=3"], ["--limit", "0"]])
def test_bad_lists_are_usage_errors(argv):
    with pytest.raises(ev.UsageError):
        ev.parse_args_lists(ev.get_parser().parse_args(argv))


def test_missing_balcony_exits_2(tiny_ckpt):
    r = subprocess.run([sys.executable, "eval.py", "--checkpoint", str(tiny_ckpt), "--exits", "2,full",
                        "--tasks", "ppl"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("eval.py: error: ") and "Traceback" not in r.stderr


def test_limit_and_fewshot_parsing():
    args = ev.get_parser().parse_args(["--tasks", "arc_easy,mmlu,ppl", "--limit", "200,mmlu=50", "--num-fewshot",
                                       "mmlu=0", "--exits", "15,full"])
    tasks, exits, shots, limits = ev.parse_args_lists(args)
    assert tasks == ["arc_easy", "mmlu", "ppl"] and exits == [15, None]
    assert shots["mmlu"] == 0 and shots["hellaswag"] == 10
    assert limits == {"arc_easy": 200, "mmlu": 50, "ppl": 200}


def test_speed_times_each_exit_at_its_own_depth(setup, monkeypatch):
    # each exit's tokens/s must come from decoding at that exit (k backbone layers and its balcony per token), and its
    # speedup from those runs against the full-depth run (its own speedup, 1, is the definition)
    import generate
    bm, _ = setup
    blocks = []
    for i, layer in enumerate(bm.model.layers):
        layer.register_forward_hook(lambda m, a, o, i=i: blocks.append(("layer", i, a[0].size(1))))
    for k, ex in bm.exits.items():
        ex.layer.register_forward_hook(lambda m, a, o, k=k: blocks.append(("balcony", int(k), a[0].size(1))))
    runs, real = [], generate.generate

    def spy(model, prompt, n, exit=None, **kw):
        start = len(blocks)
        r = real(model, prompt, n, exit=exit, **kw)
        runs.append((exit, r, {b[:2] for b in blocks[start:] if b[2] == 1}))  # the blocks of one-token steps
        return r
    monkeypatch.setattr(generate, "generate", spy)
    full, ex = ev.eval_speed(bm, [None, 1], prompt_len=8, new_tokens=4)
    (_, r_full, full_blocks), (_, r_1, exit_blocks) = runs[1:]  # runs[0] is the warm-up
    assert [e for e, _, _ in runs[1:]] == [None, 1]
    assert full_blocks == {("layer", i) for i in range(bm.n_layers)}
    assert exit_blocks == {("layer", 0), ("balcony", 1)}
    assert (full["decode_tok_s"], ex["decode_tok_s"]) == (r_full["tokens_per_s"], r_1["tokens_per_s"])
    assert ex["speedup"] == r_1["tokens_per_s"] / r_full["tokens_per_s"] and full["speedup"] == 1
    assert all(r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 for r in (full, ex))

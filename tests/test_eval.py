"""eval.py on a tiny random model: scores equal an independent uncached forward, at full depth and at each exit,
batched or one by one; metrics are lm-eval's; prompts follow lm-eval's task definitions; bad input exits 2."""
import importlib.util
import json
import math

import pytest
import torch
import torch.nn.functional as F

import eval as ev
import tasks
from balcony import BalconyModel
from conftest import run_script
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
    ll, greedy, layers = ev.score(bm, tok, PAIRS, exits, batch_size=4)
    assert layers.tolist() == [4, 1, 2]
    for e, exit in enumerate(exits):
        for i, (ctx, cont) in enumerate(PAIRS):
            ref_ll, ref_greedy = reference(bm, tok, ctx, cont, exit)
            assert ll[e, i].item() == pytest.approx(ref_ll, abs=1e-4)
            assert greedy[e, i].item() == ref_greedy


def test_full_depth_equals_base_model(setup, tiny_ckpt):
    bm, tok = setup
    ll, _, _ = ev.score(bm, tok, PAIRS, [None, 1], batch_size=3)
    base_only = BalconyModel(Transformer.from_checkpoint(tiny_ckpt), []).eval()
    ll_base, _, _ = ev.score(base_only, tok, PAIRS, [None], batch_size=3)
    assert torch.equal(ll[0], ll_base[0])


def test_batching_matches_one_by_one(setup):
    bm, tok = setup
    batched, g1, _ = ev.score(bm, tok, PAIRS, [None, 2], batch_size=len(PAIRS))
    single = [ev.score(bm, tok, [p], [None, 2], batch_size=1) for p in PAIRS]
    torch.testing.assert_close(batched, torch.cat([s[0] for s in single], 1), atol=1e-5, rtol=0)
    assert torch.equal(g1, torch.cat([s[1] for s in single], 1))


def test_long_context_is_cut_from_the_left(setup):
    bm, tok = setup
    n = bm.model.args.max_seq_len
    long_ctx = "To be, or not to be, " * n  # far more than max_seq_len tokens
    ll, _, _ = ev.score(bm, tok, [(long_ctx, " that is")], [None], batch_size=1)
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
    monkeypatch.setattr(tasks, "read_split", lambda root, name, *parts: rows[name])
    assert tasks.winogrande(None, 0) == [(["Sarah was a better surgeon than Maria so Sarah",
                                        "Sarah was a better surgeon than Maria so Maria"],
                                       ["got the easier cases."] * 2, 1)]
    assert tasks.hellaswag(None, 0) == [(["Roof shingle removal: A man is on a roof. He"] * 2,
                                      ["is ripping tiles off.", "starts. pulling up roofing."], 1)]
    assert tasks.piqa(None, 0)[0][0] == ["Question: Ready a cage?\nAnswer:"] * 2
    assert tasks.boolq(None, 0) == [(["Ethanol is fuel.\nQuestion: is ethanol a fuel?\nAnswer:"] * 2, ["no", "yes"], 1)]


def test_mmlu_prompt(tmp_path, monkeypatch):
    (tmp_path / "hf_datasets" / "hails" / "mmlu_no_train" / "college_physics").mkdir(parents=True)
    dev = [dict(question=f"Q{i}? ", choices=["a", "b", "c", "d"], answer=i % 4) for i in range(6)]
    test = [dict(question="What?", choices=["w", "x", "y", "z"], answer=2)]
    monkeypatch.setattr(tasks, "read_split", lambda root, *parts: dev if parts[-1] == "dev" else test)
    [(contexts, choices, gold)] = tasks.mmlu(tmp_path, 2)
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
    code, stdout, err = run_script("eval.py", "--checkpoint", tiny_ckpt, "--exits", "full", "--tasks", "arc_easy",
                                   "--evals-dir", tmp_path / "evals", "--limit", 4, "--json", out, *plot)
    assert code == 0, err
    assert png.exists() or not plot
    res = json.loads(out.read_text())["results"]["arc_easy"]
    assert res["n"] == 4 and set(res["exits"]["full"]) == {"acc", "acc_norm", "layers"}
    assert "| full |" in stdout


@pytest.mark.parametrize("argv", [["--tasks", "nosuch"], ["--tasks", "ppl", "--data", "/nonexistent.txt"]])
def test_bad_cli_input_exits_2(argv):
    code, _, err = run_script("eval.py", *argv)
    assert code == 2 and err.startswith("eval.py: error: ") and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("argv", [["--exits", "15,abc"], ["--num-fewshot", "mmlu=x"], ["--num-fewshot", "lambada=2"],
                                  ["--limit", "nosuch=3"], ["--limit", "0"]])
def test_bad_lists_are_usage_errors(argv):
    with pytest.raises(ev.UsageError):
        ev.parse_args_lists(ev.get_parser().parse_args(argv))


def test_missing_balcony_exits_2(tiny_ckpt):
    code, _, err = run_script("eval.py", "--checkpoint", tiny_ckpt, "--exits", "2,full", "--tasks", "ppl")
    assert code == 2 and err.startswith("eval.py: error: ") and err.count("\n") == 1, err


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
        runs.append((exit, r[0], {b[:2] for b in blocks[start:] if b[2] == 1}))  # the blocks of one-token steps
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


# ---- the confidence cascade as an exit (auto@T) ----

def cascade_setup(tiny_ckpt):
    # sharper exits than init="random" gives, so that a middle threshold sends positions to several exits
    torch.manual_seed(0)
    bm = BalconyModel(Transformer.from_checkpoint(tiny_ckpt), [1, 2, 3]).eval()
    with torch.no_grad():
        for ex in bm.exits.values():
            for p in ex.parameters():
                p.add_(0.05 * torch.randn_like(p))
            ex.norm.weight.mul_(20)
    return bm, Tokenizer.from_checkpoint(tiny_ckpt)


@pytest.mark.parametrize("measure", ["prob", "margin"])
def test_teacher_forced_cascade_is_generates_cascade(tiny_ckpt, measure):
    # generate.py's cascade token by token (exact back-fill) == eval.py's pick from one uncached pass, on its tokens
    from generate import generate
    bm, _ = cascade_setup(tiny_ckpt)
    prompt = [5, 17, 33, 100, 7, 250, 12]
    r = generate(bm, [prompt], 30, exit="auto", confidence=0.6, confidence_measure=measure, temperature=1.0,
                 generator=torch.Generator().manual_seed(0))[0]
    assert len(set(r["exits"])) >= 2
    x = torch.tensor([prompt + r["tokens"][:-1]])
    with torch.no_grad():
        (h, depth), = ev.exit_hidden(bm, x, [ev.Auto(0.6)], measure)
        logits = bm.model.output(h[0, len(prompt) - 1:])
    assert depth[0, len(prompt) - 1:].tolist() == r["exits"]
    for e in set(r["exits"]):  # each position's logits are those of the exit it took
        at = depth[0] == e
        torch.testing.assert_close(bm.model.output(h[0, at]), bm(x, exit=e)[0, at], atol=1e-5, rtol=1e-5)
    assert logits.shape[0] == len(r["tokens"])


def test_auto_thresholds_bracket_the_fixed_exits(tiny_ckpt):
    bm, tok = cascade_setup(tiny_ckpt)
    exits = [1, None, ev.Auto(0.0), ev.Auto(0.6), ev.Auto(1.01)]
    ll, _, layers = ev.score(bm, tok, PAIRS, exits, batch_size=4)
    assert torch.equal(ll[2], ll[0]) and torch.equal(ll[4], ll[1])  # threshold 0: exit 1; above 1: full depth
    assert layers[2] == 1 and layers[4] == 4 and 1 <= layers[3] <= 4
    chat = ev.eval_chat(bm, tok, exits, 2, new_tokens=6)
    assert chat[1]["agree"] == 1 and chat[4]["agree"] == 1 and chat[2]["agree"] == chat[0]["agree"]
    assert [c["layers"] for c in chat[:3]] == [1, 4, 1] and chat[4]["gen_layers"] == 4
    assert all(c["decode_tok_s"] > 0 for c in chat) and chat[1]["speedup"] == 1
    assert chat[2]["ideal_speedup"] == chat[0]["ideal_speedup"] > 1 == chat[1]["ideal_speedup"]
    assert chat[4]["ideal_speedup"] < 1  # every token at full depth, after trying each balcony and its head
    speed = ev.eval_speed(bm, exits, prompt_len=8, new_tokens=4)
    assert [s["layers"] for s in speed[:3]] + [speed[4]["layers"]] == [1, 4, 1, 4]


def test_cascade_rows_end_to_end(tiny_ckpt, tmp_path, capsys):
    bm, _ = cascade_setup(tiny_ckpt)
    bm.save_exits(tiny_ckpt / "balcony.safetensors")
    out, png = tmp_path / "eval.json", tmp_path / "plot.png"
    plot = ["--plot", str(png)] if importlib.util.find_spec("matplotlib") else []
    ev.main(ev.get_parser().parse_args(["--checkpoint", str(tiny_ckpt), "--exits", "1,2,full,auto@0.5,auto@0.8",
                                        "--tasks", "chat,speed", "--limit", "chat=2", "--chat-tokens", "5",
                                        "--speed-tokens", "4", "--json", str(out), *plot]))
    assert png.exists() or not plot
    res = json.loads(out.read_text())
    assert res["exits"] == ["1", "2", "full", "auto@0.5", "auto@0.8"]
    assert set(res["results"]["chat"]["exits"]["auto@0.5"]) >= {"agree", "layers", "decode_tok_s", "gen_layers"}
    assert "| auto@0.8 |" in capsys.readouterr().out


@pytest.mark.parametrize("spec", ["auto@", "auto@x", "auto@-1", "autox"])
def test_bad_auto_exit(spec):
    with pytest.raises(ev.UsageError, match="auto@THRESHOLD"):
        ev.parse_args_lists(ev.get_parser().parse_args(["--exits", f"15,{spec}"]))


def test_auto_exit_parsing():
    args = ev.get_parser().parse_args(["--exits", "15,full,auto@0.9,auto@.5,auto", "--tasks", "chat"])
    assert ev.parse_args_lists(args)[1] == [15, None, ev.Auto(0.9), ev.Auto(0.5), ev.Auto(0.9)]  # auto: the default 0.9


@pytest.mark.parametrize("argv, message", [(["--batch-size", "0"], "--batch-size must be at least 1, not 0"),
                                           (["--block-size", "0"], "--block-size must be at least 1, not 0"),
                                           (["--block-size", "-1"], "--block-size must be at least 1, not -1")])
def test_sizes_below_one_are_refused(argv, message):
    # --block-size -1 used to report ppl 1.0; --batch-size 0 and --block-size 0 failed inside
    with pytest.raises(ev.UsageError, match=message):
        ev.parse_args_lists(ev.get_parser().parse_args(["--tasks", "ppl", *argv]))


def test_ppl_default_data_is_what_it_says(setup, tiny_ckpt, tmp_path, monkeypatch):
    """Without --data, ppl scores train.py's default data (data/chat's held-out chats), and its label says so."""
    import data

    bm, tok = setup
    chat = tmp_path / "chat"
    chat.mkdir()
    chats = [[{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": "An answer. " * 8}]
             for i in range(4)]
    for split in ("train", "val"):
        (chat / f"{split}.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats))
    (chat / "meta.json").write_text("{}")
    real = data.load_tokens
    monkeypatch.setattr(data, "CHAT", chat)
    monkeypatch.setattr(ev, "CHAT", chat)
    monkeypatch.setattr(data, "load_tokens", lambda d, t, split: real(d, t, split, cache_dir=tmp_path / "tokens"))
    out = tmp_path / "eval.json"
    ev.main(ev.get_parser().parse_args(["--checkpoint", str(tiny_ckpt), "--exits", "full", "--tasks", "ppl",
                                        "--block-size", "16", "--json", str(out)]))
    res = json.loads(out.read_text())["results"]["ppl"]
    val = [t for m in chats for t in tok.encode_chat(m, add_generation_prompt=False)]
    assert res["data"].startswith(str(chat)) and res["n"] == (len(val) - 1) // 16 * 16
    assert "Shakespeare" not in ev.get_parser().format_help()

"""generate.py on tiny random models: cached exit decoding equals the uncached forward, an exit runs only its own
layers, self-speculative decoding reproduces the full model (greedy: token for token; sampling: in distribution),
and the CLI reports bad input as one line."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from balcony import BalconyModel
from conftest import ROOT, tiny_args
from generate import decode_one_token, generate, get_parser, logits_to_probs, main, prefill
from cli import UsageError
from model import Transformer

PROMPT = [5, 17, 33, 100, 7, 250, 12]


@pytest.fixture(autouse=True)
def one_thread():
    # tiny models gain nothing from threads, and on a busy machine OpenMP's spinning makes each op ~50x slower
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_balcony(exits=(1, 2, 3), seed=0, **overrides) -> BalconyModel:
    torch.manual_seed(seed)
    model = BalconyModel(Transformer(tiny_args(**overrides)), exits)
    with torch.no_grad():  # exits initialised as copies of the last layer would all agree; make them differ
        for p in model.exits.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("exit", [1, 2, 3, None])
def test_cached_exit_decode_matches_uncached_forward(exit):
    model = tiny_balcony()
    seq = torch.tensor([PROMPT + [3, 99, 41, 7, 200]])
    T = len(PROMPT)
    with torch.no_grad():
        ref = model(seq, exit=exit)[0]  # (T + 5, vocab), no cache
        model.setup_caches(1, seq.size(1), exit=exit)
        got = [prefill(model, seq[:, :T], exit)[0]]
        for pos in range(T, seq.size(1)):  # teacher-forced: feed the known next token
            got.append(decode_one_token(model, seq[:, pos:pos + 1], torch.tensor([pos]), exit)[0])
    torch.testing.assert_close(torch.stack(got), ref[T - 1:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("exit", [1, 2, 3])
def test_exit_runs_only_its_layers(exit):
    model = tiny_balcony()
    calls = {}
    for name, mod in [*((f"layer{i + 1}", l) for i, l in enumerate(model.model.layers)),
                      *((f"balcony{k}", e) for k, e in model.exits.items()), ("norm", model.model.norm)]:
        mod.register_forward_hook(lambda m, i, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    n_new = 6
    generate(model, PROMPT, n_new, exit=exit)
    steps = n_new  # the prefill, then one forward per token after the first
    assert calls == {**{f"layer{i}": steps for i in range(1, exit + 1)}, f"balcony{exit}": steps}
    deeper = [l.attention.kv_cache for l in model.model.layers[exit:]]
    other = [e.layer.attention.kv_cache for k, e in model.exits.items() if int(k) != exit]
    assert all(c is None for c in deeper + other)  # never allocated


@pytest.mark.parametrize("draft_exit", [1, 2, 3])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_speculative_greedy_equals_full_depth(draft_exit, k):
    model = tiny_balcony()
    ref = generate(model, PROMPT, 40)["tokens"]
    r = generate(model, PROMPT, 40, draft_exit=draft_exit, speculate_k=k)
    assert r["tokens"] == ref
    assert 0 <= r["accepted"] <= r["drafted"] and r["rounds"] >= 39 / (k + 1)


def test_speculative_greedy_draft_always_rejected():
    model = tiny_balcony()
    with torch.no_grad():  # the draft's logits become the negated logit lens of layer 2: its top token is never right
        ex = model.exits["2"]
        for p in ex.layer.parameters():
            p.zero_()
        ex.layer.attention_norm.weight.fill_(1)
        ex.layer.ffn_norm.weight.fill_(1)
        ex.norm.weight.copy_(-model.model.norm.weight)
    ref = generate(model, PROMPT, 30)["tokens"]
    r = generate(model, PROMPT, 30, draft_exit=2, speculate_k=3)
    assert r["tokens"] == ref
    assert r["accepted"] == 0 and r["rounds"] == 29  # one full-model token per round


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_speculative_draft_always_accepted(temperature):
    model = tiny_balcony()
    with torch.no_grad():  # layers 3..4 and balcony 2 become identities, balcony 2's norm the final norm: draft == full
        for block in [*model.model.layers[2:], model.exits["2"].layer]:
            block.attention.wo.weight.zero_()
            block.feed_forward.w2.weight.zero_()
        model.exits["2"].norm.weight.copy_(model.model.norm.weight)
    g = dict(generator=torch.Generator().manual_seed(0), temperature=temperature)
    ref = generate(model, PROMPT, 31, **g)["tokens"]
    g["generator"].manual_seed(0)
    r = generate(model, PROMPT, 31, draft_exit=2, speculate_k=4, **g)
    assert r["acceptance_rate"] == 1.0 and r["rounds"] == 6  # 1 token from the prefill, then 5 per round
    if temperature == 0:
        assert r["tokens"] == ref


def test_speculative_sampling_matches_full_model_distribution():
    # Vocabulary of 8: compare the empirical marginals of the 2nd and 3rd generated tokens (the ones speculation
    # produces: accepted drafts, corrections, bonus tokens) over N runs with the exact ones, by total variation.
    # Sampling noise alone gives TV ~0.04 at N=800; a sampler that emitted the draft's tokens would be off by more
    # than 0.2 (checked below), so a tolerance of 0.1 separates them.
    model = tiny_balcony(exits=[1], seed=3, vocab_size=8, n_layers=2)
    samp = dict(temperature=0.9, top_k=6)
    prompt = [1, 5, 2, 7, 3]
    V, N = 8, 800

    def marginals(exit):  # exact distributions of tokens 1..3 by enumerating every prefix
        seqs = torch.tensor([prompt])
        joint = torch.ones(1)
        out = []
        with torch.no_grad():
            for _ in range(3):
                p = logits_to_probs(model(seqs, exit=exit)[:, -1], **samp)  # (prefixes, V)
                joint = (joint[:, None] * p).reshape(-1)
                out.append(joint.view(-1, V).sum(0))
                seqs = torch.cat([seqs.repeat_interleave(V, 0), torch.arange(V).repeat(seqs.size(0))[:, None]], 1)
        return out

    full, draft = marginals(None), marginals(1)
    g = torch.Generator().manual_seed(1234)
    counts = torch.zeros(2, V)
    for _ in range(N):
        toks = generate(model, prompt, 3, draft_exit=1, speculate_k=2, generator=g, **samp)["tokens"]
        counts[0, toks[1]] += 1
        counts[1, toks[2]] += 1
    for i in (1, 2):
        tv = 0.5 * (counts[i - 1] / N - full[i]).abs().sum()
        assert tv < 0.1, (i, tv)
        assert 0.5 * (draft[i] - full[i]).abs().sum() > 0.2  # the test could tell a wrong sampler apart


# ---- the CLI ----

def run_main(capsys, *args):  # in-process: fast, and UsageError propagates
    main(get_parser().parse_args([*map(str, args)]))
    return capsys.readouterr().out


def run_cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=120)


@pytest.fixture
def tiny_with_balcony(tiny_ckpt):
    BalconyModel(Transformer.from_checkpoint(tiny_ckpt), [2]).save_exits(tiny_ckpt / "balcony.safetensors")
    return tiny_ckpt


def test_cli_generates_and_streams(tiny_with_balcony, capsys):
    args = ["--checkpoint", tiny_with_balcony, "--prompt", "To be, or not", "--max-new-tokens", 12]
    plain = json.loads(run_main(capsys, *args, "--json"))
    spec = json.loads(run_main(capsys, *args, "--json", "--draft-exit", 2, "--speculate-k", 3))
    assert spec["tokens"] == plain["tokens"] and 0 <= spec["acceptance_rate"] <= 1
    exit2 = json.loads(run_main(capsys, *args, "--exit", 2, "--json"))
    streamed = run_cli(*args, "--exit", 2)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == exit2["text"] + "\n"
    assert "tokens/s" in streamed.stderr and "exit 2/4" in streamed.stderr


@pytest.mark.parametrize("args, message", [
    (["--exit", 3], "exit 3 has no trained balcony"),
    (["--exit", 9], "outside 1..4"),
    (["--exit", 0], "outside 1..4"),
    (["--draft-exit", 4], "must be a balcony exit"),
    (["--draft-exit", 3], "exit 3 has no trained balcony"),
    (["--prompt", "to be or not " * 100], "exceeds the model's context"),
    (["--balcony", "/nonexistent/balcony.safetensors", "--exit", 2], "not found"),
    (["--draft-exit", 2, "--exit", 2], "drop --exit or --draft-exit"),
    (["--temperature", -1], "--temperature"),
])
def test_bad_input_messages(tiny_with_balcony, capsys, args, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        run_main(capsys, "--checkpoint", tiny_with_balcony, "--max-new-tokens", 4, *args)


@pytest.mark.parametrize("args", [["--checkpoint", "/nonexistent"], ["--exit", 2], ["--draft-exit", 2]])
def test_missing_files(tiny_ckpt, capsys, args):
    # a missing checkpoint; a checkpoint without balcony.safetensors asked for an exit or a draft exit
    with pytest.raises(UsageError, match="not found"):
        run_main(capsys, "--checkpoint", tiny_ckpt, *args)


@pytest.mark.parametrize("args", [["--exit", 3], ["--checkpoint", "/nonexistent"]])
def test_cli_error_is_one_line(tiny_with_balcony, args):
    r = run_cli("--checkpoint", tiny_with_balcony, *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("generate.py: error: ")

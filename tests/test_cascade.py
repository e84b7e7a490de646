"""The confidence cascade (cascade.ConfidenceCascade, --exit auto) on tiny random models: a threshold above 1 is
full-depth greedy, 0 is the first exit's greedy; in between, each token leaves at the first exit an uncached forward
finds confident, every layer's and balcony's KV cache equals a full-depth forward's wherever it has been written
(and is written everywhere once a token has gone to full depth), and the layers run (hooks) match the exits."""
import json
import re

import pytest
import torch

import cascade as cascade_module
from cascade import bytes_per_token, exit_confidence, nbytes
from generate import generate, get_parser, main
from cli import UsageError
from test_generate import PROMPT, one_thread, tiny_balcony, tiny_with_balcony  # noqa: F401 (fixtures)

N_NEW = 40


def gen(model, max_new_tokens, **kw) -> dict:  # one prompt, PROMPT, on fresh caches
    drop_caches(model)
    return generate(model, [PROMPT], max_new_tokens, **kw)[0]


def drop_caches(model):
    # generate() reuses caches that are big enough; fresh ones start at zero, so unwritten slots are visible
    for att in [*(l.attention for l in model.model.layers), *(e.layer.attention for e in model.exits.values())]:
        att.kv_cache = None


def sharp_balcony():
    # Random exits are unsure of everything (top probability ~1/vocab); sharper exit norms spread the confidences,
    # so that a middle threshold sends tokens to several exits.
    model = tiny_balcony()
    with torch.no_grad():
        for ex in model.exits.values():
            ex.norm.weight.mul_(20)
    return model


def final_depths(exits, n_layers):
    """Depth of every position fed to the model (the prompt, then each token but the last) once the run ends: a
    token's own exit, raised by the back-fill to the deepest exit of any later step. Step i (the prefill is step 0)
    feeds the prompt or token i-1."""
    later = [max(exits[i:]) for i in range(len(exits))]
    return [later[0]] * len(PROMPT) + later[1:]


def full_depth_caches(model, tokens):
    """Every layer's and balcony's KV cache after one full-depth forward over tokens, each balcony run on the layer
    states of all positions: {name: (k, v)} restricted to len(tokens) slots."""
    idx, L = torch.tensor([tokens]), len(tokens)
    pos = torch.arange(L)
    drop_caches(model)
    model.setup_caches(1, L, exits=[None, *model.exit_layers])
    with torch.no_grad():
        h, prev = model.model.tok_embeddings(idx), 0
        for e in model.exit_layers:
            h = model.run_layers(h, prev, e, pos)
            model.exit_hidden(e, h, pos)
            prev = e
        model.run_layers(h, prev, model.n_layers, pos)
    return caches(model, L)


def caches(model, L):
    named = [*((f"layer{i + 1}", l.attention) for i, l in enumerate(model.model.layers)),
             *((f"balcony{k}", e.layer.attention) for k, e in model.exits.items())]
    return {name: (a.kv_cache.k_cache[0, :, :L].clone(), a.kv_cache.v_cache[0, :, :L].clone()) for name, a in named}


def test_threshold_above_one_is_full_depth_greedy():
    model = tiny_balcony()
    ref = gen(model, N_NEW)["tokens"]
    for measure in ("prob", "margin"):
        r = gen(model, N_NEW, exit="auto", confidence=1.01, confidence_measure=measure)
        assert r["tokens"] == ref and r["exits"] == [model.n_layers] * N_NEW and r["avg_layers"] == model.n_layers
        assert r["backfilled"] == 0


def test_threshold_zero_is_first_exit_greedy():
    model = tiny_balcony()
    ref = gen(model, N_NEW, exit=1)["tokens"]
    for measure in ("prob", "margin"):
        r = gen(model, N_NEW, exit="auto", confidence=0.0, confidence_measure=measure)
        assert r["tokens"] == ref and r["exits"] == [1] * N_NEW and r["backfilled"] == 0


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("measure", ["prob", "margin"])
def test_each_token_leaves_at_the_first_confident_exit(temperature, measure):
    model = sharp_balcony()
    threshold = 0.6
    r = gen(model, N_NEW, exit="auto", confidence=threshold, confidence_measure=measure,
                 temperature=temperature, generator=torch.Generator().manual_seed(0))  # sampled: varied contexts
    seq = torch.tensor([PROMPT + r["tokens"][:-1]])
    with torch.no_grad():  # uncached, every exit over every position: what a token sees there is context-independent
        logits = {e: model(seq, exit=e)[0, len(PROMPT) - 1:] for e in [*model.exit_layers, model.n_layers]}
    for i, got in enumerate(r["exits"]):
        want = next((e for e in model.exit_layers if exit_confidence(logits[e][i], measure) >= threshold),
                    model.n_layers)
        assert got == want, i
        if temperature == 0:
            assert r["tokens"][i] == logits[got][i].argmax().item()
    assert len(set(r["exits"])) >= 2


# Exits chosen by hand (every exit, after every other, runs of each, full depth in the middle, shallower ones after
# the last full-depth token), enforced by a scripted confidence: the cache and work checks see every case.
PLAN = [2, 1, 1, 3, 1, 2, 2, 4, 1, 3, 2, 1, 1, 4, 3, 3, 1, 2, 1, 1, 3, 4, 2, 1, 2, 3, 1, 1]


@pytest.fixture
def scripted(monkeypatch):
    """A tiny model whose cascade follows PLAN: exit_confidence says 1 at the planned exit, 0 before it."""
    model = tiny_balcony()
    n_balconies, state = len(model.exit_layers), dict(step=0, tried=0)

    def fake_confidence(logits, measure):
        sure = model.exit_layers[state["tried"]] == PLAN[state["step"]]
        state["tried"] += 1
        if sure or state["tried"] == n_balconies:  # this step ends: at the planned exit, or at full depth
            state.update(step=state["step"] + 1, tried=0)
        return torch.tensor(float(sure))

    monkeypatch.setattr(cascade_module, "exit_confidence", fake_confidence)
    return model, state


def test_kv_caches_equal_full_depth_forward(scripted):
    model, state = scripted
    n = model.n_layers
    last_full = max(i for i, e in enumerate(PLAN) if e == n)
    # the whole plan, then the plan cut at its last full-depth token, where every KV has been written
    for n_new in (len(PLAN), last_full + 1):
        state.update(step=0, tried=0)
        r = gen(model, n_new, exit="auto", confidence=0.5)
        assert r["exits"] == PLAN[:n_new]
        fed = PROMPT + r["tokens"][:-1]  # the last token is emitted, never fed
        got = caches(model, len(fed))
        ref = full_depth_caches(model, fed)
        depth = torch.tensor(final_depths(r["exits"], n))
        assert (depth == n).all() == (n_new == last_full + 1)
        for name, (k_ref, v_ref) in ref.items():
            layer = int(re.sub(r"\D", "", name))
            written = depth >= layer  # (L,) positions whose KV at this layer or balcony exists by now
            for got_kv, ref_kv in zip(got[name], (k_ref, v_ref)):  # (n_kv_heads, L, head_dim)
                torch.testing.assert_close(got_kv[:, written], ref_kv[:, written], atol=1e-5, rtol=1e-5)
                assert (got_kv[:, ~written] == 0).all(), name  # never computed: the cascade saved that work


def test_layers_run_per_token_match_the_exits(scripted):
    model, _ = scripted
    calls, rows, per_token = {}, {}, []

    def count(name):
        def hook(module, inputs, output):
            calls[name] = calls.get(name, 0) + 1
            rows[name] = rows.get(name, 0) + inputs[0].shape[-2]
        return hook

    for i, layer in enumerate(model.model.layers):
        layer.register_forward_hook(count(i + 1))
    for k, ex in model.exits.items():
        ex.register_forward_hook(count(f"balcony{k}"))
    model.model.output.register_forward_hook(count("head"))

    def on_token(i, token):  # backbone layers run for this token: the layers called since the previous one
        per_token.append(sum(calls.get(i + 1, 0) for i in range(model.n_layers)) - sum(per_token))

    r = gen(model, len(PLAN), exit="auto", confidence=0.5, on_token=on_token)
    exits, ladder = r["exits"], [*model.exit_layers, model.n_layers]
    assert per_token == exits == PLAN
    depth = final_depths(exits, model.n_layers)
    for layer in range(1, model.n_layers + 1):  # each (layer, position) computed exactly once, in as many passes as
        assert calls[layer] == sum(e >= layer for e in exits)  # tokens went that deep
        assert rows[layer] == sum(d >= layer for d in depth)
    for k in model.exit_layers:
        assert calls[f"balcony{k}"] == sum(e >= k for e in exits)
        assert rows[f"balcony{k}"] == sum(d >= k for d in depth)
    assert calls["head"] == rows["head"] == sum(ladder.index(e) + 1 for e in exits)  # one row per exit tried
    assert r["avg_layers"] == pytest.approx(sum(exits) / len(exits))
    assert r["backfilled"] == sum(depth) - sum(exits[1:]) - len(PROMPT) * exits[0] > 0


def test_bytes_per_token():
    model = tiny_balcony()  # 4 layers, exits 1, 2, 3; fp32
    layer = 4 * sum(p.numel() for p in model.model.layers[0].parameters())
    norm, head = 4 * model.model.norm.weight.numel(), 4 * model.model.output.weight.numel()
    balcony = layer + norm  # a decoder layer and its RMSNorm
    assert bytes_per_token(model, 2) == 2 * layer + balcony + head  # layers 1..2, balcony 2, the head
    assert bytes_per_token(model, None) == bytes_per_token(model, 4) == 4 * layer + norm + head
    assert bytes_per_token(model, 1, cascade=True) == bytes_per_token(model, 1)  # the first exit tries nothing else
    assert bytes_per_token(model, 2, cascade=True) == 2 * layer + balcony + head + (balcony + head)  # tried exit 1
    assert bytes_per_token(model, None, cascade=True) == 4 * layer + norm + head + 3 * (balcony + head)


def test_bytes_per_token_counts_quantised_weights_as_held():
    from quantize import quantize
    model = tiny_balcony()
    linears = [m for m in model.model.layers[0].modules() if isinstance(m, torch.nn.Linear)]
    norms = 4 * sum(p.numel() for n, p in model.model.layers[0].named_parameters() if "norm" in n)
    full_head = 4 * model.model.output.weight.numel()
    quantize(model, "int4", 32, head="none")
    # int4: half a byte a weight, and a bf16 scale and zero per 32 of them; the norms stay fp32, the head as loaded
    int4_layer = sum(m.out_features * m.in_features * (1 / 2 + 4 / 32) for m in linears) + norms
    assert nbytes(model.model.layers[0]) == int4_layer
    assert bytes_per_token(model, None) == 4 * int4_layer + 4 * model.model.norm.weight.numel() + full_head


# ---- the CLI ----

def test_cli_json_reports_exits(tiny_with_balcony, capsys):
    args = ["--checkpoint", tiny_with_balcony, "--prompt", "To be, or not", "--max-new-tokens", 10, "--json"]
    main(get_parser().parse_args([*map(str, args)]))
    full = json.loads(capsys.readouterr().out)
    main(get_parser().parse_args([*map(str, args), "--exit", "auto", "--confidence", "2"]))
    r = json.loads(capsys.readouterr().out)
    assert r["tokens"] == full["tokens"] and r["exits"] == [4] * len(r["tokens"]) and r["avg_layers"] == 4
    assert r["confidence"] == 2 and r["confidence_measure"] == "prob" and r["tokens_per_s"] > 0
    main(get_parser().parse_args([*map(str, args), "--exit", "auto", "--confidence-measure", "margin"]))
    r = json.loads(capsys.readouterr().out)
    assert r["confidence"] == 0.9 and r["confidence_measure"] == "margin" and set(r["exits"]) <= {2, 4}


@pytest.mark.parametrize("args, message", [
    (["--confidence", 0.5], "--exit auto only"),
    (["--exit", "auto", "--compile"], "--compile applies"),
    (["--exit", "auto", "--draft-exit", 2], "do not combine"),
])
def test_bad_input_messages(tiny_with_balcony, args, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        main(get_parser().parse_args(["--checkpoint", str(tiny_with_balcony), *map(str, args)]))


def test_exit_must_be_a_number_full_or_auto(tiny_with_balcony, capsys):
    with pytest.raises(UsageError, match="an exit is one of layer numbers, 'full', 'auto' and auto@THRESHOLD"):
        main(get_parser().parse_args(["--exit", "deep"]))
    ckpt = str(tiny_with_balcony)
    with pytest.raises(UsageError, match="give the threshold once"):
        main(get_parser().parse_args(["--checkpoint", ckpt, "--exit", "auto@.5", "--confidence", ".5"]))
    args = ["--checkpoint", ckpt, "--prompt", "To be", "--max-new-tokens", "4", "--json"]
    main(get_parser().parse_args([*args, "--exit", "full"]))  # full depth, as eval.py and export.py take it
    assert json.loads(capsys.readouterr().out)["exit"] == 4
    main(get_parser().parse_args([*args, "--exit", "auto@2"]))  # = --exit auto --confidence 2
    r = json.loads(capsys.readouterr().out)
    assert r["confidence"] == 2 and r["exits"] == [4] * len(r["tokens"])

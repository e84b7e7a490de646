"""serve.py on a tiny random model behind a real uvicorn on a loopback port: the official openai client, streaming and
not; greedy output through the server equals generate() at the same exit, also when requests of different exits
and lengths share the batch; a client that leaves mid-stream frees its row; every bad request gets an OpenAI-style
error and the next good one is served."""
import contextlib
import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from balcony import BalconyModel
from cascade import nbytes
from conftest import ROOT, make_tiny_checkpoint, tiny_args
from generate import generate
from model import Transformer
from serve import AutoPolicy, Engine, Request, make_app
from test_generate import PROMPTS, lively_balcony
from tokenizer import Tokenizer

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

MAX_SEQ = 96


def untrained_2():
    # the lively tiny model of test_generate with balcony 2 taken away: exits 1 and 3 trained, 2 not
    model = lively_balcony()
    model.exits.pop("2")
    model.exit_layers.remove(2)
    return model


@contextlib.contextmanager
def running(engine, tok, name="tiny"):
    """engine behind a real uvicorn on a free loopback port: {port, engine, tok, client}."""
    engine.start()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(make_app(engine, tok, name), log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs=dict(sockets=[sock]))
    thread.start()
    while not srv.started:
        time.sleep(0.01)
    port = sock.getsockname()[1]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    try:
        yield dict(port=port, engine=engine, tok=tok, client=client)
    finally:
        srv.should_exit = True
        thread.join()
        engine.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models gain nothing from threads (test_generate.py)
    tok = Tokenizer.from_checkpoint(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny")))
    with running(Engine(untrained_2(), max_batch=4, max_seq=MAX_SEQ, queue_size=6, stop_ids=tok.stop_ids), tok) as s:
        yield s
    torch.set_num_threads(threads)


def reference(tok, prompt, exit, max_tokens):
    # generate() on a fresh copy of the same weights (the server's model and caches belong to its engine)
    r = generate(untrained_2(), [prompt], max_tokens, exit=exit, eos_id=tok.stop_ids)[0]
    return tok.decode([t for t in r["tokens"] if t not in tok.stop_ids]), len(r["tokens"])


def call(port: int, path: str, body=None, stream=False):
    """A raw GET (no body) or POST (str bodies as they are) on the server's root: (status, text); stream: the open
    response and its connection, to read and drop."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    if body is None:
        conn.request("GET", path)
    else:
        conn.request("POST", path, body if isinstance(body, str) else json.dumps(body),
                     {"Content-Type": "application/json"})
    r = conn.getresponse()
    if stream:
        return r, conn
    status, text = r.status, r.read().decode()
    conn.close()
    return status, text


def post(server, path, body):
    status, text = call(server["port"], "/v1" + path, body)
    return status, json.loads(text)


def idle(engine):
    for _ in range(500):
        if not engine.rows:
            return
        time.sleep(0.01)
    raise AssertionError("the engine kept its rows")


def slow_steps(engine, monkeypatch, seconds=0.01):
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: (time.sleep(seconds), step()))


def test_models_and_greedy_equals_generate(server):
    client, tok = server["client"], server["tok"]
    assert [m.id for m in client.models.list().data] == ["tiny", "tiny@auto", "tiny@1", "tiny@3"]
    for model, exit in [("tiny", None), ("tiny@1", 1), ("tiny@3", 3)]:
        text, n = reference(tok, PROMPTS[0], exit, 10)
        r = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=10, temperature=0)
        assert (r.choices[0].text, r.usage.completion_tokens, r.usage.prompt_tokens) == (text, n, len(PROMPTS[0]))
        assert r.model == model and r.model_extra["exit"] == (exit or 4)
        assert r.choices[0].finish_reason == ("length" if n == 10 else "stop")
        # streamed: the same text in pieces, each chunk naming the exit
        chunks = list(client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=10, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == text
        assert {c.model for c in chunks} == {model} and chunks[-1].usage.completion_tokens == n


def test_chat_template_and_stream(server):
    client, tok = server["client"], server["tok"]
    messages = [{"role": "user", "content": "To be, or not to be"}]
    text, n = reference(tok, tok.encode_chat(messages), 3, 8)
    r = client.chat.completions.create(model="tiny@3", messages=messages, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == text and r.usage.completion_tokens == n and r.model == "tiny@3"
    chunks = list(client.chat.completions.create(model="tiny@3", messages=messages, max_tokens=8, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text


def test_overlapping_requests_of_mixed_exits_equal_generate(server, monkeypatch):
    client, tok, engine = server["client"], server["tok"], server["engine"]
    jobs = [(p, e, m) for p, e, m in zip(PROMPTS, [1, 3, 1, "auto", 3, None], [20, 5, 24, 9, 16, 3])]
    batches = []
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: (batches.append([r.depth for r in engine.rows]), step()))

    def ask(job):
        prompt, exit, m = job
        model = "tiny" if exit is None else f"tiny@{exit}"
        return client.completions.create(model=model, prompt=prompt, max_tokens=m, temperature=0)

    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(ask, jobs))
    assert max(len(b) for b in batches) >= 3 and any(len(set(b)) >= 2 for b in batches)  # they did share steps
    assert got[3].model_extra["exit"] == 4  # @auto without a budget: full depth
    for (prompt, exit, m), r in zip(jobs, got):
        text, n = reference(tok, prompt, None if exit == "auto" else exit, m)
        assert (r.choices[0].text, r.usage.completion_tokens) == (text, n)


def test_seeded_sampling_repeats(server):
    client = server["client"]
    kw = dict(model="tiny@1", prompt=PROMPTS[2], max_tokens=12, temperature=1.0, top_p=0.9)
    a, b = (client.completions.create(seed=7, **kw).choices[0].text for _ in range(2))
    assert a == b


def test_ignore_eos_decodes_max_tokens(server):
    client, tok = server["client"], server["tok"]
    ref = generate(untrained_2(), [PROMPTS[1]], 40, exit=1)[0]["tokens"]  # no eos: 40 tokens, whatever they are
    r = client.completions.create(model="tiny@1", prompt=PROMPTS[1], max_tokens=40, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 40 and r.choices[0].finish_reason == "length"
    assert r.choices[0].text == tok.decode([t for t in ref if t not in tok.stop_ids])


def test_stop_string_ends_the_text(server):
    client, tok = server["client"], server["tok"]
    text, _ = reference(tok, PROMPTS[2], 3, 20)
    stop = text[len(text) // 2:len(text) // 2 + 2]
    r = client.completions.create(model="tiny@3", prompt=PROMPTS[2], max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].text == text[:text.index(stop)] and r.choices[0].finish_reason == "stop"


def test_disconnect_frees_the_row(server, monkeypatch):
    engine = server["engine"]
    slow_steps(engine, monkeypatch)
    idle(engine)  # earlier tests' rows gone (a stop string's row leaves at the step after its reply)
    cancelled, tokens = engine.stats["cancelled"], engine.stats["tokens"]
    body = dict(model="tiny", prompt=PROMPTS[0], max_tokens=80, temperature=0, stream=True)
    r, conn = call(server["port"], "/v1/completions", body, stream=True)
    assert r.getheader("x-balcony-exit") == "4"
    assert r.readline().startswith(b"data: ")  # one event, then hang up
    conn.close()
    idle(engine)
    assert engine.stats["cancelled"] == cancelled + 1 and engine.stats["tokens"] - tokens < 40  # of 80


@pytest.mark.parametrize("body,status,message", [
    ('{"model": "tiny", "prompt": ', 400, "not valid JSON"),
    (dict(model="gpt-4", prompt="Hi"), 404, "unknown model 'gpt-4'"),
    (dict(model="tiny@2", prompt="Hi"), 404, "exit 2 has no trained balcony"),
    (dict(model="tiny", prompt=list(range(3, 3 + MAX_SEQ))), 400, "exceeds the model's context"),
    (dict(model="tiny", prompt="Hi", max_tokens=0), 422, "max_tokens must be at least 1, not 0"),
    (dict(model="tiny", prompt=""), 400, "the prompt is empty"),
    (dict(model="tiny", prompt="Hi", n=2), 422, "n: Input should be less than or equal to 1"),
    (dict(model="tiny", prompt=[5, 999]), 400, "token ids must be in 0..319"),
    (dict(model="tiny", messages=[]), 422, "prompt: Field required"),
])
def test_bad_requests_get_errors_and_the_server_goes_on(server, body, status, message):
    code, reply = post(server, "/completions", body)
    assert code == status
    err = reply["error"]
    assert message in err["message"] and set(err) == {"message", "type", "param", "code"}
    ok = server["client"].completions.create(model="tiny@1", prompt="Hi", max_tokens=3, temperature=0)
    assert ok.usage.completion_tokens >= 1


def test_full_queue_answers_429(server, monkeypatch):
    engine = server["engine"]
    slow_steps(engine, monkeypatch, 0.02)
    body = dict(model="tiny@1", prompt=PROMPTS[1], max_tokens=10, temperature=0)
    with ThreadPoolExecutor(16) as pool:
        rs = list(pool.map(lambda _: post(server, "/completions", body), range(16)))
    codes = sorted(code for code, _ in rs)
    assert codes.count(200) >= 6 + 1 and 429 in codes and set(codes) == {200, 429}  # the queue and a row, at least
    assert next(r for code, r in rs if code == 429)["error"]["type"] == "rate_limit_error"
    assert post(server, "/completions", body)[0] == 200


def test_auto_policy_picks_the_deepest_exit_that_keeps_the_budget():
    from serve import HEADROOM
    model = BalconyModel(Transformer(tiny_args(n_layers=8)), [2, 5])
    layer, norm, head = (nbytes(m) for m in (model.model.layers[0], model.model.norm, model.model.output))

    def own(d):  # the final norm at full depth, a balcony (a layer and its norm) at an exit
        return norm + layer * (d < 8)

    def token(d):  # the weights a token at exit d reads
        return layer * d + own(d) + head

    def step_s(depths):  # the step model by hand: each weight used is read once and used by each of its rows
        read = layer * max(depths) + head + sum(own(d) for d in set(depths))
        return 2e-9 * read + 1e-9 * sum(token(d) for d in depths)

    policy = AutoPolicy(model, None, alpha=2e-9, beta=1e-9, gamma=1e-10, max_batch=6)
    policy.speed = 1.5
    assert policy.choose([8, 8, 5], [], 1, 10, now=0.0) == 8  # no budget: full depth
    # no arrivals measured: the rows now, itself and the queued ones, at the speed measured
    plan = 1.5 / HEADROOM  # a budget that a prediction of 1.5 x step_s keeps exactly
    for budget, rows, joining, want in [(1.0, [], 0, 8), (plan * step_s([8, 8, 5, 5, 5]), [8, 8], 2, 5),
                                        (plan * step_s([8, 8, 5, 2, 2]) * 1.001, [8, 8, 5], 1, 2),
                                        (1.5 * step_s([8, 8, 5, 2, 2]) * 1.001, [8, 8, 5], 1, 2),  # not headroom
                                        (1e-9, [8], 0, 2)]:
        policy.budget_s = budget
        assert policy.choose(rows, [], joining, 10, now=0.0) == want
        assert policy.last == pytest.approx({d: 1000 * 1.5 * step_s(rows + [d] * (1 + joining)) for d in (8, 5, 2)})
    assert policy.decisions == {8: 2, 5: 1, 2: 3}
    # @auto rows deeper than the exit tried move to it: exit 5 no longer shares its steps with an @auto row at 8
    policy.budget_s = plan * step_s([2, 5, 5, 5])
    assert policy.choose([2], [8, 5], 0, 10, now=0.0) == 5
    assert policy.last == pytest.approx({d: 1000 * 1.5 * step_s([2, min(8, d), min(5, d), d]) for d in (8, 5, 2)})
    # arrivals every 10 ms with 20-token prompts: a request of 100 tokens will share its steps with max_batch rows,
    # not with one, and the steps wait for the prefills, which take busy = rate x prefill time of the clock
    policy.budget_s = plan * step_s([8, 8]) * 1.001
    assert policy.choose([8], [], 0, 100, now=0.0) == 8
    for t in (0.0, 0.01, 0.02):
        policy.arrived(t, 20)
    assert policy.rate(0.03) == pytest.approx(2 / 0.03) and policy.prompt == 20
    assert policy.choose([8], [], 0, 100, now=0.03) < 8
    busy = {d: 2 / 0.03 * 1e-10 * 20 * token(d) for d in (8, 5, 2)}
    assert policy.last == pytest.approx({d: 1000 * 1.5 * step_s([8] + [d] * 5) / (1 - busy[d]) for d in (8, 5, 2)})
    policy.gamma = 1e-5  # prefills that would take all of the time: no exit keeps the budget
    assert policy.choose([8], [], 0, 100, now=0.03) == 2 and policy.last[8] == float("inf")


def test_auto_request_served_at_the_chosen_exit(server, monkeypatch):
    engine = server["engine"]
    monkeypatch.setattr(engine.policy, "budget_s", 1e-9)  # no exit keeps it: the shallowest
    r = server["client"].completions.create(model="tiny@auto", prompt=PROMPTS[0], max_tokens=4, temperature=0)
    assert r.model == "tiny@1" and r.choices[0].text == reference(server["tok"], PROMPTS[0], 1, 4)[0]
    metrics = call(server["port"], "/metrics")[1]
    assert 'balcony_auto_decisions{exit="1"} 1' in metrics and "balcony_auto_predicted_tpot_ms" in metrics


def test_demoted_row_continues_exactly_at_the_shallower_exit():
    # an @auto row admitted at full depth; then no step keeps the budget: it moves to exit 3, and DEMOTE_EVERY steps
    # later to exit 1, each time without a prefill. Its tokens must be full depth's, then exit 3's on the prefix so
    # far, then exit 1's: generate() on prompt + tokens so far at each exit
    import serve
    full = serve.DEMOTE_EVERY + 2  # tokens at full depth: the prefill's, then enough steps to measure
    events, n = [], full + serve.DEMOTE_EVERY + 3
    engine = Engine(untrained_2(), max_batch=3, max_seq=MAX_SEQ, queue_size=4, stop_ids=[], tpot_s=None)
    other = Request(PROMPTS[1], 3, n + 4, post=lambda *e: None)  # a fixed-exit row: it never moves
    req = Request(PROMPTS[0], "auto", n, post=lambda kind, value: events.append((kind, value)))
    for r in (other, req):
        engine.queue.put(r)
        engine.admit()
    assert req.depth == 4 and [r.depth for r in engine.rows] == [4, 3]
    engine.policy.budget_s = 1e-9
    for _ in range(full - 1):
        assert req.depth == 4  # no move before DEMOTE_EVERY step times are measured
        engine.demote()
        engine.step()
    backbone = []  # a move runs no backbone layer: the new balcony's KV comes from the hidden states kept
    hook = engine.model.model.layers[0].register_forward_hook(lambda *_: backbone.append(1))
    engine.demote()
    hook.remove()
    assert req.depth == 3 and [r.depth for r in engine.rows] == [3, 3] and not backbone
    for k in range(1, serve.DEMOTE_EVERY + 1):  # the next move waits DEMOTE_EVERY steps
        engine.step()
        engine.demote()
        assert req.depth == (1 if k == serve.DEMOTE_EVERY else 3) and other.depth == 3
    while not req.done:
        engine.step()
        engine.demote()  # at the shallowest exit already: nothing moves
    assert engine.stats["demoted"] == 2 and [r.depth for r in engine.rows] == [3]
    tokens = [v for k, v in events if k == "token"]
    model, want = untrained_2(), []
    for exit, k in ((None, full), (3, serve.DEMOTE_EVERY), (1, 3)):
        want += generate(model, [PROMPTS[0] + want], k, exit=exit)[0]["tokens"]
    assert tokens == want and len(set(want)) > 3  # a lively sequence, so a wrong cache would show
    assert generate(model, [PROMPTS[0]], n)[0]["tokens"] != want  # and the moves did change it


def test_auto_admission_moves_the_deeper_auto_rows_to_its_exit():
    # two @auto rows at full depth and a fixed row at exit 3; then the budget tightens and a third @auto request gets
    # exit 1: both @auto rows follow it there (no prefill), the fixed row stays, and every answer is exact
    events = {}
    engine = Engine(untrained_2(), max_batch=4, max_seq=MAX_SEQ, queue_size=4, stop_ids=[], tpot_s=None)
    reqs = [Request(PROMPTS[i], exit, 12, post=lambda kind, value, i=i: events.setdefault(i, []).append((kind, value)))
            for i, exit in enumerate(["auto", "auto", 3, "auto"])]
    for r in reqs[:3]:
        engine.queue.put(r)
        engine.admit()
    for _ in range(3):
        engine.step()
    assert [r.depth for r in engine.rows] == [4, 4, 3]
    engine.policy.budget_s = 1e-9
    engine.queue.put(reqs[3])
    engine.admit()
    assert [r.depth for r in reqs] == [1, 1, 3, 1] and engine.stats["demoted"] == 2
    while engine.rows:
        engine.step()
    model = untrained_2()
    for i, r in enumerate(reqs):
        tokens = [v for k, v in events[i] if k == "token"]
        if i < 2:  # four tokens at full depth (the prefill's and three steps'), then exit 1 on the prefix so far
            want = generate(model, [PROMPTS[i]], 4)[0]["tokens"]
            want += generate(model, [PROMPTS[i] + want], 8, exit=1)[0]["tokens"]
        else:
            want = generate(model, [PROMPTS[i]], 12, exit=r.depth)[0]["tokens"]
        assert tokens == want


def test_quantize_int4_serves_the_int4_model(tmp_path):
    # serve.py --quantize int4: the engine decodes with int4 layers (int8 balconies), and its greedy text at an exit
    # and at full depth is generate()'s on the same int4 model
    from quantize import WeightOnlyInt4Linear, WeightOnlyInt8Linear
    from serve import get_parser, load
    ckpt = make_tiny_checkpoint(tmp_path / "tiny")
    BalconyModel(Transformer.from_checkpoint(ckpt), [1, 3]).save_exits(ckpt / "balcony.safetensors")
    args = get_parser().parse_args(["--checkpoint", str(ckpt), "--quantize", "int4"])
    model, tok, name = load(args)
    assert isinstance(model.model.layers[0].attention.wq, WeightOnlyInt4Linear)
    assert isinstance(model.exits["3"].layer.attention.wq, WeightOnlyInt8Linear)
    ref_model = load(args)[0]
    with running(Engine(model, max_batch=2, max_seq=MAX_SEQ, queue_size=2, stop_ids=tok.stop_ids), tok, name) as s:
        for model_id, exit in ((f"{name}@3", 3), (name, None)):
            r = s["client"].completions.create(model=model_id, prompt=PROMPTS[0], max_tokens=8, temperature=0)
            ref = generate(ref_model, [PROMPTS[0]], 8, exit=exit, eos_id=tok.stop_ids)[0]["tokens"]
            assert r.choices[0].text == tok.decode([t for t in ref if t not in tok.stop_ids])


def test_ctrl_c_drains_the_streams_in_flight(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "tiny")
    BalconyModel(Transformer.from_checkpoint(ckpt), [1, 3]).save_exits(ckpt / "balcony.safetensors")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--checkpoint", str(ckpt), "--port", str(port),
                             "--max-seq", "256"], stderr=subprocess.PIPE, text=True)
    for _ in range(300):
        try:
            assert "tiny@3" in call(port, "/v1/models")[1]
            break
        except OSError:
            time.sleep(0.1)
    r, conn = call(port, "/v1/completions", dict(model="tiny@3", prompt=PROMPTS[0], max_tokens=200, temperature=0,
                                                  stream=True), stream=True)
    assert r.readline().startswith(b"data: ")
    proc.send_signal(signal.SIGINT)  # Ctrl-C while it streams: the stream still ends properly, then the server
    events = [line for line in r.read().decode().splitlines() if line]
    conn.close()
    assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert proc.wait(30) == 0 and "Traceback" not in proc.stderr.read()

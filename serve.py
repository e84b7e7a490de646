"""
An OpenAI-compatible server whose exits follow the load: the paper's dynamic inference (sections 1 and 3: "in cloud
computing, we can select exit layers depending on the query-per-second rate"), live.

A loop and a queue, as vLLM's and llama.cpp's servers are. FastAPI routes validate a request and put it on a bounded
queue (full: 429). One engine, in the main thread (HTTP has its own), owns the model and its KV caches, allocated
once for --max-batch rows and --max-seq positions, and loops: admit one waiting request into a free row (its
prefill, which gives its first token; an @auto one may move the @auto rows shallower), run one decode step for every
active row, move an @auto row shallower if the steps are slower than the budget, retire the rows that finished or
whose client left. Rows keep generate.py's layout, deepest exit first, so each layer's cache holds a prefix of the
rows and one forward (forward_rows) serves a batch of mixed exits; a new row is slotted in after the rows at least as
deep as it, the shallower rows' cache rows moving down one in the layers it runs.

Model ids: `<name>` is full depth, `<name>@15` a trained exit, `<name>@auto` lets the server choose. Every response's
`model` names the exit that served it (`<name>@18`, or `<name>` for full depth) and `exit` gives its layer.

The @auto policy. The operator sets a budget, --tpot-ms, the time per output token a request should see. A decode
step reads each weight it runs once, however many rows use it, and multiplies it by every row that reaches it, so
the engine models a step's time as alpha * (weights the step reads) + beta * (sum over rows of the weights a token
at that row's exit reads), and a prefill's as gamma * tokens * (the weights a token at its exit reads), timed at
startup (full depth: one row, --max-batch rows, a 32-token prefill) and kept up to date as the server runs (a speed
factor, the time between decode steps less the prefills in it over the predicted step; gamma from each prefill).
Prefills stall every row, so arrivals at rate r spend busy = r * prefill time of the clock and a decoding row waits
step / (1 - busy) a token. When an @auto
request is admitted, the controller predicts that time for each exit d, deepest first, in the batch the request will
live in (the fixed-exit rows, the @auto rows decoding now at d if deeper, itself, the queued requests that will fill
free rows and, by Little's law, as many rows as the measured arrival rate times its lifetime if that is more, the new
ones at d), gives it the deepest exit whose prediction is within HEADROOM of the budget (bursts of Poisson arrivals
go past the mean), or the shallowest, and moves the deeper @auto rows to it: @auto is a level its rows follow, since
the deepest row sets every row's step. Between admissions, while the measured time between decode steps is past the
budget, the deepest @auto row moves one exit shallower, once every DEMOTE_EVERY steps at most (Engine.demote). A
move keeps the row's caches exact without a prefill (Engine.move): its KV in layers 1..exit stays, and the new exit's
balcony makes its KV from the row's hidden states after layer exit, which the engine keeps for every row
(Engine.hidden). A row never moves deeper (its skipped layers have no KV). Decisions are logged and counted in
GET /metrics.

    python serve.py --quantize int4 --quantize-head int8 --tpot-ms 40   # http://127.0.0.1:8000/v1
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "smollm2-135m-instruct@auto", "messages": [{"role": "user", "content": "Hi!"}]}'
"""
import argparse
import asyncio
import json
import logging
import queue
import signal
import statistics
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn as nn

from balcony import BalconyModel
from cascade import bytes_per_token, nbytes
from cli import DEFAULT_CHECKPOINT, DTYPES, UsageError, add_device_args, default_dtype, quant_kwargs, run_cli
from generate import check_request, compact_caches, exit_plan, forward_rows, prepare_head, sample
from model import KVCache

log = logging.getLogger("serve")
WINDOW = 32  # decode steps the engine's measures look back over: time between steps (mean), speed factor (median)
DEMOTE_EVERY = 16  # decode steps between two moves of @auto rows to a shallower exit (Engine.demote)
HEADROOM = 0.8  # @auto plans the mean time per token at this share of the budget: bursts of arrivals stay within it
ARRIVALS = 16  # the window of arrivals that measures their rate


# ---- the engine: one thread, the model, its caches ----

@dataclass(eq=False)
class Request:
    prompt: list  # token ids
    exit: Union[int, str]  # a depth (n_layers: full depth) or "auto"
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None
    ignore_eos: bool = False  # vLLM's extension for load tests: always max_tokens tokens
    post: Callable = print  # post(kind, value), thread-safe: "start" (depth), "token" (id), "done" (finish reason)
    cancelled: bool = False  # set by the route (client gone, stop string seen); the engine frees the row next step
    depth: int = 0  # the exit that serves it: chosen at admission; an @auto row's may move shallower (Engine.move)
    out: list = field(default_factory=list)  # the tokens it has generated
    pos: int = 0  # the position of cur
    slot: int = 0  # its row of Engine.hidden, kept while it decodes (its batch row changes as others come and go)
    done: bool = False
    generator: Optional[torch.Generator] = None

    @property
    def cur(self) -> int:  # its newest token, not yet in the caches
        return self.out[-1]

    @property
    def n_out(self) -> int:
        return len(self.out)


class CacheRows(KVCache):
    """Rows start.. of a KVCache as a KVCache of their own, sharing its buffers: a forward on one row writes row
    `start` of the real cache, so a request's prefill lands in its own row while the batch's other rows stay put."""

    def __init__(self, cache: KVCache, start: int, length: int):
        nn.Module.__init__(self)
        self.register_buffer("k_cache", cache.k_cache[start:], persistent=False)
        self.register_buffer("v_cache", cache.v_cache[start:], persistent=False)
        self.length = length


class AutoPolicy:
    """@auto's controller (the module docstring says why it is shaped so): the deepest exit whose predicted time per
    output token, under the load measured, keeps HEADROOM x the budget."""

    def __init__(self, model: BalconyModel, budget_s: Optional[float], alpha: float, beta: float, gamma: float,
                 max_batch: int):
        self.model, self.budget_s, self.max_batch = model, budget_s, max_batch
        self.alpha, self.beta, self.gamma = alpha, beta, gamma  # the step model's and the prefill model's costs
        self.ladder = [model.n_layers, *model.exit_layers[::-1]]  # deepest first
        self.layer = nbytes(model.model.layers[0])
        self.token = {d: bytes_per_token(model, d) for d in self.ladder}  # the weights a token at exit d reads
        self.head = nbytes(model.model.output)
        self.ratios = deque(maxlen=WINDOW)  # measured times a decode step takes over the step model's predictions
        self.speed = 1.0  # their median: one step held up (a pause, a burst of HTTP work) does not move it
        self.arrivals = deque(maxlen=ARRIVALS)  # the latest arrival times
        self.prompt = 0.0  # prompt tokens per request, a running mean
        self.decisions = {d: 0 for d in self.ladder}
        self.last = {}  # the latest decision's predicted ms per token, by exit

    def step_s(self, depths: list) -> float:
        """Predicted seconds of one decode step on rows at these depths, before the speed factor."""
        # layers 1..deepest, each exit's balcony, and the head once (forward_rows runs it on every row together)
        balconies = sum(self.token[d] - self.layer * d - self.head for d in set(depths))
        read = self.layer * max(depths) + balconies + self.head
        return self.alpha * read + self.beta * sum(self.token[d] for d in depths)

    def prefill_s(self, exit: int, tokens: float) -> float:
        """Predicted seconds of a prefill of `tokens` tokens at `exit`: compute-bound, so per token and byte run."""
        return self.gamma * tokens * self.token[exit]

    def observe_step(self, depths: list, seconds: float):
        self.ratios.append(seconds / self.step_s(depths))
        self.speed = statistics.median(self.ratios)

    def observe_prefill(self, exit: int, tokens: int, seconds: float):
        self.gamma += 0.2 * (seconds / (tokens * self.token[exit]) - self.gamma)

    def arrived(self, now: float, prompt_tokens: int):
        self.prompt += (prompt_tokens - self.prompt) / min(len(self.arrivals) + 1, ARRIVALS)
        self.arrivals.append(now)

    def rate(self, now: float) -> float:
        """Arrivals per second over the window of the latest ARRIVALS (it decays when they stop)."""
        return (len(self.arrivals) - 1) / (now - self.arrivals[0]) if len(self.arrivals) > 1 else 0.0

    def predict_ms(self, fixed: list, auto: list, exit: int, joining: int, tokens: int, now: float) -> float:
        lam = self.rate(now)
        busy = lam * self.prefill_s(exit, self.prompt)  # the share of the time spent prefilling the arrivals
        if busy >= 1:
            return float("inf")
        rows = fixed + [min(d, exit) for d in auto] + [exit] * (1 + joining)  # @auto rows follow it down
        s = self.speed * self.step_s(rows) / (1 - busy)
        while len(rows) < self.max_batch and round(lam * tokens * s) > len(rows):
            rows.append(exit)  # Little's law: arrivals keep rate x lifetime rows in the batch; more rows, longer lives
            s = self.speed * self.step_s(rows) / (1 - busy)
        return 1000 * s

    def choose(self, fixed: list, auto: list, joining: int, tokens: int, now: float) -> int:
        """The exit for a request of at most `tokens` new tokens joining rows at depths `fixed` (fixed exits) and
        `auto` (@auto rows, which move to its exit if deeper), with `joining` queued requests right behind it."""
        self.last = {d: self.predict_ms(fixed, auto, d, joining, tokens, now) for d in self.ladder}
        ok = [d for d in self.ladder if self.budget_s is None or self.last[d] <= 1000 * HEADROOM * self.budget_s]
        choice = ok[0] if ok else self.ladder[-1]
        self.decisions[choice] += 1
        log.info("@auto: exit %d (predicted ms/token %s, budget %s, %.2f req/s, speed x%.2f, %d rows, %d joining)",
                 choice, {d: round(ms, 1) for d, ms in self.last.items()},
                 "none" if self.budget_s is None else f"{1000 * self.budget_s:g} ms", self.rate(now), self.speed,
                 len(fixed) + len(auto), joining)
        return choice


class Engine:
    """The decode loop (module docstring): one thread that owns the model and its caches."""

    def __init__(self, model: BalconyModel, max_batch: int, max_seq: int, queue_size: int, stop_ids,
                 tpot_s: Optional[float] = None):
        self.model, self.max_batch, self.max_seq, self.stop_ids = model, max_batch, max_seq, set(stop_ids)
        self.device = model.model.tok_embeddings.weight.device
        self.cache_exits = [None, *model.exit_layers]
        model.setup_caches(max_batch, max_seq, exits=self.cache_exits)  # once: every layer, every balcony
        prepare_head(model)
        self.queue = queue.Queue(queue_size)
        self.rows = []  # active requests, deepest exit first
        self.stats = dict(steps=0, tokens=0, admitted=0, finished=0, cancelled=0, errors=0, demoted=0)
        self.served = {d: 0 for d in [model.n_layers, *model.exit_layers]}  # requests admitted at each exit
        self.intervals, self.last_step_end, self.last_demotion = deque(maxlen=WINDOW), None, -DEMOTE_EVERY
        self.prefilling = self.moving = 0.0  # seconds of prefills and of moves since the last decode step ended
        # each row's hidden states after every exit layer, at every position it has: a move to a shallower exit
        # makes the new balcony's KV from them (Engine.move). Written by a hook on those layers while `tap` says
        # which slots and positions the forward runs (None: no request's)
        like = model.model.tok_embeddings.weight
        self.hidden = {e: like.new_zeros(max_batch, max_seq, model.model.args.dim) for e in model.exit_layers}
        self.tap = None
        for e in model.exit_layers:
            model.model.layers[e - 1].register_forward_hook(self.keep_hidden(e))
        self.policy = AutoPolicy(model, tpot_s, *self.calibrate(), max_batch)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, name="engine", daemon=True)

    def keep_hidden(self, e: int):
        def hook(layer, inputs, x):  # x: (rows reaching layer e, T, D), a prefix of the forward's rows
            if self.tap is not None:
                slots, pos = self.tap
                self.hidden[e][slots[:len(x)], pos[:len(x)]] = x
        return hook

    @torch.no_grad()
    def calibrate(self) -> tuple:
        """(alpha, beta) of AutoPolicy's step model, from full-depth decode steps on 1 and max_batch rows, and gamma
        of its prefill model, from a full-depth prefill of 32 tokens."""
        n, w = self.model.n_layers, bytes_per_token(self.model, self.model.n_layers)

        def timed(B, T):  # the fastest of 7 calls after one to warm up: what else runs on the machine only slows it
            idx, pos = torch.zeros(B, T, dtype=torch.long, device=self.device), torch.arange(T, device=self.device)
            ts = []
            for _ in range(8):
                t = time.perf_counter()
                forward_rows(self.model, idx, pos.expand(B, T), exit_plan([n] * B))
                ts.append(time.perf_counter() - t)
            return min(ts[1:])

        self.reach(32)
        prefill, one, full = timed(1, 32), timed(1, 1), timed(self.max_batch, 1)
        beta = max(full - one, 0.0) / max(self.max_batch - 1, 1) / w
        alpha = max(one / w - beta, 0.0)
        log.info("engine: full-depth step %.1f ms at 1 row, %.1f ms at %d rows; prefill %.1f ms for 32 tokens",
                 1000 * one, 1000 * full, self.max_batch, 1000 * prefill)
        return alpha, beta, prefill / (32 * w)

    @property
    def interval_s(self) -> Optional[float]:
        """The mean time between the last WINDOW decode steps, moves left out: what a decoding row waits a token,
        prefills included (None before two steps)."""
        return sum(self.intervals) / len(self.intervals) if self.intervals else None

    def reach(self, length: int):
        # attention reads `length` cache slots: what the rows can see, not all --max-seq of them
        self.model.setup_caches(self.max_batch, max(length, 1), exits=self.cache_exits)

    def submit(self, req: Request):
        self.queue.put_nowait(req)  # queue.Full: the route answers 429
        self.policy.arrived(time.perf_counter(), len(req.prompt))

    def start(self):
        """The loop in a thread of its own (the tests; serve.py runs it in the main thread, main())."""
        self.thread.start()

    def stop(self):
        """Cancel what is still waiting or decoding and end the loop."""
        self.stopping.set()
        self.thread.join()

    def run(self):
        with torch.no_grad():
            while not self.stopping.is_set():
                try:
                    self.admit()
                    if self.rows:
                        self.step()
                        self.demote()
                except Exception:  # a bug, not a bad request (routes check those): fail the batch, keep serving
                    log.exception("engine step failed; failing %d requests", len(self.rows))
                    self.stats["errors"] += 1
                    for r in self.rows:
                        r.post("error", "the engine failed on this batch")
                    self.rows = []
        for r in self.rows + [self.queue.get_nowait() for _ in range(self.queue.qsize())]:
            r.post("error", "the server is shutting down")

    def admit(self):
        # one prefill between decode steps: it stalls every row, so one at a time keeps the stall short
        if len(self.rows) >= self.max_batch:
            return
        try:
            req = self.queue.get(timeout=0.05) if not self.rows else self.queue.get_nowait()
        except queue.Empty:
            return
        if req.cancelled:
            return
        if req.exit == "auto":  # its exit is the level every @auto row follows: the deeper ones move to it
            req.depth = self.policy.choose([r.depth for r in self.rows if r.exit != "auto"],
                                           [r.depth for r in self.rows if r.exit == "auto"],
                                           min(self.queue.qsize(), self.max_batch - len(self.rows) - 1),
                                           req.max_tokens, time.perf_counter())
            for r in [r for r in self.rows if r.exit == "auto" and r.depth > req.depth]:
                self.move(r, req.depth, "a new @auto request's exit")
        else:
            req.depth = req.exit
        req.slot = min(set(range(self.max_batch)) - {r.slot for r in self.rows})
        req.pos = len(req.prompt)
        t = time.perf_counter()
        logits = self.place(req, lambda: self.prefill(req))
        t = time.perf_counter() - t
        self.prefilling += t
        self.policy.observe_prefill(req.depth, req.pos, t)
        if req.seed is not None:
            req.generator = torch.Generator(self.device).manual_seed(req.seed)
        self.served[req.depth] += 1
        self.stats["admitted"] += 1
        req.post("start", req.depth)
        self.emit(req, self.sample(logits, [req])[0])
        self.retire()

    def place(self, req: Request, write: Callable):
        """Slot req into the batch at its depth, after every row at least as deep, and call write(), which fills its
        KV rows (layers 1..depth and its balcony) through views of the caches that start at them; returns what write
        returns."""
        depths = [r.depth for r in self.rows]
        d, n, T = req.depth, self.model.n_layers, req.pos
        p = sum(x >= d for x in depths)  # its batch row
        used = max((r.pos for r in self.rows), default=0)  # cache slots holding the rows' tokens
        layers = [layer.attention for layer in self.model.model.layers[:d]]
        for j, att in enumerate(layers):  # make room: the shallower rows reaching layer j move down one
            reach = sum(x > j for x in depths)
            for buf in (att.kv_cache.k_cache, att.kv_cache.v_cache):
                buf[p + 1:reach + 1, :, :used] = buf[p:reach, :, :used].clone()
        views = [(att, p) for att in layers]
        if d < n and self.model.kind != "mlp":  # balcony d's cache holds the rows exiting at d: it goes last there
            views.append((self.model.exits[str(d)].layer.attention, depths.count(d)))
        caches = [att.kv_cache for att, _ in views]
        try:
            for att, start in views:
                att.kv_cache = CacheRows(att.kv_cache, start, T)
            out = write()
        finally:
            for (att, _), c in zip(views, caches):
                att.kv_cache = c
        self.rows.insert(p, req)
        return out

    def prefill(self, req: Request):
        """place()'s write for a new request: its prompt through layers 1..depth and its exit; the last logits."""
        T = req.pos
        pos = torch.arange(T, device=self.device)[None]
        self.tap = torch.tensor([[req.slot]], device=self.device), pos
        try:
            return forward_rows(self.model, torch.tensor([req.prompt], device=self.device), pos, exit_plan([req.depth]))
        finally:
            self.tap = None

    def backfill(self, req: Request, kept: list):
        """place()'s write for a row moved to a shallower exit: layers 1..depth get back the KV they held (`kept`),
        and the new exit's balcony makes its KV from the row's kept hidden states after layer depth: one layer's
        prefill, not depth + 1 of them."""
        d, T = req.depth, req.pos
        for layer, (k, v) in zip(self.model.model.layers[:d], kept):
            layer.attention.kv_cache.k_cache[0, :, :T] = k
            layer.attention.kv_cache.v_cache[0, :, :T] = v
        self.model.exit_hidden(d, self.hidden[d][req.slot, :T][None], torch.arange(T, device=self.device)[None])

    def demote(self):
        """@auto's second lever, for load that rises between admissions: while the measured time per decode step (the
        mean over the last WINDOW steps, prefills included, once there are DEMOTE_EVERY of them since the engine was
        last idle: the first steps of a busy spell are slow) is past the budget, the deepest @auto row moves to the
        next shallower exit, at most once per DEMOTE_EVERY steps so that the mean can show what a move did."""
        p = self.policy
        if (p.budget_s is None or not self.rows or len(self.intervals) < DEMOTE_EVERY or self.interval_s <= p.budget_s
                or self.stats["steps"] - self.last_demotion < DEMOTE_EVERY):
            return
        req = next((r for r in self.rows if r.exit == "auto" and r.depth != p.ladder[-1]), None)
        if req is not None:
            self.move(req, p.ladder[p.ladder.index(req.depth) + 1],
                      f"{1000 * self.interval_s:.1f} ms a step, budget {1000 * p.budget_s:g} ms")

    def move(self, req: Request, new: int, why: str):
        """Move a decoding row to the shallower exit `new`. Its KV stays exact and costs no prefill: it leaves the
        caches as a finished row does, keeping its KV in layers 1..new, which it takes back at its new place in the
        batch, and balcony `new` makes its KV from the hidden states the row had after layer `new` (backfill). A row
        never moves deeper: its skipped layers have no KV."""
        t, i = time.perf_counter(), self.rows.index(req)
        kept = [tuple(buf[i, :, :req.pos].clone() for buf in (layer.attention.kv_cache.k_cache,
                                                               layer.attention.kv_cache.v_cache))
                for layer in self.model.model.layers[:new]]  # its KV in the layers it keeps (batch row i in each)
        self.reach(max(r.pos for r in self.rows))  # compaction copies the slots the rows filled
        compact_caches(self.model, [r.depth for r in self.rows], [j for j in range(len(self.rows)) if j != i])
        del self.rows[i]
        old, req.depth = req.depth, new
        self.place(req, lambda: self.backfill(req, kept))
        self.moving += time.perf_counter() - t  # not the load's: counted as load, it would drive more moves
        self.last_demotion = self.stats["steps"]
        self.stats["demoted"] += 1
        log.info("@auto: a row moves from exit %d to %d after %d tokens (%s)", old, new, req.n_out, why)

    def step(self):
        rows = self.rows
        self.reach(max(r.pos for r in rows) + 1)
        cur = torch.tensor([[r.cur] for r in rows], device=self.device)
        pos = torch.tensor([[r.pos] for r in rows], device=self.device)
        depths = [r.depth for r in rows]
        start, self.tap = time.perf_counter(), (torch.tensor([[r.slot] for r in rows], device=self.device), pos)
        try:
            logits = forward_rows(self.model, cur, pos, exit_plan(depths))
        finally:
            self.tap = None
        for r, t in zip(rows, self.sample(logits, rows)):
            r.pos += 1
            self.emit(r, t)
        now = time.perf_counter()
        if self.last_step_end is None:  # the first step of a busy spell
            self.policy.observe_step(depths, now - start)
        else:  # since the previous step, moves left out: what a decoding row waits, prefills included
            interval = now - self.last_step_end - self.moving
            self.intervals.append(interval)
            # the speed factor takes in all but the prefills (the policy counts those as busy): the HTTP thread,
            # sampling, the engine's own work between steps, other processes
            self.policy.observe_step(depths, interval - self.prefilling)
        self.last_step_end, self.prefilling, self.moving = now, 0.0, 0.0
        self.stats["steps"] += 1
        self.retire()

    def sample(self, logits, rows: list) -> list:
        # (B, vocab) -> one token per row, each with its own temperature, top_p and seed
        tokens = logits.argmax(-1).tolist()
        for i, r in enumerate(rows):
            if r.temperature > 0:
                tokens[i] = sample(logits[i:i + 1], r.temperature, top_p=r.top_p, generator=r.generator)[0].item()
        return tokens

    def emit(self, r: Request, token: int):
        r.out.append(token)
        self.stats["tokens"] += 1
        r.post("token", token)
        stop = token in self.stop_ids and not r.ignore_eos
        if stop or r.n_out == r.max_tokens:
            r.done = True
            r.post("done", "stop" if stop else "length")

    def retire(self):
        keep = [i for i, r in enumerate(self.rows) if not (r.done or r.cancelled)]
        if len(keep) == len(self.rows):
            return
        self.stats["finished"] += sum(r.done for r in self.rows)
        self.stats["cancelled"] += sum(r.cancelled and not r.done for r in self.rows)
        if keep:
            self.reach(max(r.pos for r in self.rows))  # compaction copies the slots the rows filled
            compact_caches(self.model, [r.depth for r in self.rows], keep)
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:  # idle from here: the next busy spell is measured afresh
            self.last_step_end = None
            self.intervals.clear()

    def metrics(self) -> str:
        """Prometheus text: load, queue, what @auto decided and why."""
        p = self.policy
        gauges = dict(self.stats, rows_active=len(self.rows), queue_depth=self.queue.qsize(), max_batch=self.max_batch,
                      steps_per_s=1 / self.interval_s if self.interval_s else 0.0, speed_factor=p.speed,
                      arrivals_per_s=p.rate(time.perf_counter()), prefill_ms_per_token=1000 * p.prefill_s(
                          p.ladder[0], 1), tpot_budget_ms=1000 * (p.budget_s or 0.0))
        lines = [f"balcony_{name} {value:g}" for name, value in gauges.items()]
        lines += [f'balcony_requests_by_exit{{exit="{d}"}} {c}' for d, c in self.served.items()]
        lines += [f'balcony_auto_decisions{{exit="{d}"}} {c}' for d, c in p.decisions.items()]
        lines += [f'balcony_auto_predicted_tpot_ms{{exit="{d}"}} {ms:.2f}' for d, ms in p.last.items()]
        return "\n".join(lines) + "\n"


# ---- the routes: validate, enqueue, stream what the engine posts ----

class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param=None, code=None) -> dict:
    kind = {404: "not_found_error", 429: "rate_limit_error"}.get(status, "invalid_request_error" if status < 500
                                                                 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def make_app(engine: Engine, tokenizer, name: str):
    """The FastAPI app in front of a started engine: OpenAI's /v1/models, /v1/completions, /v1/chat/completions."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from pydantic import BaseModel, Field

    model, context = engine.model, engine.max_seq
    n = model.n_layers
    ids = {name: n, f"{name}@auto": "auto", **{f"{name}@{e}": e for e in model.exit_layers}}

    class Common(BaseModel):
        model: str
        max_tokens: Optional[int] = None
        max_completion_tokens: Optional[int] = None
        temperature: float = Field(1.0, ge=0, le=2)
        top_p: float = Field(1.0, gt=0, le=1)
        seed: Optional[int] = None
        stop: Union[str, list[str], None] = None
        n: int = Field(1, ge=1, le=1)
        stream: bool = False
        stream_options: Optional[dict] = None
        ignore_eos: bool = False

    class Message(BaseModel):
        role: str
        content: str

    class ChatRequest(Common):
        messages: list[Message] = Field(min_length=1)

    class CompletionRequest(Common):
        prompt: Union[str, list[int]]

    app = FastAPI(title="balcony")

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return JSONResponse(error_body(e.status, e.message, e.param, e.code), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):
        errs = e.errors()
        if any(err["type"] == "json_invalid" for err in errs):
            return JSONResponse(error_body(400, "the body is not valid JSON"), status_code=400)
        err = errs[0]
        param = ".".join(str(x) for x in err["loc"][1:]) or None
        return JSONResponse(error_body(422, f"{param}: {err['msg']}" if param else err["msg"], param),
                            status_code=422)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": i, "object": "model", "created": 0, "owned_by": "balcony"}
                                           for i in ids]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics())

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        prompt = body.prompt if isinstance(body.prompt, list) else tokenizer.encode(body.prompt,
                                                                                    bos=tokenizer.add_bos)
        return await serve(body, prompt, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        try:
            prompt = tokenizer.encode_chat([m.model_dump() for m in body.messages])
        except UsageError as e:  # a tokenizer with no chat format
            raise APIError(400, str(e), "messages") from None
        return await serve(body, prompt, chat=True)

    async def serve(body: Common, prompt: list, chat: bool):
        if body.model not in ids:
            base, _, exit = body.model.partition("@")
            hint = (f"exit {exit} has no trained balcony" if base == name and exit else f"unknown model {body.model!r}")
            raise APIError(404, f"{hint}; this server has {', '.join(ids)}", "model", "model_not_found")
        max_tokens = body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
        if max_tokens is None:
            max_tokens = max(context - len(prompt), 1) if chat else 16  # OpenAI's defaults
        if max_tokens < 1:
            raise APIError(422, f"max_tokens must be at least 1, not {max_tokens}", "max_tokens")
        if any(not 0 <= t < model.model.args.vocab_size for t in prompt):
            raise APIError(400, f"prompt token ids must be in 0..{model.model.args.vocab_size - 1}", "prompt")
        try:
            check_request(len(prompt), max_tokens, context)
        except UsageError as e:
            raise APIError(400, str(e), "messages" if chat else "prompt",
                           "context_length_exceeded" if prompt else None) from None
        events, loop = asyncio.Queue(), asyncio.get_running_loop()
        req = Request(prompt, ids[body.model], max_tokens, body.temperature, body.top_p, body.seed,
                      body.ignore_eos, lambda kind, value: loop.call_soon_threadsafe(events.put_nowait, (kind, value)))
        try:
            engine.submit(req)
        except queue.Full:
            raise APIError(429, f"the server is busy: {engine.max_batch} requests decoding and {engine.queue.maxsize}"
                                f" waiting; retry later", code="rate_limit_exceeded") from None
        try:
            kind, depth = await events.get()  # ("start", its exit) once admitted
        except asyncio.CancelledError:
            req.cancelled = True
            raise
        if kind == "error":
            raise APIError(500, depth)
        rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
        stops = [s for s in ([body.stop] if isinstance(body.stop, str) else body.stop or []) if s]

        def head():  # the exit serving it now: an @auto request may have moved shallower since (Engine.demote)
            return dict(id=rid, created=created, model=name if req.depth == n else f"{name}@{req.depth}",
                        exit=req.depth)

        def usage():
            return {"prompt_tokens": len(prompt), "completion_tokens": req.n_out,
                    "total_tokens": len(prompt) + req.n_out}

        def choice(text, finish, stream):
            if not chat:
                return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            if stream:
                return {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}
            return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}

        if not body.stream:
            parts, finish = [], None
            try:
                async for text, finish in deltas(req, events, stops):
                    parts.append(text)
            finally:
                req.cancelled = not req.done  # the client left before the end: free the row
            return JSONResponse({**head(), "object": "chat.completion" if chat else "text_completion",
                                 "choices": [choice("".join(parts), finish, False)], "usage": usage()},
                                headers={"x-balcony-exit": str(req.depth)})

        obj = "chat.completion.chunk" if chat else "text_completion"
        with_usage = bool((body.stream_options or {}).get("include_usage"))

        async def sse():
            try:
                if chat:
                    first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                    yield f"data: {json.dumps({**head(), 'object': obj, 'choices': [first]})}\n\n"
                async for text, finish in deltas(req, events, stops):
                    if text or finish:
                        chunk = {**head(), "object": obj, "choices": [choice(text, finish, True)]}
                        yield f"data: {json.dumps(chunk)}\n\n"
                if with_usage:
                    yield f"data: {json.dumps({**head(), 'object': obj, 'choices': [], 'usage': usage()})}\n\n"
            except APIError as e:  # the headers are gone: the error travels as an event, as OpenAI's do
                yield f"data: {json.dumps(error_body(e.status, e.message))}\n\n"
            finally:  # also when the client disconnects mid-stream (the task is cancelled): free its row
                req.cancelled = not req.done
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"x-balcony-exit": str(depth)})  # at admission: sent before any token

    async def deltas(req: Request, events: asyncio.Queue, stops: list):
        """The request's text as it grows, as (new text, None) pieces and a last (text, finish reason). A stop string
        ends it early (its rows are freed); text that could be the start of one is held back until it cannot."""
        ids_, sent, hold = [], 0, max(map(len, stops), default=1) - 1
        while True:
            kind, value = await events.get()
            if kind == "error":
                raise APIError(500, value)
            if kind == "done":
                text = tokenizer.decode(ids_)
                yield text[sent:], value
                return
            if value not in tokenizer.stop_ids:
                ids_.append(value)
            text = tokenizer.decode(ids_)
            hits = [i for i in (text.find(s) for s in stops) if i >= 0]
            if hits:
                req.cancelled = True
                yield text[sent:min(hits)], "stop"
                return
            end = len(text.rstrip("\ufffd")) - hold  # U+FFFD: part of a character whose other bytes are coming
            if end > sent:
                yield text[sent:end], None
                sent = end

    return app


def load(args) -> tuple:
    """(model with every trained exit, tokenizer, served name) for the command line."""
    from quantize import quantize_checkpoint
    from tokenizer import Tokenizer

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or default_dtype(device)]
    trained = args.balcony or (Path(args.checkpoint) / "balcony.safetensors").is_file()
    if not trained:
        log.warning("no balcony.safetensors in %s: serving full depth only (train exits with train.py)",
                    args.checkpoint)
    model = BalconyModel.from_checkpoint(args.checkpoint, args.balcony, None if trained else [None], device, dtype)
    quantize_checkpoint(model, args.checkpoint, **quant_kwargs(args))
    return model, Tokenizer.from_checkpoint(args.checkpoint), args.name or Path(args.checkpoint).resolve().name


def main(args):
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.max_batch < 1 or args.max_queue < 0:
        raise UsageError("--max-batch must be at least 1 and --max-queue at least 0")
    if args.tpot_ms is not None and args.tpot_ms <= 0:
        raise UsageError(f"--tpot-ms must be positive, not {args.tpot_ms}")
    model, tokenizer, name = load(args)
    max_seq = min(args.max_seq, model.model.args.max_seq_len)
    engine = Engine(model, args.max_batch, max_seq, args.max_queue, tokenizer.stop_ids,
                    None if args.tpot_ms is None else args.tpot_ms / 1000)
    server = uvicorn.Server(uvicorn.Config(make_app(engine, tokenizer, name), host=args.host, port=args.port,
                                           log_level="warning", timeout_graceful_shutdown=args.drain_s))

    def on_signal(*_):  # Ctrl-C: stop accepting, let the streams in flight finish for --drain-s; a second: now
        server.force_exit, server.should_exit = server.should_exit, True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    # HTTP in a thread, the decode loop in this one: torch's CPU thread pool serves the thread that first used it
    # (here, loading the model), and the same loop in another thread decoded at half the speed (int4, 2 cores: 27
    # against 49 tokens/s)
    web = threading.Thread(target=server.run, name="http")
    web.start()
    threading.Thread(target=lambda: (web.join(), engine.stopping.set()), daemon=True).start()
    log.info("serving %s on http://%s:%d/v1 (trained exits: %s)", name, args.host, args.port,
             model.exit_layers or "none")
    engine.run()  # until the HTTP server has drained and stopped
    if not server.started:
        raise UsageError(f"could not listen on {args.host}:{args.port}; is the port in use? (--port to change it)")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="converted model folder")
    p.add_argument("--balcony", default=None, help="trained exits (default: <checkpoint>/balcony.safetensors)")
    p.add_argument("--name", default=None, help="model id (default: the checkpoint folder's name)")
    p.add_argument("--host", default="127.0.0.1", help="loopback only unless you change it")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="rows decoded together (KV cache rows)")
    p.add_argument("--max-seq", type=int, default=1024, help="positions per row: prompt plus new tokens")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a row; past that, 429")
    p.add_argument("--tpot-ms", type=float, default=None,
                   help="@auto's budget: time per output token; none: @auto serves full depth")
    p.add_argument("--drain-s", type=int, default=10, help="on Ctrl-C, how long streams in flight may finish")
    add_device_args(p)
    return p


if __name__ == "__main__":
    run_cli(main, get_parser().parse_args)

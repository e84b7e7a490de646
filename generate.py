"""
Generate text from a Balcony model: a batch of prompts, each at its own exit; or one prompt at full depth with
self-speculative decoding, or token by token at the first confident exit.

Exit k (paper section 3) runs backbone layers 1..k, balcony k and the shared head; deeper layers never run for it.
Exits are nested, so a batch can mix them: every row runs layers 1..k1, the rows exiting at k1 take balcony k1, the
others go on to layers k1+1..k2, and so on; full-depth rows see the untouched model. Rows are kept sorted deepest exit
first, so the rows that reach any layer are a prefix of the batch and each layer's KV cache holds exactly those rows.

With --draft-exit d, balcony d drafts --speculate-k tokens and the full model verifies them in one forward
(LayerSkip/Kangaroo style). Draft and verifier share layers 1..d and their KV cache, so the verifier resumes from the
drafts' layer-d hidden states and runs only layers d+1..N. In fp32 greedy output is the full model's, token for
token; in bf16 the verifier's (k+1)-token forward rounds differently from one-token steps, so where two tokens' logits
are within bf16 rounding the outputs can part (tests: 23 of 24 short runs identical). Sampled output follows the full
model's distribution (speculative rejection sampling, Leviathan et al. 2023).

With --exit auto, each token leaves at the first exit whose confidence reaches --confidence (CALM's rule); tokens that
left early get their deeper KV back-filled, exactly, when a later token goes deeper (cascade.py).

    python generate.py --prompt "The capital of France is" --exit 15
    python generate.py --chat --prompt "Write a haiku about balconies." --draft-exit 15 --speculate-k 4
    python generate.py --chat --prompt "What is the capital of France?" --exit auto --confidence 0.9
"""
import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from balcony import BalconyModel
from cascade import CONFIDENCE, DEFAULT_CONFIDENCE, ConfidenceCascade
from cli import (DEFAULT_CHECKPOINT, DTYPES, Auto, UsageError, add_device_args, default_dtype, parse_exit, quant_kwargs,
                 run_cli)
from quantize import quantize_checkpoint

_compiled = False  # set by compile_steps(): compiled steps want fixed shapes, so caches are read whole


def logits_to_probs(logits, temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None):
    # logits: (..., vocab) -> probabilities in fp32 after temperature, top-k and top-p (nucleus) filtering
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -float("inf"))
    return logits.softmax(-1)


def sample(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """(B, vocab) logits -> ((B, 1) token ids, (B, vocab) probabilities, or None when greedy)."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True), None
    probs = logits_to_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator), probs


def exit_plan(depths: list) -> tuple:
    """For a batch whose rows have exit depths `depths` (deepest first; n_layers is full depth): one (depth, rows
    that reach it, rows that exit there) per distinct depth, shallowest first."""
    return tuple((d, sum(x >= d for x in depths), depths.count(d)) for d in sorted(set(depths)))


def prepare_head(model: BalconyModel):
    """fp32 on CPU: keep a transposed copy of the LM head's weight for lm_head(), made once per weight (remade if the
    weight changes, in place or by .to()). At batch 1, F.linear reads SmolLM2's 49152 x 576 head at half the speed of
    x @ its (576, 49152) transpose (22.6 against 9.7 ms, 1 thread, this machine); in bf16 the transpose is 50x slower
    (222 against 4.7 ms), so bf16 keeps F.linear. Never saved."""
    w = model.model.output.weight
    key = (w.data_ptr(), w._version, w.dtype, w.device)
    if getattr(model, "_head_key", None) != key:
        fp32_cpu = w.device.type == "cpu" and w.dtype == torch.float32
        model._head_t, model._head_key = w.detach().t().contiguous() if fp32_cpu else None, key


def lm_head(model: BalconyModel, h):
    # (..., D) normalised states -> (..., vocab) logits, from prepare_head's copy where there is one
    head_t = getattr(model, "_head_t", None)
    return model.model.output(h) if head_t is None else h @ head_t


def forward_rows(model: BalconyModel, idx, input_pos, plan, last=None):
    """The nested-exit forward of a batch. idx, input_pos: (B, T) tokens and their positions; plan: exit_plan() of
    the rows' depths; last: (B,) the position whose logits each row wants (default: the last). Each layer runs on the
    prefix of rows that reach it; each exit's rows take its balcony (or the final norm at full depth) and the head at
    one position only, all exits in one matmul. Returns (B, vocab) logits in batch order."""
    x = model.model.tok_embeddings(idx)  # (B, T, D)
    hs, prev = [], 0
    for depth, n, n_exit in plan:
        x, input_pos = model.run_layers(x[:n], prev, depth, input_pos[:n]), input_pos[:n]
        rows = slice(n - n_exit, n)  # deepest first: the rows exiting here close the prefix
        h = model.exit_hidden(depth, x[rows], input_pos[rows])  # a balcony runs on every position, to fill its cache
        hs.append(h[:, -1] if last is None else h[torch.arange(n_exit, device=h.device), last[rows]])  # (n_exit, D)
        prev = depth
    # the deepest rows come first; one head call for all of them reads its weights once a step, not once per exit
    return lm_head(model, torch.cat(hs[::-1]))


def decode_one_token(model: BalconyModel, cur, input_pos, plan):
    # cur, input_pos: (B, 1) each row's newest token and its position -> (B, vocab) logits at each row's exit
    return forward_rows(model, cur, input_pos, plan)


def draft_one_token(model: BalconyModel, cur, input_pos, exit: int, head: bool = True):
    # Layers 1..exit and balcony `exit` on one token: the layer-`exit` hidden state (B, 1, D), kept for the
    # verifier, and the draft logits (B, vocab). head=False only writes the caches (the draft logits go unused).
    h = model.run_layers(model.model.tok_embeddings(cur), 0, exit, input_pos)
    out = model.exit_hidden(exit, h, input_pos)
    return h, lm_head(model, out[:, -1]) if head else None


def verify(model: BalconyModel, h, input_pos, draft_exit: int):
    # The full model resumed at layer draft_exit: (B, T, D) layer-d hidden states -> (B, T, D) normalised states
    return model.exit_hidden(None, model.run_layers(h, draft_exit, model.n_layers, input_pos))


def compile_steps():
    """Compile the one-token steps (gpt-fast style); on CUDA they are replayed as CUDA graphs. Static shapes: each
    batch size and mix of exits gets its own graph (dynamic=False), so generate() keeps a batch's shape while its
    rows finish (they ride along, masked) and each call compiles once; dynamo allows 8 graphs per step function
    (recompile_limit), so a server sees few batch sizes and exit mixes."""
    global decode_one_token, draft_one_token, _compiled
    mode = "reduce-overhead" if torch.cuda.is_available() else "default"
    decode_one_token = torch.compile(decode_one_token, mode=mode, fullgraph=True, dynamic=False)
    draft_one_token = torch.compile(draft_one_token, mode=mode, fullgraph=True, dynamic=False)
    _compiled = True


def compact_caches(model: BalconyModel, depths: list, keep: list):
    """Drop finished rows from every KV cache. depths: the batch's exit depths (deepest first); keep: the batch
    positions that go on. Each layer's cache holds the prefix of rows that reach it and each balcony's the rows that
    exit there, so the survivors of each move up, in order (one copy per finish, not per step)."""
    keep = torch.tensor(keep)
    groups = [(model.model.layers[j].attention, 0, sum(d > j for d in depths)) for j in range(max(depths))]
    groups += [(model.exits[str(d)].layer.attention, depths.index(d), depths.count(d))
               for d in set(depths) if d < model.n_layers and model.kind not in ("mlp", "none")]  # no attention
    for att, start, n in groups:
        rows = keep[(keep >= start) & (keep < start + n)] - start
        if torch.equal(rows, torch.arange(len(rows))):
            continue  # the survivors already lead
        c = att.kv_cache
        for buf in (c.k_cache, c.v_cache):
            buf[:len(rows), :, :c.length] = buf[rows.to(buf.device), :, :c.length]  # the gather copies first


def speculative_accept(p_logits, drafts, qs, temperature=0.0, top_k=None, top_p=None, generator=None):
    """Verify k drafted tokens. p_logits: (k+1, vocab) full-model logits at the round's k+1 inputs; drafts: (k,);
    qs: (k, vocab) draft probabilities (None if greedy). Returns (n accepted, (n+1,) tokens to emit): the accepted
    drafts, then the full model's correction at the first rejection, or a bonus token if all k were accepted."""
    k = drafts.numel()
    if temperature == 0:
        target = p_logits.argmax(-1)  # (k+1,)
        n = int((drafts == target[:k]).cumprod(0).sum())
        return n, torch.cat([drafts[:n], target[n:n + 1]])
    p = logits_to_probs(p_logits, temperature, top_k, top_p)  # (k+1, vocab)
    rows = torch.arange(k, device=p.device)
    ratio = p[rows, drafts] / qs[rows, drafts]  # accept draft i with probability min(1, p_i / q_i)
    u = torch.rand(k, device=p.device, generator=generator)
    n = int((u < ratio).cumprod(0).sum())
    if n < k:  # rejected: resample from norm(max(0, p - q)), which makes the emitted token exactly p-distributed
        residual = (p[n] - qs[n]).clamp_min(0)
        last = residual if residual.sum() > 0 else p[n]  # p == q up to rounding: the residual is empty
    else:  # all accepted: a bonus token from the full model's last position
        last = p[k]
    return n, torch.cat([drafts[:n], torch.multinomial(last, 1, generator=generator)])


def per_prompt(value, n: int, name: str) -> list:
    """One value for every prompt, or a list with one per prompt."""
    if not isinstance(value, (list, tuple)):
        return [value] * n
    if len(value) != n:
        raise UsageError(f"{name} has {len(value)} entries for {n} prompts")
    return list(value)


def check_request(prompt_tokens: int, max_new_tokens: int, context: int, where: Optional[str] = None):
    """A request the model can serve: a prompt, at least one new token, and room for both in the context."""
    at = f"{where}: " if where else ""
    if prompt_tokens == 0:
        raise UsageError(f"{at}the prompt is empty")
    if max_new_tokens < 1:
        raise UsageError(f"{at}max_new_tokens must be at least 1, not {max_new_tokens}")
    if prompt_tokens + max_new_tokens > context:
        raise UsageError(f"{at}a prompt of {prompt_tokens} tokens plus {max_new_tokens} new tokens exceeds the "
                         f"model's context of {context} tokens")


@torch.no_grad()
def generate(model: BalconyModel, prompts: list, max_new_tokens, exit=None, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, eos_id=None,
             draft_exit: Optional[int] = None, speculate_k: int = 4,
             confidence: Optional[float] = None, confidence_measure: str = "prob",
             on_token: Optional[Callable[[int, int], None]] = None,
             generator: Optional[torch.Generator] = None) -> list:
    """Continue every prompt of a batch; returns one dict per prompt, in input order.

    prompts: lists of token ids, of any lengths. exit: one exit for all prompts, or a list with one per prompt
    (None or n_layers: full depth, the untouched model; k: balcony k). max_new_tokens: an int, or one per prompt. A row
    stops after its max_new_tokens or after any id in eos_id (an id or a set of ids), and costs nothing from then on.
    temperature 0 is greedy; above 0, sampling with top_k / top_p from `generator`. draft_exit (one prompt, full
    depth): self-speculative decoding drafted by balcony draft_exit, speculate_k tokens a round. exit="auto" (one
    prompt): the confidence cascade, each token from the first exit whose confidence_measure ("prob" or "margin")
    reaches `confidence` (ConfidenceCascade). on_token(i, id) is called as prompt i gets each token. KV caches are
    allocated on the first call and reused while big enough.

    Each dict: tokens (the new ids, a stop id included), exit (n_layers for full depth), prompt_tokens, prefill_s (the
    batch's prefill), decode_s (from the prefill to this row's last token), tokens_per_s (this row's decode rate);
    with draft_exit also rounds, drafted, accepted, acceptance_rate, tokens_per_round; with exit="auto" (whose exit
    is "auto") also confidence, confidence_measure, exits (each token's), avg_layers (backbone layers per token) and
    backfilled (backbone layer-positions run for earlier tokens)."""
    device = model.model.tok_embeddings.weight.device
    n, B = model.n_layers, len(prompts)
    if B == 0:
        raise UsageError("no prompts to generate from")
    exits, limits = per_prompt(exit, B, "exit"), per_prompt(max_new_tokens, B, "max_new_tokens")
    auto = "auto" in exits
    if auto:
        if B > 1:
            raise UsageError("the confidence cascade takes one prompt at a time")
        if confidence is None:
            raise UsageError("exit 'auto' needs a confidence threshold (e.g. 0.9)")
        if confidence_measure not in CONFIDENCE:
            raise UsageError(f"confidence measure {confidence_measure!r} is not one of {', '.join(CONFIDENCE)}")
        if draft_exit is not None:
            raise UsageError("the confidence cascade and speculative decoding do not combine; drop one of them")
        exits = [None]  # for the checks and caches below: a token may go to full depth
    for e in exits:
        if e is not None and not 1 <= e <= n:
            raise UsageError(f"exit {e} is outside 1..{n} (the model has {n} layers)")
    depths = [n if e is None else model._check_exit(e) or n for e in exits]
    if draft_exit is not None:
        if B > 1:
            raise UsageError("speculative decoding takes one prompt at a time")
        if depths != [n]:
            raise UsageError("speculative decoding verifies with the full model; drop --exit or --draft-exit")
        if not 1 <= draft_exit < n:
            raise UsageError(f"draft exit {draft_exit} must be a balcony exit in 1..{n - 1}")
        model._check_exit(draft_exit)
        if speculate_k < 1:
            raise UsageError(f"speculate_k must be at least 1, not {speculate_k}")
    for i, (p, m) in enumerate(zip(prompts, limits)):
        check_request(len(p), m, model.model.args.max_seq_len, f"prompt {i + 1}" if B > 1 else None)
    # Attention reads every cache slot it is given: give it what this request can reach, or, once compiled (fixed
    # shapes, no recompiles), the whole cache. (Speculation may write one draft past the last token kept.)
    S = max(len(p) + m for p, m in zip(prompts, limits))
    if _compiled:  # finished rows ride along (below) until the last one finishes: up to the longest prompt + limit
        S = max(len(p) for p in prompts) + max(limits)
        if model.model.layers[0].attention.kv_cache is not None:
            S = max(S, model.model.layers[0].attention.kv_cache.k_cache.size(2))
    model.setup_caches(B, S, exits=[None if d == n else d for d in set(depths)] +
                       ([] if draft_exit is None else [draft_exit]) + (model.exit_layers if auto else []))

    prepare_head(model)
    stop = {eos_id} if isinstance(eos_id, int) else set(eos_id or ())
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    out, finish = [[] for _ in range(B)], [None] * B

    def emit(i: int, tokens) -> bool:  # give prompt i its tokens, calling on_token; False once it stops
        for t in tokens:
            out[i].append(t)
            if on_token is not None:
                on_token(i, t)
            if t in stop or len(out[i]) == limits[i]:
                finish[i] = time.perf_counter()
                return False
        return True

    t0 = time.perf_counter()
    stats = None
    samp = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    if draft_exit is not None:
        stats = speculative_decode(model, prompts[0], draft_exit, speculate_k, limits[0], emit, samp, sync)
        t1 = stats.pop("prefill_end")
    elif auto:
        cascade = ConfidenceCascade(model, confidence, confidence_measure)
        t1 = cascade_decode(model, prompts[0], cascade, emit, samp, sync)
    else:
        # Rows sorted deepest exit first; the prompts right-padded into one prefill. Padding fills cache slots past
        # a row's own tokens, which its mask ignores until decoding overwrites them.
        active = sorted(range(B), key=lambda i: -depths[i])
        T = max(len(p) for p in prompts)
        idx = torch.tensor([prompts[i] + [0] * (T - len(prompts[i])) for i in active], device=device)
        pos = torch.tensor([len(prompts[i]) for i in active], device=device)  # (B,) where each row's next token goes
        plan = exit_plan([depths[i] for i in active])
        logits = forward_rows(model, idx, torch.arange(T, device=device).expand(len(active), T), plan, pos - 1)
        cur, _ = sample(logits, temperature, top_k, top_p, generator)  # (B, 1)
        sync()
        t1 = time.perf_counter()
        live = set(range(B))  # batch positions still decoding
        while True:
            keep = [s for s, (i, t) in enumerate(zip(active, cur.view(-1).tolist())) if s in live and emit(i, [t])]
            if not keep:
                break
            if _compiled:  # fixed shapes: stopped rows ride along, their tokens dropped (no recompile per finish)
                live = set(keep)
            elif len(keep) < len(active):  # some rows stopped: they leave the batch and its caches
                compact_caches(model, [depths[i] for i in active], keep)
                active, live = [active[s] for s in keep], set(range(len(keep)))
                plan = exit_plan([depths[i] for i in active])
                keep = torch.tensor(keep, device=device)
                cur, pos = cur[keep], pos[keep]
            logits = decode_one_token(model, cur, pos[:, None], plan)
            cur, _ = sample(logits, temperature, top_k, top_p, generator)
            pos = pos + 1
    sync()
    results = []
    for i in range(B):
        decode_s = finish[i] - t1
        results.append(dict(tokens=out[i], exit=depths[i], prompt_tokens=len(prompts[i]), prefill_s=t1 - t0,
                            decode_s=decode_s,
                            tokens_per_s=(len(out[i]) - 1) / decode_s if len(out[i]) > 1 else float("nan")))
    if stats is not None:
        drafted = max(stats["drafted"], 1)
        results[0].update(stats, draft_exit=draft_exit, speculate_k=speculate_k,
                          acceptance_rate=stats["accepted"] / drafted,
                          tokens_per_round=(len(out[0]) - 1) / max(stats["rounds"], 1))
    if auto:
        results[0].update(exit="auto", confidence=confidence, confidence_measure=confidence_measure,
                          exits=cascade.exits, avg_layers=sum(cascade.exits) / len(cascade.exits),
                          backfilled=cascade.backfilled)
    return results


def speculative_decode(model: BalconyModel, prompt: list, draft_exit: int, speculate_k: int, max_new_tokens: int,
                       emit: Callable, samp: dict, sync: Callable) -> dict:
    """Self-speculative decoding of one prompt (generate() with draft_exit), giving tokens to emit(0, tokens) until it
    returns False. Returns the round counts and the time the prefill ended."""
    device = model.model.tok_embeddings.weight.device
    T, d = len(prompt), draft_exit
    input_pos = torch.arange(T, device=device)
    # prefill: layers 1..d, the draft balcony (its cache only), then the verifier's layers d+1..N; head at the end
    h = model.run_layers(model.model.tok_embeddings(torch.tensor([prompt], device=device)), 0, d, input_pos)
    model.exit_hidden(d, h, input_pos)
    cur, _ = sample(lm_head(model, verify(model, h, input_pos, d)[:, -1]), **samp)
    sync()
    stats = dict(rounds=0, drafted=0, accepted=0, prefill_end=time.perf_counter())
    going, n_out = emit(0, [cur.item()]), 1
    pos = T  # position of `cur`, the newest token, not yet in any cache
    while going:
        k = min(speculate_k, max_new_tokens - n_out)  # never draft past the cache (extra drafts are dropped)
        hs, drafts, qs, x = [], [], [], cur
        for i in range(k):
            h, q_logits = draft_one_token(model, x, torch.tensor([pos + i], device=device), d)
            x, q = sample(q_logits, **samp)
            hs.append(h.clone())  # a compiled step's outputs live in its CUDA graph's memory, rewritten next replay
            drafts.append(x)
            qs.append(q)
        # The verifier needs the last draft's layer-d hidden state too, to verify it and add a bonus token: run
        # layers 1..d (and the draft balcony, whose cache must hold every accepted token) on it, but not the head.
        hs.append(draft_one_token(model, x, torch.tensor([pos + k], device=device), d, head=False)[0].clone())
        p_logits = lm_head(model, verify(model, torch.cat(hs, 1), torch.arange(pos, pos + k + 1, device=device), d))
        qs = torch.cat(qs) if samp["temperature"] != 0 else None
        n_ok, new = speculative_accept(p_logits[0], torch.cat(drafts).view(-1), qs, **samp)
        # Caches past the accepted tokens hold rejected drafts: the next round overwrites them, and the attention
        # mask (slots <= input_pos) ignores them until then, so rollback costs nothing.
        stats["rounds"] += 1
        stats["drafted"] += k
        stats["accepted"] += n_ok
        cur, pos, n_out = new[-1:].view(1, 1), pos + len(new), n_out + len(new)
        going = emit(0, new.tolist())
    return stats


def cascade_decode(model: BalconyModel, prompt: list, cascade: ConfidenceCascade, emit: Callable, samp: dict,
                   sync: Callable) -> float:
    """Decode one prompt with the confidence cascade (generate() with exit="auto"), giving tokens to emit(0, [id])
    until it returns False. Returns the time the prefill ended; cascade.exits holds each token's exit."""
    device = model.model.tok_embeddings.weight.device
    pos = len(prompt)  # position of `cur`, the newest token, not yet in any cache
    cur, _ = sample(cascade(torch.tensor([prompt], device=device), torch.arange(pos, device=device)), **samp)
    sync()
    prefill_end = time.perf_counter()
    while emit(0, [cur.item()]):
        cur, _ = sample(cascade(cur, torch.tensor([pos], device=device)), **samp)
        pos += 1
    return prefill_end


def read_prompts(path, default_exit: Optional[int]) -> list:
    """--prompts FILE as (prompt, exit, line label) triples, in file order. A .txt file holds one prompt per line; a
    .jsonl file one {"prompt": "...", "exit": 18} per line, exit optional (default_exit when absent, null for full
    depth). The first bad line stops everything, by its number."""
    path = Path(path)
    if path.suffix not in (".txt", ".jsonl"):
        raise UsageError(f"--prompts {path}: give a .txt file (one prompt per line) or a .jsonl file "
                         f'(one {{"prompt": ..., "exit": ...}} per line)')
    if not path.is_file():
        raise UsageError(f"--prompts {path} not found")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: a byte order mark is not text
    except UnicodeDecodeError as e:
        raise UsageError(f"--prompts {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    items = []
    for no, line in enumerate(lines, 1):
        where = f"{path} line {no}"
        if not line.strip():
            raise UsageError(f"{where} is empty; remove it or put a prompt on it")
        if path.suffix == ".txt":
            items.append((line, default_exit, where))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{where} is not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
            raise UsageError(f'{where}: expected an object like {{"prompt": "Hello", "exit": 18}} with a non-empty '
                             f'prompt string')
        unknown = sorted(set(obj) - {"prompt", "exit"})
        if unknown:
            raise UsageError(f"{where}: unknown field(s) {unknown}; a line has a prompt and, optionally, an exit")
        exit = obj.get("exit", default_exit)
        if exit is not None and (isinstance(exit, bool) or not isinstance(exit, int)):
            raise UsageError(f"{where}: exit must be a layer number, or null for full depth, not {exit!r}")
        items.append((obj["prompt"], exit, where))
    if not items:
        raise UsageError(f"--prompts {path} holds no prompts")
    return items


def main(args):
    from tokenizer import Tokenizer

    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0, not {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], not {args.top_p}")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k must be at least 1, not {args.top_k}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, not {args.batch_size}")
    exit = parse_exit(args.exit, auto=True) if args.exit is not None else None
    auto = isinstance(exit, Auto)
    if auto:
        if args.compile:
            raise UsageError("--compile applies to fixed exits and speculative decoding; the cascade's passes change "
                             "size from token to token")
        if exit.threshold is not None and args.confidence is not None:
            raise UsageError("give the threshold once: --exit auto@T, or --exit auto --confidence T")
        args.confidence = next(t for t in (exit.threshold, args.confidence, DEFAULT_CONFIDENCE) if t is not None)
        exit = "auto"  # generate()'s name for the cascade
    elif args.confidence is not None:
        raise UsageError("--confidence applies to --exit auto only")
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or default_dtype(device)]
    items = read_prompts(args.prompts, exit) if args.prompts else [(args.prompt, exit, None)]
    exits = [e for _, e, _ in items]
    model = BalconyModel.from_checkpoint(args.checkpoint, args.balcony, [*exits, args.draft_exit], device, dtype,
                                         labels=[where for *_, where in items] + [None])
    quantize_checkpoint(model, args.checkpoint, **quant_kwargs(args))
    tokenizer = Tokenizer.from_checkpoint(args.checkpoint)
    if args.chat:
        prompts = [tokenizer.encode_chat([{"role": "user", "content": text}]) for text, *_ in items]
    else:
        prompts = [tokenizer.encode(text, bos=tokenizer.add_bos) for text, *_ in items]  # Llama: BOS; SmolLM2: none
    for ids, (*_, where) in zip(prompts, items):
        check_request(len(ids), args.max_new_tokens, model.model.args.max_seq_len, where)
    # One batch size and one cache for the whole run: allocated here, once, for the longest request
    batch = 1 if args.draft_exit is not None or auto else min(args.batch_size, len(prompts))
    cache_exits = [*{None if e in (model.n_layers, "auto") else e for e in exits}]
    cache_exits += ([] if args.draft_exit is None else [args.draft_exit]) + (model.exit_layers if auto else [])
    model.setup_caches(batch, max(map(len, prompts)) + args.max_new_tokens, exits=cache_exits)
    batches = [range(s, min(s + batch, len(prompts))) for s in range(0, len(prompts), batch)]

    kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, eos_id=tokenizer.stop_ids,
              draft_exit=args.draft_exit, speculate_k=args.speculate_k, confidence=args.confidence,
              confidence_measure=args.confidence_measure)
    compile_s = None
    if args.compile:  # the first run compiles (and records CUDA graphs); time it apart from the real run
        compile_steps()
        t = time.perf_counter()
        generate(model, [prompts[i] for i in batches[0]], args.max_new_tokens, exit=[exits[i] for i in batches[0]],
                 **kw)
        compile_s = time.perf_counter() - t

    ids, printed = [], ""

    def stream(i: int, token: int):
        # Decode everything generated so far and print the new suffix: a token may hold part of a UTF-8 character
        # (shown as U+FFFD until the rest arrives), so tokens are never decoded one by one.
        nonlocal printed
        ids.append(token)
        text = tokenizer.decode([t for t in ids if t not in tokenizer.stop_ids])
        if not text.endswith("\ufffd") and len(text) > len(printed):
            print(text[len(printed):], end="", flush=True)
            printed = text

    single = len(prompts) == 1
    generator = torch.Generator(device).manual_seed(args.seed) if args.seed is not None else None
    t0, n_new, results = time.perf_counter(), 0, []
    for rows in batches:
        rs = generate(model, [prompts[i] for i in rows], args.max_new_tokens, exit=[exits[i] for i in rows],
                      on_token=stream if single and not args.json else None, generator=generator, **kw)
        for i, r in zip(rows, rs):
            r = dict(prompt=items[i][0], **r, text=tokenizer.decode([t for t in r["tokens"]
                                                                     if t not in tokenizer.stop_ids]))
            n_new += len(r["tokens"])
            if args.json:
                print(json.dumps(dict(r, compile_s=compile_s) if single else r), flush=True)
            elif single:
                print(r["text"][len(printed):], flush=True)  # what was held back waiting for more bytes, a newline
            else:
                print(f"=== {i + 1}/{len(prompts)}, exit {r['exit']}/{model.n_layers}: {r['prompt']}\n{r['text']}\n",
                      flush=True)
            results.append(r)
    wall = time.perf_counter() - t0
    if args.json:
        return
    if single:
        r = results[0]
        line = (f"prefill {r['prefill_s'] * 1000:.0f} ms ({r['prompt_tokens']} tokens), decode "
                f"{r['tokens_per_s']:.1f} tokens/s ({len(r['tokens'])} tokens), exit {r['exit']}/{model.n_layers}")
        if args.draft_exit is not None:
            line += (f", draft exit {args.draft_exit} k={args.speculate_k}: acceptance {r['acceptance_rate']:.1%}, "
                     f"{r['tokens_per_round']:.2f} tokens per full-model forward")
        if r["exit"] == "auto":
            share = ", ".join(f"{e}: {r['exits'].count(e) / len(r['exits']):.0%}" for e in sorted(set(r["exits"])))
            line += (f" ({args.confidence_measure} >= {args.confidence}): {r['avg_layers']:.1f} layers per token on "
                     f"average, tokens per exit {share}, {r['backfilled']} layer-positions back-filled")
    else:
        line = (f"{len(prompts)} prompts in batches of {batch}: {n_new} new tokens in {wall:.1f} s, "
                f"{n_new / wall:.1f} tokens/s overall")
    if compile_s is not None:
        line += f", compile {compile_s:.1f} s"
    print(line, file=sys.stderr)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="converted model folder")
    p.add_argument("--balcony", default=None, help="trained exits (default: <checkpoint>/balcony.safetensors); "
                                                   "needed only for --exit or --draft-exit below full depth")
    p.add_argument("--exit", default=None,
                   help="exit layer, or 'full' (the default: full depth, the untouched model); 'auto': each token "
                        "leaves at the first exit whose confidence reaches --confidence (auto@T: T), one prompt at "
                        "a time")
    p.add_argument("--confidence", type=float, default=None, help="--exit auto: threshold (default 0.9)")
    p.add_argument("--confidence-measure", default="prob", choices=CONFIDENCE,
                   help="--exit auto: the top probability, or top-1 minus top-2 probability")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="Once upon a time,")
    src.add_argument("--prompts", default=None, metavar="FILE",
                     help='many prompts: a .txt file, one per line, or a .jsonl file of {"prompt": "...", "exit": 18} '
                          "lines (exit optional: --exit is the default, null full depth); results in input order")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (exits may differ)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--draft-exit", type=int, default=None,
                   help="self-speculative decoding: draft with this exit (one prompt at a time)")
    p.add_argument("--speculate-k", type=int, default=4, help="tokens drafted per full-model forward")
    p.add_argument("--compile", action="store_true", help="torch.compile the one-token decode steps")
    add_device_args(p)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per prompt (prompt, exit, tokens, text, timings) instead of text")
    return p


if __name__ == "__main__":
    run_cli(main, get_parser().parse_args)

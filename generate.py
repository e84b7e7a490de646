"""
Generate text from a Balcony model at one exit, token by token at the first confident exit, or at full depth with
self-speculative decoding.

Exit k (paper section 3) runs backbone layers 1..k, balcony k and the shared head; deeper layers never run and get
no KV cache. With --draft-exit d, balcony d drafts --speculate-k tokens and the full model verifies them in one
forward (LayerSkip/Kangaroo style). Draft and verifier share layers 1..d and their KV cache, so the verifier resumes
from the drafts' layer-d hidden states and runs only layers d+1..N. Greedy output is the full model's, token for
token; sampled output follows the full model's distribution (speculative rejection sampling, Leviathan et al. 2023).
With --exit auto, each token leaves at the first exit whose confidence reaches --confidence (CALM's rule); tokens
that left early get their deeper KV back-filled, exactly, when a later token goes deeper (ConfidenceCascade).

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
from cli import DTYPES, UsageError, run_cli
from model import Transformer


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


def decode_one_token(model: BalconyModel, cur, input_pos, exit: Optional[int]):
    # cur: (B, 1) token at position input_pos (1,) -> (B, vocab) logits of exit `exit` (None: full depth)
    return model(cur, exit=exit, input_pos=input_pos)[:, -1]


def draft_one_token(model: BalconyModel, cur, input_pos, exit: int, head: bool = True):
    # Layers 1..exit and balcony `exit` on one token: the layer-`exit` hidden state (B, 1, D), kept for the
    # verifier, and the draft logits (B, vocab). head=False only writes the caches (the draft logits go unused).
    h = model.run_layers(model.model.tok_embeddings(cur), 0, exit, input_pos)
    out = model.exit_hidden(exit, h, input_pos)
    return h, model.model.output(out)[:, -1] if head else None


def verify(model: BalconyModel, h, input_pos, draft_exit: int):
    # The full model resumed at layer draft_exit: (B, T, D) layer-d hidden states -> (B, T, vocab) logits
    x = model.run_layers(h, draft_exit, model.n_layers, input_pos)
    return model.model.output(model.model.norm(x))


def compile_steps():
    """Compile the one-token steps (gpt-fast style); on CUDA they are replayed as CUDA graphs."""
    global decode_one_token, draft_one_token
    mode = "reduce-overhead" if torch.cuda.is_available() else "default"
    decode_one_token = torch.compile(decode_one_token, mode=mode, fullgraph=True)
    draft_one_token = torch.compile(draft_one_token, mode=mode, fullgraph=True)


def prefill(model: BalconyModel, idx, exit=None, draft_exit=None):
    """Run the prompt idx (B, T) through everything that decoding will attend to; (B, vocab) last-position logits."""
    input_pos = torch.arange(idx.size(1), device=idx.device)
    if draft_exit is None:
        return model(idx, exit=exit, input_pos=input_pos)[:, -1]
    h = model.run_layers(model.model.tok_embeddings(idx), 0, draft_exit, input_pos)
    model.exit_hidden(draft_exit, h, input_pos)  # fills the draft balcony's cache
    return verify(model, h, input_pos, draft_exit)[:, -1]


CONFIDENCE = ("prob", "margin")  # CALM's softmax measures: the top probability, or top-1 minus top-2


def exit_confidence(logits, measure: str = "prob"):
    # logits: (..., vocab) -> (...) how sure an exit is of its top token, from the untempered softmax
    top2 = logits.float().softmax(-1).topk(2, dim=-1).values
    return top2[..., 0] if measure == "prob" else top2[..., 0] - top2[..., 1]


class ConfidenceCascade:
    """Token-level confidence exits with exact KV back-fill (batch 1; the paper's limitations section, CALM's exit
    rule, FREE's and Apparate's exactness). A token runs layers 1..e1 and balcony e1; if the exit's confidence
    reaches `threshold` it leaves there, else it goes on to the next exit, and full depth always emits.

    A token that left at exit j has no KV in layers or balconies deeper than j. It waits in `pending[j]` with its
    layer-j hidden state, and the next token that goes past j takes it along: the waiting positions ride in the same
    forward as that token through layers j+1..j' and balcony j' (input_pos lists their positions, not necessarily
    contiguous: each query row is masked to the slots <= its own position, and every slot it may read is written in
    this pass or an earlier one). So a token at depth l reads layer-l KV of every earlier position, exactly what a
    full-depth run writes there, and each (layer, position) is computed once. The caches hold every layer and
    every balcony (setup_caches(..., exit=None))."""

    def __init__(self, model: BalconyModel, threshold: float, measure: str = "prob"):
        self.model, self.threshold, self.measure = model, threshold, measure
        self.ladder = [*model.exit_layers, model.n_layers]
        self.pending = {}  # exit j -> (positions (k,), layer-j hidden states (1, k, D)) of tokens waiting there
        self.exits = []  # the exit that emitted each token
        self.backfilled = 0  # backbone (layer, position) pairs run for earlier tokens' positions

    def __call__(self, idx, input_pos):
        """idx (1, T) at positions input_pos (T,) -> (1, vocab) logits for the last position, from the first exit
        confident enough (the prefill is a T-token step whose other positions ride along)."""
        m = self.model
        h, pos, prev = m.model.tok_embeddings(idx), input_pos, 0
        for e in self.ladder:
            h = m.run_layers(h, prev, e, pos)  # (1, riders, D), this step's tokens last
            self.backfilled += (pos.numel() - idx.size(1)) * (e - prev)
            if e == m.n_layers:
                self.exits.append(e)
                return m.model.output(m.model.norm(h[:, -1]))
            # balcony e runs on every rider: its cache must hold them for later tokens that leave at e
            logits = m.model.output(m.exit_hidden(e, h, pos)[:, -1])
            if exit_confidence(logits, self.measure).item() >= self.threshold:
                self.pending[e] = self._join(e, pos, h)
                self.exits.append(e)
                return logits
            pos, h = self._join(e, pos, h)  # going deeper: the positions waiting at e come along
            prev = e

    def _join(self, e, pos, h):
        # the positions waiting at exit e (no longer waiting), then pos: (k + T,) positions, (1, k + T, D) states
        if e not in self.pending:
            return pos, h
        old_pos, old_h = self.pending.pop(e)
        return torch.cat([old_pos, pos]), torch.cat([old_h, h], 1)


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


@torch.no_grad()
def generate(model: BalconyModel, prompt_ids: list, max_new_tokens: int, exit=None,
             temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
             eos_id=None, draft_exit: Optional[int] = None, speculate_k: int = 4,
             confidence: Optional[float] = None, confidence_measure: str = "prob",
             on_token: Optional[Callable[[int], None]] = None, generator: Optional[torch.Generator] = None) -> dict:
    """Up to max_new_tokens tokens after prompt_ids (batch 1), stopping after eos_id (an id or a set of ids).
    Plain decoding at `exit` (None: full depth), self-speculative full-depth decoding drafted by balcony
    `draft_exit`, or with exit="auto" a confidence cascade (ConfidenceCascade: each token leaves at the first exit
    whose confidence_measure reaches `confidence`). on_token(id) is called as each token is produced. Returns tokens,
    timings and, when speculating, acceptance stats; with the cascade, the exit of each token."""
    device = model.model.tok_embeddings.weight.device
    n, T = model.n_layers, len(prompt_ids)
    auto = exit == "auto"
    if auto:
        if confidence is None:
            raise UsageError("exit 'auto' needs a confidence threshold (e.g. 0.9)")
        if confidence_measure not in CONFIDENCE:
            raise UsageError(f"confidence measure {confidence_measure!r} is not one of {', '.join(CONFIDENCE)}")
        if draft_exit is not None:
            raise UsageError("the confidence cascade and speculative decoding do not combine; drop one of them")
    elif exit is not None and not 1 <= exit <= n:
        raise UsageError(f"exit {exit} is outside 1..{n} (the model has {n} layers)")
    if draft_exit is not None:
        if exit not in (None, n):
            raise UsageError("speculative decoding verifies with the full model; drop --exit or --draft-exit")
        if not 1 <= draft_exit < n:
            raise UsageError(f"draft exit {draft_exit} must be a balcony exit in 1..{n - 1}")
        if speculate_k < 1:
            raise UsageError(f"speculate_k must be at least 1, not {speculate_k}")
    if T == 0:
        raise UsageError("the prompt is empty")
    if max_new_tokens < 1:
        raise UsageError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
    context = model.model.args.max_seq_len
    if T + max_new_tokens > context:
        raise UsageError(f"a prompt of {T} tokens plus {max_new_tokens} new tokens exceeds the model's context of "
                         f"{context} tokens")
    # The cache holds just this request: attention reads every slot, so a cache of max_seq_len slots would make each
    # step read the whole context. (Speculation may write one draft past the last token kept.)
    S = T + max_new_tokens
    if auto:
        model.setup_caches(1, S)  # a token may go to any depth: every layer and every balcony
    elif draft_exit is None:
        model.setup_caches(1, S, exit=exit)  # layers 1..exit and balcony `exit` only
    else:
        model.setup_caches(1, S, exit=draft_exit)  # layers 1..d and the draft balcony ...
        model.model.setup_caches(1, S)  # ... then every backbone layer; other balconies get no cache

    stop = {eos_id} if isinstance(eos_id, int) else set(eos_id or ())
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out, stats = [], dict(rounds=0, drafted=0, accepted=0)

    def emit(tokens) -> bool:  # append tokens, calling on_token; False once eos or max_new_tokens is reached
        for t in tokens:
            out.append(t)
            if on_token is not None:
                on_token(t)
            if t in stop or len(out) == max_new_tokens:
                return False
        return True

    t0 = time.perf_counter()
    idx = torch.tensor([prompt_ids], device=device)
    cascade = ConfidenceCascade(model, confidence, confidence_measure) if auto else None
    logits = cascade(idx, torch.arange(T, device=device)) if cascade else prefill(model, idx, exit, draft_exit)
    cur, _ = sample(logits, temperature, top_k, top_p, generator)
    sync()
    t1 = time.perf_counter()
    going = emit([cur.item()])
    pos = T  # position of `cur`, the newest token, not yet in any cache
    while going and draft_exit is None:
        input_pos = torch.tensor([pos], device=device)
        logits = cascade(cur, input_pos) if cascade else decode_one_token(model, cur, input_pos, exit)
        cur, _ = sample(logits, temperature, top_k, top_p, generator)
        going, pos = emit([cur.item()]), pos + 1
    while going and draft_exit is not None:
        k = min(speculate_k, max_new_tokens - len(out))  # never draft past the cache (extra drafts are dropped)
        hs, drafts, qs, x = [], [], [], cur
        for i in range(k):
            h, q_logits = draft_one_token(model, x, torch.tensor([pos + i], device=device), draft_exit)
            x, q = sample(q_logits, temperature, top_k, top_p, generator)
            hs.append(h)
            drafts.append(x)
            qs.append(q)
        # The verifier needs the last draft's layer-d hidden state too, to verify it and add a bonus token: run
        # layers 1..d (and the draft balcony, whose cache must hold every accepted token) on it, but not the head.
        hs.append(draft_one_token(model, x, torch.tensor([pos + k], device=device), draft_exit, head=False)[0])
        p_logits = verify(model, torch.cat(hs, 1), torch.arange(pos, pos + k + 1, device=device), draft_exit)
        qs = torch.cat(qs) if temperature != 0 else None
        n_ok, new = speculative_accept(p_logits[0], torch.cat(drafts).view(-1), qs, temperature, top_k, top_p,
                                       generator)
        # Caches past the accepted tokens hold rejected drafts: the next round overwrites them, and the attention
        # mask (slots <= input_pos) ignores them until then, so rollback costs nothing.
        stats["rounds"] += 1
        stats["drafted"] += k
        stats["accepted"] += n_ok
        cur, pos = new[-1:].view(1, 1), pos + len(new)
        going = emit(new.tolist())
    sync()
    t2 = time.perf_counter()
    result = dict(tokens=out, exit=exit if exit is not None else n, prompt_tokens=T, prefill_s=t1 - t0,
                  decode_s=t2 - t1, tokens_per_s=(len(out) - 1) / (t2 - t1) if len(out) > 1 else float("nan"))
    if draft_exit is not None:
        result.update(stats, draft_exit=draft_exit, speculate_k=speculate_k,
                      acceptance_rate=stats["accepted"] / max(stats["drafted"], 1),
                      tokens_per_round=(len(out) - 1) / max(stats["rounds"], 1))
    if auto:
        result.update(confidence=confidence, confidence_measure=confidence_measure, exits=cascade.exits,
                      avg_layers=sum(cascade.exits) / len(cascade.exits), backfilled=cascade.backfilled)
    return result


def load_model(checkpoint, balcony=None, exits=(), device="cpu", dtype=torch.float32) -> BalconyModel:
    """The base model, with the balcony file loaded only if `exits` names a balcony exit or "auto" (full depth needs
    none)."""
    base = Transformer.from_checkpoint(checkpoint, device=device, dtype=dtype)
    n = base.args.n_layers
    for e in exits:
        if e not in (None, "auto") and not 1 <= e <= n:
            raise UsageError(f"exit {e} is outside 1..{n} (the model has {n} layers)")
    if all(e in (None, n) for e in exits):
        return BalconyModel(base, []).eval()
    balcony = balcony if balcony is not None else Path(checkpoint) / "balcony.safetensors"
    return BalconyModel.from_exits_file(base, balcony)


def main(args):
    from tokenizer import Tokenizer

    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0, not {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], not {args.top_p}")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k must be at least 1, not {args.top_k}")
    if args.exit == "auto":
        if args.compile:
            raise UsageError("--compile applies to fixed exits and speculative decoding; the cascade's passes change "
                             "size from token to token")
        args.confidence = 0.9 if args.confidence is None else args.confidence
    elif args.confidence is not None:
        raise UsageError("--confidence applies to --exit auto only")
    device = torch.device(args.device)
    model = load_model(args.checkpoint, args.balcony, (args.exit, args.draft_exit), device, DTYPES[args.dtype])
    tokenizer = Tokenizer.from_checkpoint(args.checkpoint)
    if args.chat:
        prompt_ids = tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    else:
        prompt_ids = tokenizer.encode(args.prompt, bos=tokenizer.add_bos)  # Llama: BOS; SmolLM2: none

    kw = dict(exit=args.exit, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
              eos_id=tokenizer.stop_ids, draft_exit=args.draft_exit, speculate_k=args.speculate_k,
              confidence=args.confidence, confidence_measure=args.confidence_measure)
    compile_s = None
    if args.compile:  # the first run compiles (and records CUDA graphs); time it apart from the real run
        compile_steps()
        t = time.perf_counter()
        generate(model, prompt_ids, args.max_new_tokens, **kw)
        compile_s = time.perf_counter() - t

    ids, printed = [], ""

    def stream(token: int):
        # Decode everything generated so far and print the new suffix: a token may hold part of a UTF-8 character
        # (shown as U+FFFD until the rest arrives), so tokens are never decoded one by one.
        nonlocal printed
        ids.append(token)
        text = tokenizer.decode([t for t in ids if t not in tokenizer.stop_ids])
        if not text.endswith("\ufffd") and len(text) > len(printed):
            print(text[len(printed):], end="", flush=True)
            printed = text

    generator = torch.Generator(device).manual_seed(args.seed) if args.seed is not None else None
    r = generate(model, prompt_ids, args.max_new_tokens, on_token=None if args.json else stream,
                 generator=generator, **kw)
    text = tokenizer.decode([t for t in r["tokens"] if t not in tokenizer.stop_ids])
    r.update(text=text, compile_s=compile_s)
    if args.json:
        print(json.dumps(r))
        return
    print(text[len(printed):], flush=True)  # whatever was held back waiting for more bytes, and a newline
    line = (f"prefill {r['prefill_s'] * 1000:.0f} ms ({r['prompt_tokens']} tokens), decode {r['tokens_per_s']:.1f} "
            f"tokens/s ({len(r['tokens'])} tokens), exit {r['exit']}/{model.n_layers}")
    if args.draft_exit is not None:
        line += (f", draft exit {args.draft_exit} k={args.speculate_k}: acceptance {r['acceptance_rate']:.1%}, "
                 f"{r['tokens_per_round']:.2f} tokens per full-model forward")
    if args.exit == "auto":
        share = ", ".join(f"{e}: {r['exits'].count(e) / len(r['exits']):.0%}" for e in sorted(set(r["exits"])))
        line += (f" ({args.confidence_measure} >= {args.confidence}): {r['avg_layers']:.1f} layers per token on "
                 f"average, tokens per exit {share}, {r['backfilled']} layer-positions back-filled")
    if compile_s is not None:
        line += f", compile {compile_s:.1f} s"
    print(line, file=sys.stderr)


def exit_arg(s: str):
    if s == "auto":
        return s
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"an exit layer or 'auto', not {s!r}") from None


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default="checkpoints/smollm2-135m-instruct", help="converted model folder")
    p.add_argument("--balcony", default=None, help="trained exits (default: <checkpoint>/balcony.safetensors); "
                                                   "needed only for --exit or --draft-exit below full depth")
    p.add_argument("--exit", type=exit_arg, default=None,
                   help="exit layer; 'auto': each token leaves at the first exit whose confidence reaches "
                        "--confidence; omitted: full depth, the untouched model")
    p.add_argument("--confidence", type=float, default=None, help="--exit auto: threshold (default 0.9)")
    p.add_argument("--confidence-measure", default="prob", choices=CONFIDENCE,
                   help="--exit auto: the top probability, or top-1 minus top-2 probability")
    p.add_argument("--prompt", default="Once upon a time,")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--draft-exit", type=int, default=None, help="self-speculative decoding: draft with this exit")
    p.add_argument("--speculate-k", type=int, default=4, help="tokens drafted per full-model forward")
    p.add_argument("--compile", action="store_true", help="torch.compile the one-token decode steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    return p


if __name__ == "__main__":
    run_cli(main, get_parser().parse_args)

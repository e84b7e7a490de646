"""
Decode speed: ours against transformers' `generate` on the same weights, then throughput against batch size per exit,
a batch that mixes exits against one batch per exit, each Balcony exit at batch 1 against the ideal speedup from the
work it does, and self-speculative decoding against plain full-depth decoding.

Every run decodes exactly --max-new-tokens greedy tokens per prompt (eos ignored). Decode tokens/s for the
comparison with transformers is (new tokens - 1) / (time for all of them - time for one), the same clock for both, so
the prefill cancels out; elsewhere it is generate()'s own decode clock. The ideal speedup of exit k is (N layers +
head) / (k layers + 1 balcony layer + head), counted in bytes of weights read per token (batch-1 decoding reads
weights), in the form they are held (--quantize). The precision table runs every precision, transformers and
llama.cpp (llama-cpp-python, if installed) in one run:

    python bench_generate.py --tables precision --gguf data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

    python bench_generate.py --balcony /work/exits/init-15-18-21.safetensors --tables hf batch mixed
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from balcony import BalconyModel
from cli import DEFAULT_CHECKPOINT, DTYPES, UsageError, add_quantize_args, run_cli
from generate import compile_steps, generate
from quantize import quantize_checkpoint

PROMPT = "Explain in a few paragraphs why the sky is blue, and why sunsets are red."
QUESTIONS = [PROMPT, "What is the capital of France?", "Write a haiku about balconies.",
             "List three uses of a paperclip, with one sentence on each, and say which is the most surprising.",
             "Why do cats purr?", "Summarise the plot of Hamlet in two sentences.", "What is 17 times 23?",
             "Describe a sunrise over the sea to someone who has never seen one, in the style of a weather report."]
TABLES = ["hf", "batch", "mixed", "exits", "speculative", "precision"]
# --tables precision: column -> (model dtype: residual stream, norms, attention, KV cache; weights)
PRECISIONS = {"fp32": ("float32", "none"), "bf16": ("bfloat16", "none"), "int8": ("bfloat16", "int8"),
              "int4, fp32 residual": ("float32", "int4"), "int4": ("bfloat16", "int4")}


def transformers_model(model, tok):
    """transformers' LlamaForCausalLM holding our model's weights (export.py's config and names), same dtype."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from convert_hf import HF_WEIGHT_MAP
    from export import hf_config, renamed
    a = model.args
    config = LlamaConfig(**hf_config(a, tok, "float32"))
    with torch.device("meta"):
        hf = LlamaForCausalLM(config)
    hf.load_state_dict(renamed(model.checkpoint_state_dict(), HF_WEIGHT_MAP, a.n_layers), strict=False, assign=True)
    hf.tie_weights()
    for m in hf.modules():  # the RoPE buffers, which stay on meta: ours, in fp32
        if hasattr(m, "inv_freq"):
            m.inv_freq = model.inv_freq.clone()
            m.original_inv_freq = model.inv_freq.clone()
    hf.generation_config.eos_token_id = None  # decode exactly max_new_tokens, as ours does
    hf.generation_config.pad_token_id = 0
    return hf.to(model.tok_embeddings.weight.dtype).eval()


def median_rate(fn, n_new: int, reps: int):
    """Median decode tokens/s of fn(n) -> (seconds, tokens) over reps, from end-to-end times: n_new tokens minus one
    token (the prefill cancels); and the tokens of the last run."""
    rates = []
    for _ in range(reps):
        t1, _ = fn(1)
        tn, tokens = fn(n_new)
        rates.append((n_new - 1) / (tn - t1))
    return statistics.median(rates), tokens


def decode_matrices(model) -> list:
    """The weight matrices a full-depth decode step multiplies: every layer's, then the head (once, tied or not)."""
    head = ("tok_embeddings.weight", "output.weight")
    return [w for name, w in model.named_parameters() if w.dim() == 2 and name not in head] + [model.output.weight]


def gemv_ceiling(model, reps: int) -> float:
    """Tokens/s of batch-1 decoding if it did nothing but read the weights: one vector-matrix product per matrix of
    every layer and the head, nothing else (no attention, norms or Python). No decoder of these weights can beat it
    on this machine, so it bounds what any ratio to transformers can be."""
    mats = decode_matrices(model.model)
    xs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype, device=w.device) for w in mats}
    times = []
    with torch.no_grad():
        for _ in range(reps + 1):
            t = time.perf_counter()
            for w in mats:
                torch.nn.functional.linear(xs[w.shape[1]], w)
            times.append(time.perf_counter() - t)
    return 1 / statistics.median(times[1:])


def table_hf(model, tok, prompt_ids, args):
    from transformers.utils import logging
    logging.set_verbosity_error()
    hf = transformers_model(model.model, tok)
    idx = torch.tensor([prompt_ids])

    def ours(n):
        t = time.perf_counter()
        tokens = generate(model, [prompt_ids], n)[0]["tokens"]
        return time.perf_counter() - t, tokens

    def theirs(n):
        t = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(idx, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - t, out[0, len(prompt_ids):].tolist()

    for fn in (ours, theirs):  # warm-up
        fn(4)
    (o, o_tok), (t, t_tok) = [median_rate(fn, args.max_new_tokens, args.reps) for fn in (ours, theirs)]
    c = gemv_ceiling(model, 10 * args.reps)
    print(f"| {args.dtype} | {o:.1f} | {t:.1f} | {o / t:.2f}x | {c:.1f} | {c / t:.2f}x | "
          f"{'yes' if o_tok == t_tok else 'no'} |", flush=True)


def bytes_per_token(model, exit) -> int:
    """Bytes of weights a token decoded at batch 1 reads, in whatever form they are held (float or quantised): backbone
    layers 1..exit (None: all) and the final norm or the exit's balcony, then the head. KV caches are not weights."""
    def nbytes(m):
        return sum(t.nbytes for n, t in [*m.named_parameters(), *m.named_buffers()] if "kv_cache" not in n)
    m = model.model
    if exit is None:
        return sum(nbytes(layer) for layer in m.layers) + nbytes(m.norm) + nbytes(m.output)
    return sum(nbytes(layer) for layer in m.layers[:exit]) + nbytes(model.exits[str(exit)]) + nbytes(m.output)


def llama_cpp_files(model, args, tmp) -> dict:
    """{(exit, GGML type): GGUF path} for llama.cpp: the shipped GGUF at full depth (--gguf, its own type), every
    exit and full depth exported at Q4_1 and Q4_0 (export.py) from `model` (float32, the exits loaded)."""
    from export import export
    files = {}
    if args.gguf is not None:
        import gguf
        kinds = {t.tensor_type.name for t in gguf.GGUFReader(args.gguf).tensors if len(t.shape) == 2} - {"Q8_0"}
        files[None, "/".join(sorted(kinds)) + " (shipped)"] = args.gguf
    for e in [*model.exit_layers, None]:
        for q in ("q4_1", "q4_0"):
            files[e, q.upper()] = export(model, e, args.checkpoint, Path(tmp) / f"{e}-{q}.gguf", "gguf", q)
    return files


def table_precision(tok, prompt_ids, args):
    """Batch-1 decode tokens/s of every exit and full depth at each of PRECISIONS, transformers (fp32, full depth) and
    llama.cpp on GGUFs of the same exits, in one run; then how far each of ours gets of its ideal speedup."""
    from bench_export import llama_cpp_greedy
    rates, mb = {}, {}
    exits = None
    for label, (dtype, q) in PRECISIONS.items():
        model = BalconyModel.from_checkpoint(args.checkpoint, args.balcony, args.device, DTYPES[dtype])
        if label == "fp32":
            fp32_model = model
        quantize_checkpoint(model, args.checkpoint, q, args.group_size, args.quantize_head)
        exits = [*model.exit_layers, None]
        for e in exits:
            rates[label, e] = bench(model, prompt_ids, args, exit=e)[0]
            mb[label, e] = bytes_per_token(model, e) / 1e6
        print(f"  {label}: " + ", ".join(f"{rates[label, e]:.1f}" for e in exits), flush=True)

    hf = transformers_model(fp32_model.model, tok)
    idx = torch.tensor([prompt_ids])

    def theirs(n):
        t = time.perf_counter()
        with torch.no_grad():
            hf.generate(idx, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - t, None
    theirs(4)
    hf_rate = median_rate(theirs, args.max_new_tokens, args.reps)[0]
    del hf

    cpp, cpp_kinds = {}, []
    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None
    if llama_cpp is not None:
        with tempfile.TemporaryDirectory(dir=args.tmp) as d:
            for (e, kind), path in llama_cpp_files(fp32_model, args, d).items():
                llm = llama_cpp.Llama(str(path), n_ctx=len(prompt_ids) + args.max_new_tokens, n_threads=args.threads,
                                      n_batch=512, verbose=False)
                llama_cpp_greedy(llm, prompt_ids, 4)  # warm-up
                cpp[e, kind] = statistics.median(llama_cpp_greedy(llm, prompt_ids, args.max_new_tokens)[1]
                                                 for _ in range(args.reps))
                cpp_kinds += [kind] if kind not in cpp_kinds else []
                del llm
    name = lambda e: f"{fp32_model.n_layers} (full)" if e is None else str(e)
    cols = list(PRECISIONS)
    print(f"\nBatch 1, {len(prompt_ids)}-token chat prompt, {args.max_new_tokens} greedy tokens: decode tokens/s "
          f"(int4: group {args.group_size}, head {args.quantize_head})")
    if llama_cpp is None:
        print("llama.cpp: llama-cpp-python is not installed, its columns are absent")
    print("| exit | " + " | ".join([*cols, *(f"llama.cpp {k}" for k in cpp_kinds)]) +
          " | int4 / fp32 | int4 / llama.cpp Q4_1 |\n|---|" + "---|" * (len(cols) + len(cpp_kinds) + 2))
    for e in exits:
        best = cpp.get((e, "Q4_1"))
        print(f"| {name(e)} | " + " | ".join([*(f"{rates[c, e]:.1f}" for c in cols),
                                             *(f"{cpp[e, k]:.1f}" if (e, k) in cpp else "-" for k in cpp_kinds)]) +
              f" | {rates['int4', e] / rates['fp32', e]:.2f}x | " +
              (f"{rates['int4', e] / best:.2f}x |" if best else "- |"), flush=True)
    print(f"| transformers fp32, full depth | {hf_rate:.1f} |")
    print("\nEach exit's speedup over full depth against the ideal (MB of weights read per token, full / exit)")
    print("| exit | " + " | ".join(f"{c}: MB/token, speedup, of ideal" for c in cols) + " |\n|---|" + "---|" * len(cols))
    for e in exits[:-1]:
        print(f"| {name(e)} | " + " | ".join(
            f"{mb[c, e]:.0f}, {rates[c, e] / rates[c, None]:.2f}x, "
            f"{rates[c, e] / rates[c, None] / (mb[c, None] / mb[c, e]):.0%}" for c in cols) + " |", flush=True)


def decode_rate(model, prompts, exits, args) -> float:
    """Median over --reps of all rows' new tokens (after each row's first) per second of the batch's decode."""
    rates = []
    for _ in range(args.warmup + args.reps):
        rs = generate(model, prompts, args.max_new_tokens, exit=exits)
        rates.append(sum(len(r["tokens"]) - 1 for r in rs) / max(r["decode_s"] for r in rs))
    return statistics.median(rates[args.warmup:])


def batch_prompts(chat_prompts, n):
    return [chat_prompts[i % len(chat_prompts)] for i in range(n)]


def bench(model, prompt_ids, args, **kw):
    """Median batch-1 decode tokens/s over --reps runs after --warmup runs, and the last run's result."""
    for _ in range(args.warmup):
        generate(model, [prompt_ids], args.max_new_tokens, **kw)
    runs = [generate(model, [prompt_ids], args.max_new_tokens, **kw)[0] for _ in range(args.reps)]
    return statistics.median(r["tokens_per_s"] for r in runs), runs[-1]


def main(args):
    from tokenizer import Tokenizer

    bad = set(args.tables) - set(TABLES)
    if bad:
        raise UsageError(f"unknown --tables {sorted(bad)}; choose from {TABLES}")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.balcony = args.balcony or f"{args.checkpoint}/balcony.safetensors"
    model = BalconyModel.from_checkpoint(args.checkpoint, args.balcony, device, DTYPES[args.dtype])
    quantize_checkpoint(model, args.checkpoint, args.quantize, args.group_size, args.quantize_head)
    exits = model.exit_layers
    tok = Tokenizer.from_checkpoint(args.checkpoint)
    chat = [tok.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    prompt_ids = tok.encode_chat([{"role": "user", "content": args.prompt}])
    print(f"{args.checkpoint}: {model.n_layers} layers, exits {exits}; device {device}, {args.dtype}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.max_new_tokens} new tokens, "
          f"{args.warmup} warmup + median of {args.reps}{', compiled' if args.compile else ''}\n")
    if args.compile:
        compile_steps()
        t = time.perf_counter()
        generate(model, [prompt_ids], args.max_new_tokens)
        print(f"compile (first full-depth run): {time.perf_counter() - t:.1f} s\n")

    if "precision" in args.tables:
        table_precision(tok, prompt_ids, args)
        print()

    if "hf" in args.tables:
        print(f"Batch 1, full depth, {len(prompt_ids)}-token prompt: decode tokens/s")
        print("| dtype | ours | transformers | ours / transformers | weights-read ceiling | ceiling / transformers | "
              "greedy identical |\n|---|---|---|---|---|---|---|")
        table_hf(model, tok, prompt_ids, args)
        print()

    if "batch" in args.tables:
        print("Decode tokens/s (all rows) against batch size; prompts of 12 to 41 tokens")
        print("| exit | " + " | ".join(f"batch {b}" for b in args.batch_sizes) + " |")
        print("|---|" + "---|" * len(args.batch_sizes))
        for exit in [*exits, None]:
            rates = [decode_rate(model, batch_prompts(chat, b), exit, args) for b in args.batch_sizes]
            name = f"{model.n_layers} (full)" if exit is None else str(exit)
            print(f"| {name} | " + " | ".join(f"{r:.1f}" for r in rates) + " |", flush=True)
        print()

    if "mixed" in args.tables:
        b = args.mixed_batch
        mix = [*exits, None]
        prompts, row_exits = batch_prompts(chat, b), [mix[i % len(mix)] for i in range(b)]
        t = time.perf_counter()
        for _ in range(args.reps):
            generate(model, prompts, args.max_new_tokens, exit=row_exits)
        mixed_s = (time.perf_counter() - t) / args.reps
        t = time.perf_counter()
        for _ in range(args.reps):
            for e in mix:
                generate(model, [p for p, x in zip(prompts, row_exits) if x == e], args.max_new_tokens, exit=e)
        split_s = (time.perf_counter() - t) / args.reps
        tokens = b * args.max_new_tokens
        print(f"{b} prompts, exits {mix} in turn, prefill and decode: wall time")
        print("| run | seconds | tokens/s | speedup |\n|---|---|---|---|")
        print(f"| one batch per exit ({len(mix)} batches of {b // len(mix)}) | {split_s:.2f} | {tokens / split_s:.1f} | "
              f"1.00x |")
        print(f"| one mixed batch of {b} | {mixed_s:.2f} | {tokens / mixed_s:.1f} | {split_s / mixed_s:.2f}x |\n",
              flush=True)

    if "exits" in args.tables or "speculative" in args.tables:
        full_tps, full = bench(model, prompt_ids, args)
    if "exits" in args.tables:
        full_w = bytes_per_token(model, None)
        print("| exit | MB of weights/token | ideal speedup | tokens/s | speedup | of ideal |")
        print("|---|---|---|---|---|---|")
        for exit in [*exits, None]:
            tps = full_tps if exit is None else bench(model, prompt_ids, args, exit=exit)[0]
            w = bytes_per_token(model, exit)
            name = f"{model.n_layers} (full)" if exit is None else str(exit)
            print(f"| {name} | {w / 1e6:.1f} | {full_w / w:.2f}x | {tps:.1f} | {tps / full_tps:.2f}x | "
                  f"{tps / full_tps / (full_w / w):.0%} |", flush=True)
        print()
    if "speculative" in args.tables:
        print("| draft exit | k | acceptance | tokens/full forward | tokens/s | speedup | greedy identical |")
        print("|---|---|---|---|---|---|---|")
        for d in exits:
            for k in args.speculate_k:
                tps, r = bench(model, prompt_ids, args, draft_exit=d, speculate_k=k)
                same = "yes" if r["tokens"] == full["tokens"] else "no"
                print(f"| {d} | {k} | {r['acceptance_rate']:.1%} | {r['tokens_per_round']:.2f} | {tps:.1f} | "
                      f"{tps / full_tps:.2f}x | {same} |", flush=True)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    p.add_argument("--balcony", default=None, help="trained exits (default: <checkpoint>/balcony.safetensors)")
    p.add_argument("--tables", nargs="+", default=TABLES[:-1], help=f"which tables, of {TABLES}")
    p.add_argument("--prompt", default=PROMPT, help="batch-1 user message, wrapped in the chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--mixed-batch", type=int, default=32, help="rows of the mixed-exit batch")
    p.add_argument("--speculate-k", type=int, nargs="+", default=[2, 3, 4], help="tokens drafted per round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    p.add_argument("--compile", action="store_true", help="torch.compile the one-token decode steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    add_quantize_args(p)
    p.add_argument("--gguf", type=Path, default=None,
                   help="precision table: the GGUF the checkpoint was converted from, for llama.cpp at full depth")
    p.add_argument("--tmp", default=None, help="precision table: folder for the exported GGUFs (default: the system's)")
    return p


if __name__ == "__main__":
    run_cli(main, get_parser().parse_args)

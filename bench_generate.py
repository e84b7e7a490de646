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
from cascade import bytes_per_token
from cli import DEFAULT_CHECKPOINT, DTYPES, UsageError, add_device_args, default_dtype, run_cli
from generate import compile_steps, generate
from quantize import quantize_checkpoint

PROMPT = "Explain in a few paragraphs why the sky is blue, and why sunsets are red."
QUESTIONS = [PROMPT, "What is the capital of France?", "Write a haiku about balconies.",
             "List three uses of a paperclip, with one sentence on each, and say which is the most surprising.",
             "Why do cats purr?", "Summarise the plot of Hamlet in two sentences.", "What is 17 times 23?",
             "Describe a sunrise over the sea to someone who has never seen one, in the style of a weather report."]
TABLES = ["hf", "batch", "mixed", "exits", "speculative", "precision"]
# --tables precision: column -> (model dtype: residual stream, norms, attention, KV cache; weights; head)
PRECISIONS = {"fp32": ("float32", "none", "none"), "bf16": ("bfloat16", "none", "none"),
              "int8": ("bfloat16", "int8", "int8"), "int4, fp32 residual and head": ("float32", "int4", "none"),
              "int4": ("bfloat16", "int4", "int8")}


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


def table_precision(tok, chat, prompt_ids, args):
    """Batch-1 decode tokens/s of every exit and full depth at each of PRECISIONS, transformers (fp32, full depth) and
    llama.cpp on GGUFs of the same exits, all loaded at once and run in turn, round after round (--warmup + --reps
    rounds, the median of the last --reps): a machine whose load changes during the run shifts every engine alike.
    Then how far each of ours gets of its ideal speedup, and --precision-batch-sizes throughput."""
    from bench_export import llama_cpp_greedy
    models = {}
    for label, (dtype, q, head) in PRECISIONS.items():
        models[label] = BalconyModel.from_checkpoint(args.checkpoint, args.balcony, device=args.device,
                                                     dtype=DTYPES[dtype])
        quantize_checkpoint(models[label], args.checkpoint, q, args.group_size, head)
    fp32 = models["fp32"]
    exits, n = [*fp32.exit_layers, None], args.max_new_tokens
    runs = {}  # key -> a function that decodes once and returns tokens/s
    for label, m in models.items():
        for e in exits:
            runs[label, e, 1] = lambda m=m, e=e: generate(m, [prompt_ids], n, exit=e)[0]["tokens_per_s"]
            for b in args.precision_batch_sizes:
                runs[label, e, b] = lambda m=m, e=e, b=b: decode_rate(m, batch_prompts(chat, b), e, args, rounds=1)

    hf, idx = transformers_model(fp32.model, tok), torch.tensor([prompt_ids])

    def theirs(k):
        t = time.perf_counter()
        with torch.no_grad():
            hf.generate(idx, max_new_tokens=k, min_new_tokens=k, do_sample=False)
        return time.perf_counter() - t
    runs["transformers fp32", None, 1] = lambda: (n - 1) / (theirs(n) - theirs(1))  # the prefill cancels

    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None
    tmp = tempfile.TemporaryDirectory(dir=args.tmp)
    if llama_cpp is not None:
        for (e, kind), path in llama_cpp_files(fp32, args, tmp.name).items():
            llm = llama_cpp.Llama(str(path), n_ctx=len(prompt_ids) + n, n_threads=args.threads, n_batch=512,
                                  verbose=False)
            runs[f"llama.cpp {kind}", e, 1] = lambda llm=llm: llama_cpp_greedy(llm, prompt_ids, n)[1]
    samples = {k: [] for k in runs}
    for r in range(args.warmup + args.reps):
        for k, run in runs.items():
            rate = run()
            if r >= args.warmup:
                samples[k].append(rate)
        print(f"  round {r + 1}/{args.warmup + args.reps} done", flush=True)
    tmp.cleanup()
    rate = {k: statistics.median(v) for k, v in samples.items()}
    engines = [*PRECISIONS, *dict.fromkeys(k[0] for k in runs if k[0].startswith("llama.cpp"))]

    name = lambda e: f"{fp32.n_layers} (full)" if e is None else str(e)
    cell = lambda k: f"{rate[k]:.1f}" if k in rate else "-"
    print(f"\nBatch 1, {len(prompt_ids)}-token chat prompt, {n} greedy tokens: decode tokens/s, median of {args.reps} "
          f"rounds (int4: group {args.group_size}; int4 and int8: int8 head; llama.cpp: "
          f"{'GGUFs of the same exits' if llama_cpp else 'llama-cpp-python is not installed, its columns are absent'})")
    q41 = "llama.cpp Q4_1"
    print("| exit | " + " | ".join(engines) + " | int4 / fp32 | int4 / llama.cpp Q4_1 |\n|---|" +
          "---|" * (len(engines) + 2))
    for e in exits:
        vs_cpp = f"{rate['int4', e, 1] / rate[q41, e, 1]:.2f}x" if (q41, e, 1) in rate else "-"
        print(f"| {name(e)} | " + " | ".join(cell((c, e, 1)) for c in engines) +
              f" | {rate['int4', e, 1] / rate['fp32', e, 1]:.2f}x | {vs_cpp} |")
    print(f"| transformers fp32, full depth | {rate['transformers fp32', None, 1]:.1f} |")

    print("\nEach exit's speedup over full depth against the ideal (MB of weights read per token, full / exit)")
    print("| exit | " + " | ".join(f"{c}: MB/token, speedup, of ideal" for c in PRECISIONS) + " |\n|---|" +
          "---|" * len(PRECISIONS))
    for e in exits[:-1]:
        cells = []
        for c, m in models.items():
            mb, full_mb, speedup = bytes_per_token(m, e) / 1e6, bytes_per_token(m, None) / 1e6, \
                rate[c, e, 1] / rate[c, None, 1]
            cells.append(f"{mb:.0f}, {speedup:.2f}x, {speedup / (full_mb / mb):.0%}")
        print(f"| {name(e)} | " + " | ".join(cells) + " |")
    if args.precision_batch_sizes:
        print("\nDecode tokens/s (all rows) against batch size per precision")
        print("| exit | batch | " + " | ".join(PRECISIONS) + " |\n|---|---|" + "---|" * len(PRECISIONS))
        for e in exits:
            for b in [1, *args.precision_batch_sizes]:
                print(f"| {name(e)} | {b} | " + " | ".join(cell((c, e, b)) for c in PRECISIONS) + " |")
    print(flush=True)


def decode_rate(model, prompts, exits, args, rounds=None) -> float:
    """Median over --reps (after --warmup; or of `rounds` runs) of all rows' new tokens (after each row's first) per
    second of the batch's decode."""
    rates = []
    warmup = 0 if rounds else args.warmup
    for _ in range(warmup + (rounds or args.reps)):
        rs = generate(model, prompts, args.max_new_tokens, exit=exits)
        rates.append(sum(len(r["tokens"]) - 1 for r in rs) / max(r["decode_s"] for r in rs))
    return statistics.median(rates[warmup:])


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
    args.dtype = args.dtype or default_dtype(device)
    model = BalconyModel.from_checkpoint(args.checkpoint, args.balcony, device=device, dtype=DTYPES[args.dtype])
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
        table_precision(tok, chat, prompt_ids, args)
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
    add_device_args(p)
    p.add_argument("--gguf", type=Path, default=None,
                   help="precision table: the GGUF the checkpoint was converted from, for llama.cpp at full depth")
    p.add_argument("--precision-batch-sizes", type=int, nargs="*", default=[],
                   help="precision table: batch sizes beyond 1 to measure at every exit and precision")
    p.add_argument("--tmp", default=None, help="precision table: folder for the exported GGUFs (default: the system's)")
    return p


if __name__ == "__main__":
    run_cli(main, get_parser().parse_args)

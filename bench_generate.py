"""
Decode speed at batch 1: each Balcony exit against the ideal speedup from the work it does, then self-speculative
decoding (draft exit x tokens drafted per round) against plain full-depth decoding.

The ideal speedup of exit k is (N layers + head) / (k layers + 1 balcony layer + head), counted in weights read per
token: batch-1 decoding is bound by reading weights (attention over a short cache adds ~2% per layer, the same
for every layer). Every run decodes exactly --max-new-tokens greedy tokens (eos ignored) after the same prompt.

    python bench_generate.py --balcony checkpoints/smollm2-135m-instruct/balcony.safetensors --max-new-tokens 128
"""
import argparse
import statistics
import time

import torch

from balcony import BalconyModel
from generate import compile_steps, generate
from cli import DEFAULT_CHECKPOINT, DTYPES, run_cli

PROMPT = "Explain in a few paragraphs why the sky is blue, and why sunsets are red."


def weights_per_token(model, exit) -> int:
    """Weights an exit reads per decoded token: its backbone layers, its balcony layer and the shared head."""
    n = model.n_layers if exit is None else exit
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    return n * layer + (exit is not None) * layer + model.model.output.weight.numel()


def bench(model, prompt_ids, args, **kw):
    """Median decode tokens/s over --reps runs after --warmup runs, and the last run's result."""
    for _ in range(args.warmup):
        generate(model, [prompt_ids], args.max_new_tokens, **kw)
    runs = [generate(model, [prompt_ids], args.max_new_tokens, **kw)[0] for _ in range(args.reps)]
    return statistics.median(r["tokens_per_s"] for r in runs), runs[-1]


def main(args):
    from tokenizer import Tokenizer

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    balcony = args.balcony or f"{args.checkpoint}/balcony.safetensors"
    model = BalconyModel.from_checkpoint(args.checkpoint, balcony, device, DTYPES[args.dtype])
    exits = model.exit_layers
    prompt_ids = Tokenizer.from_checkpoint(args.checkpoint).encode_chat([{"role": "user", "content": args.prompt}])
    print(f"{args.checkpoint}: {model.n_layers} layers, exits {exits}; device {device}, {args.dtype}, "
          f"torch threads {torch.get_num_threads()}, prompt {len(prompt_ids)} tokens, {args.max_new_tokens} new "
          f"tokens, {args.warmup} warmup + median of {args.reps} runs{', compiled' if args.compile else ''}\n")
    if args.compile:
        compile_steps()
        t = time.perf_counter()
        generate(model, [prompt_ids], args.max_new_tokens)
        print(f"compile (first full-depth run): {time.perf_counter() - t:.1f} s\n")

    full_tps, full = bench(model, prompt_ids, args)
    full_w = weights_per_token(model, None)
    print("| exit | weights/token (M) | ideal speedup | tokens/s | speedup | of ideal |")
    print("|---|---|---|---|---|---|")
    for exit in [*exits, None]:
        tps = full_tps if exit is None else bench(model, prompt_ids, args, exit=exit)[0]
        w = weights_per_token(model, exit)
        name = f"{model.n_layers} (full)" if exit is None else str(exit)
        print(f"| {name} | {w / 1e6:.1f} | {full_w / w:.2f}x | {tps:.1f} | {tps / full_tps:.2f}x | "
              f"{tps / full_tps / (full_w / w):.0%} |", flush=True)

    print("\n| draft exit | k | acceptance | tokens/full forward | tokens/s | speedup | greedy identical |")
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
    p.add_argument("--prompt", default=PROMPT, help="user message, wrapped in the chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--speculate-k", type=int, nargs="+", default=[2, 3, 4], help="tokens drafted per round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    p.add_argument("--compile", action="store_true", help="torch.compile the one-token decode steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    return p


if __name__ == "__main__":
    run_cli(main, get_parser().parse_args)

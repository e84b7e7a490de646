"""
An exported exit in llama.cpp against the same exit here: greedy tokens of a chat prompt must be equal, and the
decode speed of each engine is printed side by side. Needs llama-cpp-python (`pip install llama-cpp-python` builds
llama.cpp from source); it is not a requirement of the project.

    python bench_export.py --exit 21 --balcony /work/exits/chat-15-18-21.safetensors --max-new-tokens 64

The exit is exported to a float32 GGUF in a temporary folder (export.py), prompted with the chat template through our
tokenizer (llama.cpp's tokenisation of the same text is checked against it), then both decode --max-new-tokens tokens
greedily at batch 1 with --threads threads, eos ignored. tokens/s is decode only: (tokens - 1) / (time from the first
token to the last), the median of --reps runs.
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from balcony import BalconyModel
from cli import DEFAULT_CHECKPOINT, UsageError, parse_exit, run_cli
from export import export
from generate import generate

PROMPT = "Write a short story about a cat who lives on a balcony."


def llama_cpp_greedy(llm, prompt_ids: list, n: int):
    """n greedy tokens from llama.cpp after prompt_ids, and the decode tokens/s."""
    llm.reset()
    out, t1 = [], None
    for t in llm.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(t)
        if len(out) == 1:
            t1 = time.perf_counter()
        if len(out) == n:
            break
    return out, (n - 1) / (time.perf_counter() - t1)


def main(args):
    try:
        import llama_cpp
    except ImportError:
        raise UsageError("bench_export.py needs llama-cpp-python: pip install llama-cpp-python") from None
    from tokenizer import Tokenizer

    torch.set_num_threads(args.threads)
    exit = parse_exit(args.exit)
    bm = BalconyModel.from_checkpoint(args.checkpoint, args.balcony, [exit])
    tok = Tokenizer.from_checkpoint(args.checkpoint)
    text = tok.apply_chat_template([{"role": "user", "content": args.prompt}])
    prompt_ids = tok.encode(text, allowed_special="all")
    with tempfile.TemporaryDirectory(dir=args.tmp) as d:
        gguf = export(bm, exit, args.checkpoint, Path(d) / "exit.gguf", "gguf", "float32")
        llm = llama_cpp.Llama(str(gguf), n_ctx=len(prompt_ids) + args.max_new_tokens, n_threads=args.threads,
                              n_batch=512, verbose=False)
        cpp_prompt = llm.tokenize(text.encode(), add_bos=False, special=True)
        runs = [llama_cpp_greedy(llm, prompt_ids, args.max_new_tokens) for _ in range(args.reps)]
    cpp_tokens, cpp_tps = runs[-1][0], statistics.median(r[1] for r in runs)
    ours = [generate(bm, [prompt_ids], args.max_new_tokens, exit=exit)[0] for _ in range(args.reps)]
    our_tokens, our_tps = ours[-1]["tokens"], statistics.median(r["tokens_per_s"] for r in ours)
    same = next((i for i, (a, b) in enumerate(zip(cpp_tokens, our_tokens)) if a != b), len(our_tokens))

    label = "full" if exit is None else f"exit {exit}"
    print(f"{args.checkpoint} {label} ({args.balcony or 'no balcony file'}), float32, {args.threads} threads, "
          f"prompt {len(prompt_ids)} tokens (llama.cpp's tokenisation {'equal' if cpp_prompt == prompt_ids else 'DIFFERS'}"
          f"), {args.max_new_tokens} greedy tokens, median of {args.reps}; llama-cpp-python {llama_cpp.__version__}\n")
    print("| engine | decode tokens/s | greedy tokens equal to ours |")
    print("|---|---|---|")
    print(f"| ours (generate.py) | {our_tps:.1f} | - |")
    print(f"| llama.cpp (exported GGUF) | {cpp_tps:.1f} | {same}/{len(our_tokens)} |")
    print(f"\nours:      {tok.decode(our_tokens)!r}\nllama.cpp: {tok.decode(cpp_tokens)!r}")
    if same < len(our_tokens) or cpp_prompt != prompt_ids:
        return 1


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="converted model folder")
    p.add_argument("--balcony", default=None, help="trained exits (default: <checkpoint>/balcony.safetensors)")
    p.add_argument("--exit", default="21", help="exit layer, or 'full'")
    p.add_argument("--prompt", default=PROMPT, help="user message, wrapped in the chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tmp", default=None, help="folder for the temporary GGUF (default: the system's)")
    return p


if __name__ == "__main__":
    run_cli(main, get_parser().parse_args)

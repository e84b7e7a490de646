"""
The end of `make demo`: the same chat prompts answered at every exit and at full depth, side by side, with decode
tokens/s (greedy, batch 1, generate.py's generate()).

    python demo.py --exits 15,18,21,full
    python demo.py --prompt "Name three primary colors." --prompt "What is 2 + 3?" --max-new-tokens 48
"""
import argparse

import torch

from cli import DEFAULT_CHECKPOINT, DTYPES, add_device_args, default_dtype, parse_exits, quant_kwargs, run_cli

PROMPTS = ["What is the capital of France?", "Name three primary colors.", "How many legs does a spider have?"]


def main(args):
    from balcony import BalconyModel
    from generate import generate
    from quantize import quantize_checkpoint
    from tokenizer import Tokenizer

    exits = parse_exits(args.exits)
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype or default_dtype(args.device)]
    model = BalconyModel.from_checkpoint(args.checkpoint, args.balcony, exits, args.device, dtype)
    quantize_checkpoint(model, args.checkpoint, **quant_kwargs(args))
    tok = Tokenizer.from_checkpoint(args.checkpoint)
    for prompt in args.prompt or PROMPTS:
        ids = tok.encode_chat([{"role": "user", "content": prompt}])
        print(f"\n### {prompt}\n\n| exit | tokens/s | answer |\n|---|---|---|")
        for e in exits:
            r = generate(model, [ids], args.max_new_tokens, exit=e, eos_id=tok.stop_ids)[0]
            text = tok.decode([t for t in r["tokens"] if t not in tok.stop_ids]).strip().replace("\n", " / ")
            cut = "" if r["tokens"][-1] in tok.stop_ids else " ..."  # stopped by --max-new-tokens
            print(f"| {'full' if e is None else e} | {r['tokens_per_s']:.1f} | {text.replace('|', '/')}{cut} |",
                  flush=True)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="converted model folder")
    p.add_argument("--balcony", default=None, help="trained exits (default: <checkpoint>/balcony.safetensors)")
    p.add_argument("--exits", default="15,18,21,full", help="comma-separated exit layers; 'full' is full depth")
    p.add_argument("--prompt", action="append", help=f"a user message; repeat for more (default: {PROMPTS})")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    add_device_args(p)
    return p


if __name__ == "__main__":
    run_cli(main, get_parser().parse_args)

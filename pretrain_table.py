"""
The paper's Table 4 (section 4.3) at one small budget: a model pretrained from scratch with its balconies against the
same model pretrained with Sorted's nested exits, and, on the plainly pretrained model, frozen-backbone Balcony
(Eq. 2) against Sorted fine-tuning; each submodel's held-out perplexity, in Table 4's shape.

    OMP_NUM_THREADS=1 python pretrain_table.py          # tiny-16 on the Shakespeare plays: ~25 min on two CPU cores
    python pretrain_table.py --preset llm-1b --vocab-size 0 --data corpus/ --seq-len 2048 --batch-size 16 \\
        --max-steps 20000 --tune-steps 1000 --out out/table4-1b      # the paper's LLM-1B shape, on a GPU

| run         | train.py                                                      | Table 4                         |
|-------------|---------------------------------------------------------------|---------------------------------|
| plain       | --from-scratch PRESET --exit-layers none                      | the baseline (LLM-1B)           |
| balcony-pre | --from-scratch PRESET --exit-layers 4,8,12                    | pretraining, Balcony            |
| sorted-pre  | --from-scratch PRESET --exit-layers 4,8,12 --balcony none     | pretraining, Sorted             |
| balcony     | --checkpoint plain --exit-layers 4,8,12                       | standard, Balcony (frozen)      |
| sorted      | --checkpoint plain --exit-layers 4,8,12 --balcony none        | standard, Sorted fine-tuning    |
|             |   --train-backbone                                            |                                 |
| unfrozen    | --checkpoint plain --exit-layers 4,8,12 --train-backbone      | Figure 5: Balcony, unfrozen     |
| plain-tuned | --checkpoint plain --exit-layers none --train-backbone        | (a control: more plain training |
|             |   --loss ce                                                   |  on the standard runs' tokens)  |

The table also scores the plain model's exits untrained (--balcony none on its layers 4, 8, 12: the final norm and
head straight on layer k's state), what the standard runs start from.

The pretraining runs share --max-steps, the standard ones --tune-steps (the paper tunes on 4% of the pretraining
tokens). --vocab-size N first trains a byte-level BPE of N tokens on the training files (a 49152-wide head would
dominate a model this small); 0 keeps --checkpoint's tokenizer. Every run is a folder under --out that generate.py,
eval.py and export.py take as --checkpoint; a finished run is not trained again, an interrupted one resumes.
"""
import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

import train
from ablate import open_grid
from balcony import BalconyModel
from cli import DEFAULT_CHECKPOINT, ROOT, UsageError, run_cli
from data import CACHE_DIR, CORPUS, VAL_FILES, data_files, is_val_file, load_tokens, positive
from tokenizer import Tokenizer

EXITS = "4,8,12"
RUNS = {  # name: (setting, the train.py flags besides the budget)
    "plain": ("pretraining", ["--exit-layers", "none"]),
    "balcony-pre": ("pretraining", ["--exit-layers", EXITS]),
    "sorted-pre": ("pretraining", ["--exit-layers", EXITS, "--balcony", "none"]),
    "balcony": ("standard", ["--exit-layers", EXITS]),
    "sorted": ("standard", ["--exit-layers", EXITS, "--balcony", "none", "--train-backbone"]),
    "unfrozen": ("standard", ["--exit-layers", EXITS, "--train-backbone"]),
    # a control: the plain model trained on the standard runs' tokens too, at full depth alone
    "plain-tuned": ("standard", ["--exit-layers", "none", "--train-backbone", "--loss", "ce"]),
}
SIZES = {16: "XL", 12: "L", 8: "M", 4: "S"}  # the paper's names of the submodels of a 16-layer model


def train_tokenizer(files, vocab_size: int, out: Path) -> Path:
    """A byte-level BPE of vocab_size tokens (SmolLM2's kind, which tokenizer.py reads) trained with Hugging Face
    tokenizers on the training files alone (the held-out plays never shape the vocabulary). Returns its folder."""
    from tokenizers import Tokenizer as BPE, decoders, models, pre_tokenizers, trainers

    if (out / "tokenizer.json").is_file():
        return out
    bad = [f for f in files if f.suffix != ".txt"]
    if bad:
        raise UsageError(f"--vocab-size trains a vocabulary on .txt files, not {bad[0]}; pass --vocab-size 0 to use "
                         f"--checkpoint's tokenizer")
    bpe = BPE(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = (f.read_text(encoding="utf-8", errors="replace") for f in files if not is_val_file(f, VAL_FILES))
    bpe.train_from_iterator(texts, trainer)
    out.mkdir(parents=True, exist_ok=True)
    bpe.save(str(out / "tokenizer.json"))
    return out


def run_argv(name: str, args, out: Path, tok_dir: Path) -> list:
    """train.py's arguments for a run: its flags, the budget of its setting, and where it starts and writes."""
    setting, flags = RUNS[name]
    steps = args.max_steps if setting == "pretraining" else args.tune_steps
    start = ["--from-scratch", args.preset, "--tokenizer", tok_dir] if setting == "pretraining" else \
        ["--checkpoint", out / "plain"]
    budget = ["--max-steps", steps, "--warmup-steps", max(1, steps // 10), "--lr", args.lr, "--seq-len", args.seq_len,
              "--batch-size", args.batch_size, "--eval-every", steps, "--eval-windows", 1, "--save-every",
              max(1, steps // 4), "--device", args.device, "--cache-dir", args.cache_dir]
    exits = out / f"{name}.safetensors" if name == "balcony" else out / name / "balcony.safetensors"
    resume = ["--resume"] if exits.with_suffix(".state.pt").is_file() else []  # an interrupted run continues
    return [*map(str, [*start, *budget, *flags, "--out", exits if name == "balcony" else out / name]), "--data",
            *args.data, *resume]


def run_model(name: str, out: Path, device) -> BalconyModel:
    """A trained run as a BalconyModel: the frozen Balcony run is exits on the plain checkpoint, every other run a
    checkpoint folder with its exits inside (the plain one with none)."""
    ckpt = out / ("plain" if name == "balcony" else name)
    exits = out / "balcony.safetensors" if name == "balcony" else ckpt / "balcony.safetensors"
    return BalconyModel.from_checkpoint(ckpt, exits, device=device)


def submodel_params(bm: BalconyModel) -> dict:
    """Non-embedding parameters of each submodel, as Table 4 counts them: layers 1..k, the exit's balcony, the norm."""
    layer = [sum(p.numel() for p in m.parameters()) for m in bm.model.layers]
    norm = bm.model.norm.weight.numel()
    sizes = {k: sum(layer[:k]) + sum(p.numel() for p in bm.exits[str(k)].parameters()) for k in bm.exit_layers}
    sizes = {k: n + norm * (bm.kind == "none") for k, n in sizes.items()}  # a shared-norm exit uses the final norm
    return {**sizes, bm.n_layers: sum(layer) + norm}


@torch.no_grad()
def score(bm: BalconyModel, val, args) -> dict:
    """{depth: (non-embedding parameters, held-out perplexity)} for each exit and full depth."""
    ns = argparse.Namespace(seq_len=args.seq_len, batch_size=args.batch_size, eval_windows=args.eval_windows,
                            chunk_size=256)
    _, _, ppl = train.evaluate(bm, val, ns, contextlib.nullcontext())
    params = submodel_params(bm)
    return {k: (params[k], p) for k, p in zip([*bm.exit_layers, bm.n_layers], ppl)}


def table(results: dict, header: str) -> str:
    """Table 4's rows: per setting, the baseline, then Balcony and Sorted at each size, largest first."""
    lines = [header, "", "| setting | model | #params (non-emb.) | held-out perplexity |", "|---|---|---|---|"]

    def row(setting, label, run, depth):
        if run in results:
            params, ppl = results[run][str(depth)]
            lines.append(f"| {setting} | {label} | {params / 1e6:.2f}M | {ppl:.2f} |")

    row("pretraining", "plain (baseline)", "plain", 16)
    for setting, runs in (("pretraining", [("Balcony-{}", "balcony-pre"), ("Sorted-{}", "sorted-pre")]),
                          ("standard", [("Balcony-{}", "balcony"), ("Sorted-{}", "sorted"),
                                        ("Balcony-{} (unfrozen)", "unfrozen"),
                                        ("plain-{}, no exit training", "untrained")])):
        for depth, size in SIZES.items():
            for label, run in runs:
                row(setting, label.format(size), run, depth)
    row("standard", "plain trained on the tuning tokens too (control)", "plain-tuned", 16)
    return "\n".join(lines)


def main(args):
    runs, out = open_grid(args, RUNS, ("preset", "vocab_size", "max_steps", "tune_steps", "lr", "seq_len",
                                       "batch_size", "data"))
    if any(RUNS[r][0] == "standard" for r in runs) and "plain" not in runs:
        raise UsageError("the standard runs start from the plain pretrained model: keep 'plain' in --runs")
    files = data_files(args.data)
    tok_dir = train_tokenizer(files, args.vocab_size, out / "tokenizer") if args.vocab_size else \
        Path(args.checkpoint)
    minutes = json.loads((out / "minutes.json").read_text()) if (out / "minutes.json").is_file() else {}
    for name in runs:
        if not (out / (f"{name}.safetensors" if name == "balcony" else f"{name}/balcony.safetensors")).is_file():
            print(f"\n== {name}: train.py {' '.join(RUNS[name][1])}", flush=True)
            t0 = time.time()
            code = train.main(train.parse_args(run_argv(name, args, out, tok_dir)))
            if code:
                return code  # stopped (Ctrl-C): the state is saved, run again to continue
            minutes[name] = minutes.get(name, 0) + (time.time() - t0) / 60  # a resumed run adds its time
            (out / "minutes.json").write_text(json.dumps(minutes))

    print("\n== scoring", flush=True)
    val = load_tokens(args.data, Tokenizer.from_checkpoint(tok_dir), "val", cache_dir=args.cache_dir)
    models = {name: run_model(name, out, args.device) for name in runs}
    if "plain" in models:
        exits = [int(k) for k in EXITS.split(",")]
        models["untrained"] = BalconyModel(models["plain"].model, exits, kind="none").eval()
    results = {name: {str(k): v for k, v in score(bm, val, args).items()} for name, bm in models.items()}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    tokens = lambda steps: steps * args.batch_size * args.seq_len  # noqa: E731
    header = (f"{args.preset}, vocabulary {Tokenizer.from_checkpoint(tok_dir).vocab_size}; pretraining "
              f"{args.max_steps} steps = {tokens(args.max_steps) / 1e6:.2f}M tokens per run, standard tuning "
              f"{args.tune_steps} steps = {tokens(args.tune_steps) / 1e6:.2f}M tokens; held-out perplexity on "
              f"{args.eval_windows} x {args.seq_len} tokens; minutes: "
              + ", ".join(f"{r} {minutes[r]:.1f}" for r in runs if r in minutes))
    md = table(results, header)
    (out / "table.md").write_text(md + "\n")
    print("\n" + md)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = " (default: %(default)s)"
    p.add_argument("--runs", default=",".join(RUNS), help="comma-separated runs" + d)
    p.add_argument("--preset", default="tiny-16", choices=list(train.SCRATCH_PRESETS), help="model shape" + d)
    p.add_argument("--vocab-size", type=int, default=2048, help="train a BPE of this many tokens on the training "
                   "files; 0: --checkpoint's tokenizer" + d)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="the tokenizer with --vocab-size 0" + d)
    p.add_argument("--data", nargs="+", default=[str(CORPUS)], help="train.py's --data" + d)
    p.add_argument("--max-steps", type=positive, default=250, help="optimiser steps of each pretraining run" + d)
    p.add_argument("--tune-steps", type=positive, default=60, help="optimiser steps of each standard run" + d)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of every run" + d)
    p.add_argument("--seq-len", type=positive, default=128, help="tokens per window" + d)
    p.add_argument("--batch-size", type=positive, default=8, help="windows per step" + d)
    p.add_argument("--eval-windows", type=positive, default=256, help="held-out windows scored" + d)
    p.add_argument("--cache-dir", default=CACHE_DIR, help="token caches" + d)
    p.add_argument("--out", default=ROOT / "out" / "table4", help="runs, results.json and table.md" + d)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def parse_args(argv=None):
    p = get_parser()
    args = p.parse_args(argv)
    if args.vocab_size and args.vocab_size < 257:
        p.error("--vocab-size must be 0 (--checkpoint's tokenizer) or at least 257 (the 256 bytes and <|endoftext|>)")
    return args


if __name__ == "__main__":
    run_cli(main, parse_args)

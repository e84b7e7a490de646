"""
Command-line plumbing shared by every script: the error users can fix, the one __main__, the --dtype names, the one
--exit rule and the one way to write a file. model.py holds the model; this file holds what a command line needs
around it.
"""
import os
import re
import shutil
import sys
from collections import namedtuple
from pathlib import Path

import torch


# Default paths are anchored at the repository, not the working directory, so scripts run from anywhere
ROOT = Path(__file__).resolve().parent
DEFAULT_CHECKPOINT = ROOT / "checkpoints" / "smollm2-135m-instruct"  # what convert_hf.py --default writes
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # --dtype choices
DTYPE_HELP = "default: bfloat16 on CUDA, float32 on CPU"
QUANTIZE = ("none", "int8", "int4")  # --quantize choices (quantize.py)
QUANTIZE_HEADS = ("none", "int8", "int4", "bfloat16")  # --quantize-head choices; none: the head as loaded


def add_quantize_args(parser):
    """--quantize, --group-size and --quantize-head, for every script that decodes (quantize.quantize_checkpoint)."""
    parser.add_argument("--quantize", choices=QUANTIZE, default="none",
                        help="weight-only quantisation at load: int4 groupwise (a GGUF's own Q4 blocks where the "
                             "checkpoint has them) or int8 per channel; bf16 activations in the matrix products")
    parser.add_argument("--group-size", type=int, default=32, help="int4: inputs per scale and zero (32: GGUF's)")
    parser.add_argument("--quantize-head", choices=QUANTIZE_HEADS, default="none",
                        help="the LM head's form under --quantize; none: as loaded, in --dtype (int8 and bfloat16 "
                             "heads give bf16 logits, which cost ~2 points of top-1 agreement: docs/quantization.md)")


def add_device_args(parser):
    """--device, --dtype and add_quantize_args': where and in what form a script that decodes holds the model."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=list(DTYPES), help=DTYPE_HELP)
    add_quantize_args(parser)


def quant_kwargs(args) -> dict:
    """add_quantize_args' values as quantize.quantize_checkpoint's (and generate.load_model's) keyword arguments."""
    return dict(mode=args.quantize, group_size=args.group_size, head=args.quantize_head)


def default_dtype(device) -> str:
    """Every script's --dtype when none is given: bfloat16 on CUDA (tensor cores, half the weights to read), float32
    on CPU (where bf16 matmuls gain little and the references are fp32)."""
    return "bfloat16" if torch.device(device).type == "cuda" else "float32"


class UsageError(Exception):
    """A problem the user can fix (bad path, wrong flag, mismatched checkpoint); CLIs print it as one line."""


Auto = namedtuple("Auto", "threshold")  # the confidence cascade as an exit: 'auto' (threshold None) or 'auto@T'


def parse_exits(text: str, auto: bool = False) -> list:
    """The one rule for exits on a command line (--exit, --exits): comma-separated layer numbers, 'full' (None: full
    depth, the untouched model) and, where the confidence cascade applies, 'auto' or 'auto@T' (Auto(T))."""
    exits = []
    for s in filter(None, map(str.strip, text.split(","))):
        if s == "full" or s.isdigit():
            exits.append(None if s == "full" else int(s))
        elif auto and (s == "auto" or s.startswith("auto@") and re.fullmatch(r"\d*\.?\d+", s[5:])):
            exits.append(Auto(float(s[5:]) if s != "auto" else None))
        else:
            forms = "layer numbers, 'full', 'auto' and auto@THRESHOLD (e.g. auto@0.9)" if auto else \
                "layer numbers and 'full'"
            raise UsageError(f"an exit is one of {forms}, not {s!r}")
    if not exits:
        raise UsageError(f"no exit given; exits are {'layer numbers' if not auto else 'layer numbers, auto'} or 'full'")
    return exits


def parse_exit(text: str, auto: bool = False):
    """One exit (--exit), by parse_exits' rule."""
    exits = parse_exits(text, auto)
    if len(exits) > 1:
        raise UsageError(f"one exit, not {len(exits)}: {text!r}")
    return exits[0]


def atomic_write(path, write):
    """Write `path` whole or not at all: write (a function of a path: it writes a file or a folder there; or text,
    written as UTF-8) fills a temporary name beside `path`, which then takes its place. An interrupted run never leaves
    a half-written `path`, and an old one goes only once the new one is complete."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    _remove(tmp)  # left by an interrupted run
    if isinstance(write, str):
        tmp.write_text(write, encoding="utf-8")
    else:
        write(tmp)
    if tmp.is_dir() or path.is_dir():  # a rename replaces a file, never a folder
        _remove(path)
    os.replace(tmp, path)


def _remove(path: Path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def run_cli(main, parse_args):
    """Every script's __main__: main(parse_args()). A UsageError ends as one line and exit code 2, like argparse's own
    errors, and Ctrl-C as exit code 130: never a traceback. On CUDA, float32 matmuls (a float32 run, the exits'
    fp32 weights under autocast) use TF32 tensor cores, as nanoGPT's do; tests calling main() keep exact fp32."""
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
    try:
        sys.exit(main(parse_args()))
    except UsageError as e:
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)

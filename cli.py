"""
Command-line plumbing shared by every script: the error users can fix, the one __main__, and the --dtype names.
model.py holds the model; this file holds what a command line needs around it.
"""
import sys
from pathlib import Path

import torch


# Default paths are anchored at the repository, not the working directory, so scripts run from anywhere
ROOT = Path(__file__).resolve().parent
DEFAULT_CHECKPOINT = ROOT / "checkpoints" / "smollm2-135m-instruct"  # what convert_hf.py --default writes
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # --dtype choices
QUANTIZE = ("none", "int8", "int4")  # --quantize choices (quantize.py)
QUANTIZE_HEADS = ("int8", "int4", "bfloat16", "none")  # --quantize-head choices; none: the head as loaded


def add_quantize_args(parser):
    """--quantize, --group-size and --quantize-head, for every script that decodes (quantize.quantize_checkpoint)."""
    parser.add_argument("--quantize", choices=QUANTIZE, default="none",
                        help="weight-only quantisation at load: int4 groupwise (a GGUF's own Q4 blocks where the "
                             "checkpoint has them) or int8 per channel; bf16 activations in the matrix products")
    parser.add_argument("--group-size", type=int, default=32, help="int4: inputs per scale and zero (32: GGUF's)")
    parser.add_argument("--quantize-head", choices=QUANTIZE_HEADS, default="int8",
                        help="the LM head's form under --quantize (the embedding table stays as loaded)")


def quant_kwargs(args) -> dict:
    """add_quantize_args' values as quantize.quantize_checkpoint's (and generate.load_model's) keyword arguments."""
    return dict(mode=args.quantize, group_size=args.group_size, head=args.quantize_head)


class UsageError(Exception):
    """A problem the user can fix (bad path, wrong flag, mismatched checkpoint); CLIs print it as one line."""


def run_cli(main, parse_args):
    """Every script's __main__: main(parse_args()). A UsageError ends as one line and exit code 2, like argparse's own
    errors, and Ctrl-C as exit code 130: never a traceback."""
    try:
        sys.exit(main(parse_args()))
    except UsageError as e:
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)

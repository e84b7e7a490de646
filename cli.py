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
DTYPE_HELP = "default: bfloat16 on CUDA, float32 on CPU"


def default_dtype(device) -> str:
    """Every script's --dtype when none is given: bfloat16 on CUDA (tensor cores, half the weights to read), float32
    on CPU (where bf16 matmuls gain little and the references are fp32)."""
    return "bfloat16" if torch.device(device).type == "cuda" else "float32"


class UsageError(Exception):
    """A problem the user can fix (bad path, wrong flag, mismatched checkpoint); CLIs print it as one line."""


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

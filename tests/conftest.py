"""Shared fixtures: tiny random LLaMA checkpoints (config.json, model.safetensors, a byte-level BPE tokenizer.json)
written the way convert_hf.py writes real ones, so every script can be exercised on CPU in seconds."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import ModelArgs, Transformer  # noqa: E402

TINY = dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=320, hidden_dim=96, max_seq_len=256,
            rope_theta=10000.0, tie_embeddings=True)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ("To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer "
          "The slings and arrows of outrageous fortune, Or to take arms against a sea of troubles. 0123456789 ") * 20


def tiny_args(**overrides) -> ModelArgs:
    return ModelArgs(**{**TINY, **overrides})


def write_tiny_tokenizer(path: Path, specials=SPECIALS) -> Path:
    """A real byte-level BPE (GPT-2 style, like SmolLM2's) trained on a fixed text: ids < 320, specials first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer)
    tok.save(str(path))
    return path


def make_tiny_checkpoint(path: Path, seed: int = 0, **overrides) -> Path:
    """A converted-checkpoint folder with random weights; returns the folder."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    args = tiny_args(**overrides)
    torch.manual_seed(seed)
    model = Transformer(args)
    (path / "config.json").write_text(args.to_json())
    save_file({k: v.contiguous() for k, v in model.checkpoint_state_dict().items()}, str(path / "model.safetensors"))
    write_tiny_tokenizer(path / "tokenizer.json")
    return path


def run_script(script: str, *argv) -> tuple:
    """`python script argv...` in this interpreter, as its __main__ runs it (cli.run_cli, with sys.argv set): its
    (exit code, stdout, stderr). A fresh interpreter would add only its start and the imports, seconds a call; tests
    keep subprocesses where the process itself is tested (signals, crashes, torchrun, one end-to-end error line)."""
    import contextlib
    import importlib
    import io

    from cli import run_cli
    module, out, err, saved = importlib.import_module(Path(script).stem), io.StringIO(), io.StringIO(), sys.argv
    sys.argv = [script, *map(str, argv)]  # argparse's prog and usage, and run_cli's error prefix, read it
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run_cli(module.main, getattr(module, "parse_args", None) or module.get_parser().parse_args)
    except SystemExit as e:  # run_cli always ends with sys.exit
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        sys.argv = saved
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def tiny_ckpt(tmp_path) -> Path:
    return make_tiny_checkpoint(tmp_path / "tiny")

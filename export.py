"""
Export a Balcony exit as a standalone Llama, a Hugging Face folder or a llama.cpp GGUF (like llama2.c's export.py):

    python export.py --exit 18 --out exports/exit18                       # transformers, vLLM, lm-eval
    python export.py --exit 21 --format gguf --out exports/exit21.gguf    # llama.cpp; --dtype q8_0|q4_1|q4_0
    python export.py --exit full --out exports/base                       # the base model itself

Exit k is, exactly, a plain Llama with k + 1 layers (paper section 3, Eq. 1): backbone layers 1..k, the balcony block
as layer k + 1, the balcony's RMSNorm as the final norm, and the shared embedding and head. Written out that way, any
engine that runs Llama runs the exit. Tensor names are convert_hf.py's rename tables read backwards, and GGUF's Q/K
rows get the permutation convert_hf.py undoes, so the round trip closes: convert_hf.py on an export gives back a
checkpoint whose logits equal the exit's. The output is written under a temporary name and renamed when complete.
"""
import argparse
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from cli import DEFAULT_CHECKPOINT, DTYPES, UsageError, atomic_write, parse_exit, run_cli
from convert_hf import (GGUF_PRE_TOKENIZERS, GGUF_WEIGHT_MAP, HF_WEIGHT_MAP, TOKENIZER_FILES, expected_shapes,
                        gguf_pre_tokenizer, permute, rename)
from model import ModelArgs, rope_inv_freq

GGUF_TYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0",
              "q4_1": "Q4_1"}  # --dtype -> GGML type


def exit_as_llama(bm, exit):
    """Exit `exit` (None: full depth) as a plain Llama: its ModelArgs and state dict in our names, tensors shared."""
    base = bm.model
    sd = base.checkpoint_state_dict()  # a tied head is the embedding, not stored twice
    if bm._check_exit(exit) is None:
        return base.args, sd
    sd = {k: v for k, v in sd.items() if not (k.startswith("layers.") and int(k.split(".")[1]) >= exit)}
    if bm.kind == "none":  # Sorted's exit (train.py --balcony none): layers 1..exit, the final norm and the head
        return replace(base.args, n_layers=exit), sd
    if bm.kind != "block":
        raise UsageError(f"exit {exit} is a {bm.kind!r} balcony (train.py --balcony {bm.kind}), not a decoder block: "
                         f"a plain Llama cannot hold it; export full depth or a block balcony")
    args = replace(base.args, n_layers=exit + 1)
    ex = bm.exits[str(exit)]
    sd.update({f"layers.{exit}.{k}": v for k, v in ex.layer.state_dict().items()})  # the balcony is layer k + 1
    sd["norm.weight"] = ex.norm.weight  # and its norm the final norm
    assert set(sd) == set(expected_shapes(args))
    return args, sd


def renamed(sd: dict, weight_map: dict, n_layers: int) -> dict:
    """Our names -> a format's, with convert_hf.py's source -> ours table inverted (one table for both ways)."""
    ours_to_theirs = {ours: theirs for theirs, ours in weight_map.items() if ours is not None}
    return {rename(name, ours_to_theirs, n_layers): t for name, t in sd.items()}


# ----------------------------------------------------------------------------- Hugging Face folder

def hf_config(args: ModelArgs, tok, dtype: str) -> dict:
    """A transformers LlamaConfig dict for args: the inverse of ModelArgs.from_hf_config."""
    scaling = {"rope_type": "llama3", **args.rope_scaling} if args.rope_scaling else None
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
            "intermediate_size": args.hidden_dim, "num_hidden_layers": args.n_layers,
            "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
            "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
            "rope_scaling": scaling, "max_position_embeddings": args.max_seq_len,
            "tie_word_embeddings": args.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
            "mlp_bias": False, "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "torch_dtype": dtype}


def write_hf(out: Path, args: ModelArgs, sd: dict, ckpt: Path, tok, dtype: str):
    from safetensors.torch import save_file

    out.mkdir()
    hf_sd = {k: v.to(DTYPES[dtype]).contiguous() for k, v in renamed(sd, HF_WEIGHT_MAP, args.n_layers).items()}
    save_file(hf_sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(args, tok, dtype), indent=2))
    for f in TOKENIZER_FILES:
        if (ckpt / f).is_file():
            shutil.copyfile(ckpt / f, out / f)
    config = json.loads((out / "tokenizer_config.json").read_text()) if (out / "tokenizer_config.json").is_file() \
        else {}
    if (out / "tokenizer.json").is_file() and "tokenizer_class" not in config:
        # a folder converted from GGUF has no tokenizer class: name the one that reads tokenizer.json as it is
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1, ensure_ascii=False))
    if not (out / "generation_config.json").is_file():  # HF's generate() stops at these (ChatML's <|im_end|>, ...)
        stop = sorted(tok.stop_ids)
        (out / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": tok.bos_id, "eos_token_id": stop[0] if len(stop) == 1 else stop}, indent=1))


# ----------------------------------------------------------------------------- GGUF

def add_gguf_tokenizer(w, ckpt: Path, tok, n_vocab: int):
    """tokenizer.ggml.* from a byte-level BPE tokenizer.json: the inverse of convert_hf.gguf_tokenizer."""
    from tokenizer import bytelevel_pattern

    path = ckpt / "tokenizer.json"
    tj = json.loads(path.read_text()) if path.is_file() else {}
    if tj.get("model", {}).get("type") != "BPE" or (tj.get("decoder") or {}).get("type") != "ByteLevel":
        raise UsageError(f"{ckpt} has no byte-level BPE tokenizer.json; GGUF export supports only that tokenizer "
                         "(SmolLM2, Llama-3 style): export --format hf instead")
    pattern = bytelevel_pattern(tj["pre_tokenizer"])
    pre = next((p for p in GGUF_PRE_TOKENIZERS if bytelevel_pattern(gguf_pre_tokenizer(p)) == pattern), None)
    if pre is None:
        raise UsageError(f"{path}: its pre-tokenizer has no llama.cpp name we know ({', '.join(GGUF_PRE_TOKENIZERS)})")
    tokens, types = [f"[PAD{i}]" for i in range(n_vocab)], [5] * n_vocab  # ids the tokenizer lacks: llama.cpp's pads
    for t, i in tj["model"]["vocab"].items():
        tokens[i], types[i] = t, 1  # llama.cpp token types: 1 normal, 3 control, 4 user-defined, 5 unused
    for a in tj["added_tokens"]:
        tokens[a["id"]], types[a["id"]] = a["content"], 3 if a["special"] else 4
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    w.add_add_bos_token(tok.add_bos)
    if tok.bos_id is not None:
        w.add_bos_token_id(tok.bos_id)
    if tok.eos_id is not None:
        w.add_eos_token_id(tok.eos_id)
    config = json.loads((ckpt / "tokenizer_config.json").read_text()) if (ckpt / "tokenizer_config.json").is_file() \
        else {}
    unk = config.get("unk_token")
    unk = unk["content"] if isinstance(unk, dict) else unk
    if unk in tokens:
        w.add_unk_token_id(tokens.index(unk))
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)


def write_gguf(out: Path, args: ModelArgs, sd: dict, ckpt: Path, tok, dtype: str, name: str):
    import gguf
    from gguf.quants import quantize

    Q = gguf.GGMLQuantizationType
    qtype = Q[GGUF_TYPES[dtype]]
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name(name)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype == Q.F32 else gguf.LlamaFileType[f"MOSTLY_{qtype.name}"])
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_block_count(args.n_layers)
    w.add_feed_forward_length(args.hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    if args.head_dim != args.dim // args.n_heads:
        w.add_key_length(args.head_dim)
        w.add_value_length(args.head_dim)
    w.add_rope_dimension_count(args.head_dim)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_vocab_size(args.vocab_size)
    quantised = qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1)
    if quantised:
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_gguf_tokenizer(w, ckpt, tok, args.vocab_size)
    tensors = renamed(sd, GGUF_WEIGHT_MAP, args.n_layers)
    if args.rope_scaling is not None:  # Llama-3.1 scaling as llama.cpp stores it: one divisor per frequency
        tensors["rope_freqs.weight"] = rope_inv_freq(replace(args, rope_scaling=None)) / rope_inv_freq(args)
        w.add_rope_scaling_orig_ctx_len(args.rope_scaling["original_max_position_embeddings"])  # for convert_hf.py
    for name, t in tensors.items():
        x = t.detach().float()
        if name.endswith(("attn_q.weight", "attn_k.weight")):  # back to llama.cpp's interleaved RoPE rows
            x = permute(x, args.n_heads if name.endswith("attn_q.weight") else args.n_kv_heads)
        x = x.numpy()
        # norms and rope_freqs stay float32 (llama.cpp wants that); quantised types need rows in blocks of 32, else
        # float16; at 4 bits the embedding (the tied head) is Q8_0, as in llama.cpp's own Q4 files
        t_type = Q.F32 if x.ndim == 1 else qtype if not quantised or x.shape[1] % 32 == 0 else Q.F16
        if t_type in (Q.Q4_0, Q.Q4_1) and name in ("token_embd.weight", "output.weight"):
            t_type = Q.Q8_0
        w.add_tensor(name, quantize(x, t_type), raw_dtype=t_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ----------------------------------------------------------------------------- main

def check_out(out: Path, fmt: str, dtype: str, force: bool):
    if dtype not in (GGUF_TYPES if fmt == "gguf" else DTYPES):
        raise UsageError(f"--dtype {dtype} is for GGUF only; a Hugging Face folder takes {', '.join(DTYPES)}")
    if out.exists() and not force:
        raise UsageError(f"{out} exists; pass --force to replace it")


def export(bm, exit, ckpt, out, fmt: str = "hf", dtype: str = "float32", force: bool = False) -> Path:
    """Write exit `exit` (None: full depth) of a loaded BalconyModel as a Hugging Face folder or a GGUF file."""
    from tokenizer import Tokenizer

    ckpt, out = Path(ckpt), Path(out)
    check_out(out, fmt, dtype, force)
    args, sd = exit_as_llama(bm, exit)
    tok = Tokenizer.from_checkpoint(ckpt)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "gguf":
        label = "full" if exit in (None, bm.n_layers) else f"exit {exit}"
        atomic_write(out, lambda tmp: write_gguf(tmp, args, sd, ckpt, tok, dtype, name=f"{ckpt.name} {label}"))
    else:  # --force: the old export goes only once the new one is complete
        atomic_write(out, lambda tmp: write_hf(tmp, args, sd, ckpt, tok, dtype))
    return out


def main(args):
    from balcony import BalconyModel

    exit = parse_exit(args.exit)
    check_out(args.out, args.format, args.dtype, args.force)  # before loading anything
    bm = BalconyModel.from_checkpoint(args.checkpoint, args.balcony, [exit])  # float32: every --dtype is cast from it
    out = export(bm, exit, args.checkpoint, args.out, args.format, args.dtype, args.force)
    n = bm.n_layers if exit in (None, bm.n_layers) else exit + (bm.kind != "none")  # a balcony is one more layer
    print(f"wrote {out} ({args.format}, {n} layers, {args.dtype})", file=sys.stderr)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="converted model folder")
    p.add_argument("--balcony", default=None, help="trained exits (default: <checkpoint>/balcony.safetensors); "
                                                   "not needed for --exit full")
    p.add_argument("--exit", default="full", help="exit layer to export, or 'full' for the base model")
    p.add_argument("--out", type=Path, required=True, help="output folder (hf) or .gguf file (gguf)")
    p.add_argument("--format", choices=["hf", "gguf"], default="hf")
    p.add_argument("--dtype", choices=[*DTYPES, "q8_0", "q4_0", "q4_1"], default="float32",
                   help="weights dtype; q8_0, q4_0, q4_1: GGUF only (at 4 bits the embedding and head are Q8_0)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    return p


if __name__ == "__main__":
    run_cli(main, get_parser().parse_args)

"""
Convert a Hugging Face LLaMA folder or a llama.cpp GGUF file into our checkpoint format:

    python convert_hf.py --default      # SmolLM2-135M-Instruct's GGUF -> checkpoints/smollm2-135m-instruct
    python convert_hf.py path/to/Llama-3.2-1B --out checkpoints/llama-3.2-1b --dtype bfloat16
    python convert_hf.py model.Q8_0.gguf --out checkpoints/mine

The output folder holds config.json (ModelArgs), model.safetensors (Meta's names, see model.py) and the tokenizer
files tokenizer.py reads. Conversion is strict: every source tensor must map to one of ours and every one of ours must
be filled with the right shape, else it stops and names the tensor. --dtype auto keeps an HF checkpoint's dtype and
writes a GGUF's dequantised weights as float32 (quantised values with fp16 scales are not all exact in bf16). A GGUF's
Q4_0 / Q4_1 tensors also keep their own blocks, in model.q4.safetensors, for `--quantize int4` (see quantize.py).
"""
import argparse
import json
import pickle
import re
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cli import DEFAULT_CHECKPOINT, DTYPES, ROOT, UsageError, atomic_write, run_cli
from model import ModelArgs, rope_inv_freq
from quantize import BLOCKS_FILE, gguf_q4_blocks
from tokenizer import LLAMA3_PATTERN

# source name -> our name, {} is the layer index (gpt-fast's weight_map); None: a buffer we recompute, skipped
HF_WEIGHT_MAP = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.self_attn.rotary_emb.inv_freq": None,
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
GGUF_WEIGHT_MAP = {
    "token_embd.weight": "tok_embeddings.weight",
    "blk.{}.attn_q.weight": "layers.{}.attention.wq.weight",
    "blk.{}.attn_k.weight": "layers.{}.attention.wk.weight",
    "blk.{}.attn_v.weight": "layers.{}.attention.wv.weight",
    "blk.{}.attn_output.weight": "layers.{}.attention.wo.weight",
    "blk.{}.ffn_gate.weight": "layers.{}.feed_forward.w1.weight",
    "blk.{}.ffn_down.weight": "layers.{}.feed_forward.w2.weight",
    "blk.{}.ffn_up.weight": "layers.{}.feed_forward.w3.weight",
    "blk.{}.attn_norm.weight": "layers.{}.attention_norm.weight",
    "blk.{}.ffn_norm.weight": "layers.{}.ffn_norm.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "rope_freqs.weight": None,  # Llama-3.1's RoPE scaling, read into ModelArgs.rope_scaling by gguf_args
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


def expected_shapes(args: ModelArgs) -> dict:
    """Our checkpoint's tensor names and shapes, without allocating the model."""
    from model import Transformer
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in Transformer(args).checkpoint_state_dict().items()}


def rename(name: str, weight_map: dict, n_layers: int):
    """Our name for a source tensor (None: skip it); an unknown name or a layer past n_layers is an error."""
    m = re.search(r"\.(\d+)\.", name)
    key = name if m is None else name.replace(m.group(0), ".{}.", 1)
    if key not in weight_map or (m is not None and int(m.group(1)) >= n_layers):
        raise UsageError(f"unknown tensor {name!r} in the source; is this a LLaMA checkpoint?")
    target = weight_map[key]
    return None if target is None else target.format(*([m.group(1)] if m else []))


# ----------------------------------------------------------------------------- Hugging Face folders

def hf_tensors(src: Path):
    """Yield (name, tensor) from model.safetensors, sharded safetensors, or pytorch_model*.bin, lazily."""
    from safetensors import SafetensorError, safe_open
    index = src / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (src / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        files = sorted(p.name for p in src.glob("pytorch_model*.bin"))
        if not files:
            raise UsageError(f"{src} has no model.safetensors, model.safetensors.index.json or pytorch_model*.bin")
    for f in files:
        path = src / f
        if not path.is_file():
            raise UsageError(f"{path} not found (listed in {index.name})")
        try:
            if f.endswith(".safetensors"):
                with safe_open(path, framework="pt") as st:  # memory-mapped, one tensor at a time
                    for name in st.keys():
                        yield name, st.get_tensor(name)
            else:
                yield from torch.load(path, map_location="cpu", weights_only=True, mmap=True).items()
        except (SafetensorError, RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as e:
            raise UsageError(f"{path} is unreadable ({str(e).splitlines()[0]}); is the file complete?") from None


def convert_hf(src: Path):
    config = src / "config.json"
    if not config.is_file():
        raise UsageError(f"{config} not found; SRC must be a Hugging Face model folder or a .gguf file")
    args = ModelArgs.from_hf_config(config)

    def tensors():
        for name, t in hf_tensors(src):
            ours = rename(name, HF_WEIGHT_MAP, args.n_layers)
            if ours == "output.weight" and args.tie_embeddings:
                continue  # tied: the head is the embedding, HF ignores a stored lm_head too
            if ours is not None:
                yield ours, t
    return args, tensors(), None, {}


# ----------------------------------------------------------------------------- GGUF files

def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    # llama.cpp's convert permutes Q and K rows for interleaved RoPE (pairs 2i, 2i+1); our RoPE is HF's rotate-half
    # (pairs i, i + hd/2). Per head, rows go from (hd/2, 2) order back to (2, hd/2). Without it: perplexity x30.
    out, inp = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    # the inverse of unpermute, for export.py writing a GGUF: per head, rows go from (2, hd/2) order to (hd/2, 2)
    out, inp = w.shape
    return w.reshape(n_heads, 2, out // n_heads // 2, inp).swapaxes(1, 2).reshape(out, inp)


def gguf_args(reader) -> ModelArgs:
    def get(key, default=None):
        f = reader.fields.get(key)
        if f is None:
            if default is None:
                raise UsageError(f"GGUF metadata {key} is missing")
            return default
        return f.contents()

    arch = get("general.architecture")
    if arch != "llama":
        raise UsageError(f"GGUF architecture {arch!r} is not supported; only 'llama' is")
    n_vocab = len(reader.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in reader.fields \
        else get("llama.vocab_size")
    as_decimal = lambda x: float(str(np.float32(x)))  # metadata floats are float32: 1e-5 reads 9.99999974e-06
    args = ModelArgs(
        dim=get("llama.embedding_length"), n_layers=get("llama.block_count"),
        n_heads=get("llama.attention.head_count"), n_kv_heads=get("llama.attention.head_count_kv", 0) or None,
        vocab_size=n_vocab, hidden_dim=get("llama.feed_forward_length"),
        head_dim=get("llama.attention.key_length", 0) or None,
        norm_eps=as_decimal(get("llama.attention.layer_norm_rms_epsilon")),
        rope_theta=as_decimal(get("llama.rope.freq_base", 10000.0)), max_seq_len=get("llama.context_length"),
        tie_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
    )
    # RoPE scaling. llama.cpp's converters store Llama-3.1's as rope_freqs.weight, the per-frequency divisors; a GGUF
    # may instead (or also) say rope.scaling.type 'llama3' with its factor and original context. Either way the low and
    # high frequency factors are Meta's published ones (GGUF has no key for them), and stored divisors must agree.
    # Linear, YaRN and LongRoPE scaling would need a RoPE model.py does not have: refused, not silently ignored.
    kind = get("llama.rope.scaling.type", "none")
    if kind not in ("none", "llama3") or get("llama.rope.scale_linear", 1.0) != 1.0:
        kind = "linear" if kind == "none" else kind  # the legacy rope.scale_linear key
        raise UsageError(f"GGUF RoPE scaling {kind!r} is not supported (only Llama-3.1's 'llama3' is); converting it "
                         "would run the model with wrong positions")
    rope_freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    divisors = None if rope_freqs is None else torch.from_numpy(np.array(rope_freqs.data, dtype=np.float32))
    if kind == "llama3" or divisors is not None:
        factor = get("llama.rope.scaling.factor") if kind == "llama3" else divisors.max().item()
        old_len = get("llama.rope.scaling.original_context_length", 8192)
        args.rope_scaling = dict(factor=as_decimal(factor), low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=old_len)
        if divisors is not None and not torch.allclose(rope_inv_freq(replace(args, rope_scaling=None)) / divisors,
                                                       rope_inv_freq(args), rtol=1e-4):
            raise UsageError(f"rope_freqs.weight does not match Llama-3.1's RoPE scaling {args.rope_scaling}; this "
                             "GGUF is not supported")
    return args


GGUF_PRE_TOKENIZERS = ("smollm", "gpt-2", "llama-bpe")  # llama.cpp's tokenizer.ggml.pre names we know


def gguf_pre_tokenizer(pre: str) -> dict:
    """HF's tokenizer.json pre_tokenizer for llama.cpp's pre-tokenizer name (export.py matches it backwards)."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if pre == "smollm":  # llama.cpp's 'smollm': every digit is its own piece, then GPT-2's regex
        return {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    if pre in ("gpt-2", "default"):
        return byte_level
    if pre == "llama-bpe":  # Llama-3: its own split regex, then bytes only
        return {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
            dict(byte_level, use_regex=False)]}
    raise UsageError(f"GGUF pre-tokenizer {pre!r} is not supported (known: {', '.join(GGUF_PRE_TOKENIZERS)})")


def gguf_tokenizer(reader) -> dict:
    """tokenizer.json + tokenizer_config.json (HF's format, so HF's tokenizers can read it) from tokenizer.ggml.*"""
    f = reader.fields
    kind = f["tokenizer.ggml.model"].contents() if "tokenizer.ggml.model" in f else None
    if kind != "gpt2":
        raise UsageError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2'); "
                         "convert the model's Hugging Face folder instead")
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"):
        if key not in f:
            raise UsageError(f"GGUF metadata {key} is missing")
    tokens, types = f["tokenizer.ggml.tokens"].contents(), f["tokenizer.ggml.token_type"].contents()
    pre = f["tokenizer.ggml.pre"].contents() if "tokenizer.ggml.pre" in f else "default"
    pre_tokenizer = gguf_pre_tokenizer(pre)
    control = [i for i, t in enumerate(types) if t == 3]  # llama.cpp token type 3 = control (special) token
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i in control],
        "normalizer": None, "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": [m.split(" ") for m in f["tokenizer.ggml.merges"].contents()]},
    }
    add_bos = f["tokenizer.ggml.add_bos_token"].contents() if "tokenizer.ggml.add_bos_token" in f else False
    config = {"add_bos_token": add_bos, "add_eos_token": False}
    for key, name in (("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token")):
        if f"tokenizer.ggml.{key}_token_id" in f:
            config[name] = tokens[f[f"tokenizer.ggml.{key}_token_id"].contents()]
    if "tokenizer.chat_template" in f:
        config["chat_template"] = f["tokenizer.chat_template"].contents()
    return {"tokenizer.json": tokenizer, "tokenizer_config.json": config}


def convert_gguf(src: Path):
    import gguf
    try:
        reader = gguf.GGUFReader(src)
    except (ValueError, OSError, KeyError, IndexError) as e:
        raise UsageError(f"{src} is not a readable GGUF file ({e}); is it complete?") from None
    args = gguf_args(reader)
    blocks = {}  # Q4_0 / Q4_1 tensors' own blocks, filled as tensors() runs: quantize.py decodes with them

    def tensors():
        for t in reader.tensors:
            ours = rename(t.name, GGUF_WEIGHT_MAP, args.n_layers)
            if ours is None:
                continue
            try:
                w = gguf.quants.dequantize(t.data, t.tensor_type)
            except NotImplementedError:
                raise UsageError(f"{t.name}: GGUF type {t.tensor_type.name} cannot be dequantised") from None
            shape = [int(n) for n in reversed(t.shape)]  # GGUF lists dims innermost-first: [in, out] -> (out, in)
            w = torch.from_numpy(np.array(w, dtype=np.float32).reshape(shape))  # a writable copy
            b = gguf_q4_blocks(t.data, t.tensor_type.name, shape) if t.tensor_type.name in ("Q4_0", "Q4_1") else {}
            heads = args.n_heads if ours.endswith("attention.wq.weight") else \
                args.n_kv_heads if ours.endswith("attention.wk.weight") else None
            if heads is not None:  # a row permutation: each row's blocks move with it
                w, b = unpermute(w, heads), {k: unpermute(v, heads) for k, v in b.items()}
            blocks.update({f"{ours}.{k}": v for k, v in b.items()})
            yield ours, w
    return args, tensors(), gguf_tokenizer(reader), blocks


# ----------------------------------------------------------------------------- writing

def convert(src: Path, out: Path, dtype: str = "auto") -> Path:
    from safetensors.torch import save_file
    src, out = Path(src), Path(out)
    if not src.exists():
        raise UsageError(f"{src} not found")
    is_gguf = src.is_file() and src.suffix == ".gguf"
    args, tensors, tokenizer, blocks = convert_gguf(src) if is_gguf else convert_hf(src)
    shapes = expected_shapes(args)
    sd = {}
    for name, t in tqdm(tensors, total=len(shapes), desc=f"converting {src.name}", unit="tensor", file=sys.stderr):
        if name in sd:
            raise UsageError(f"{name} is given twice in the source")
        if tuple(t.shape) != shapes[name]:
            raise UsageError(f"{name}: the source has shape {tuple(t.shape)}, config implies {shapes[name]}")
        want = DTYPES.get(dtype, torch.float32 if is_gguf else t.dtype)
        sd[name] = t.to(want).contiguous()
    missing = sorted(set(shapes) - set(sd))
    if missing:
        raise UsageError(f"the source has no tensor for {missing[0]} ({len(missing)} missing in all)")

    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "model.safetensors", lambda p: save_file(sd, str(p), metadata={"format": "pt"}))
    if blocks:  # the GGUF's 4-bit blocks by our names (quantize.py's docstring), for --quantize int4
        atomic_write(out / BLOCKS_FILE, lambda p: save_file(blocks, str(p), metadata={"source": src.name}))
    elif (out / BLOCKS_FILE).exists():  # stale: from an earlier conversion into this folder
        (out / BLOCKS_FILE).unlink()
    if tokenizer is not None:
        for name, content in tokenizer.items():
            atomic_write(out / name, lambda p: p.write_text(json.dumps(content, indent=1, ensure_ascii=False)))
    else:
        found = [f for f in TOKENIZER_FILES if (src / f).is_file()]
        for f in found:
            atomic_write(out / f, lambda p: shutil.copyfile(src / f, p))
        if not any(f in found for f in ("tokenizer.json", "tokenizer.model")):
            print(f"warning: {src} has no tokenizer.json or tokenizer.model; copy one into {out}", file=sys.stderr)
    atomic_write(out / "config.json", lambda p: p.write_text(args.to_json()))  # last: marks a finished folder
    return out


def main(args):
    if args.default:
        from fetch import DEFAULT_GGUF, fetch
        src, out = fetch("model") / DEFAULT_GGUF, args.out or DEFAULT_CHECKPOINT
    elif args.src is None or args.out is None:
        raise UsageError("give SRC and --out DIR, or --default")
    else:
        src, out = args.src, args.out
    out = convert(src, out, args.dtype)
    print(f"wrote {out}")


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", nargs="?", type=Path, help="Hugging Face model folder or .gguf file")
    parser.add_argument("--out", type=Path, help="output checkpoint folder")
    parser.add_argument("--default", action="store_true",
                        help=f"fetch SmolLM2-135M-Instruct and write {DEFAULT_CHECKPOINT.relative_to(ROOT)}")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="weights dtype (auto: the source's for HF, float32 for GGUF)")
    return parser


if __name__ == "__main__":
    run_cli(main, get_parser().parse_args)

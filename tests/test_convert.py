"""convert_hf.py: tiny random transformers LLaMAs (and a tiny GGUF) convert to checkpoints whose logits match, and bad
input stops with one line and exit code 2."""
import argparse
import json

import numpy as np
import pytest
import torch

from conftest import run_script, write_tiny_tokenizer
from convert_hf import convert
from cli import UsageError
from model import Transformer

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}
CASES = {  # LlamaConfig overrides
    "llama2-mha-untied": dict(num_key_value_heads=4),
    "llama3.1-gqa-rope-scaling": dict(num_key_value_heads=2, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING),
    "tied-embeddings": dict(num_key_value_heads=1, tie_word_embeddings=True),
}


def hf_model(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.1, tie_word_embeddings=False,
                  attn_implementation="eager")
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**config, **overrides})).eval()


def max_logit_diff(hf, ckpt) -> float:
    idx = torch.randint(0, hf.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(idx).logits
        ours = Transformer.from_checkpoint(ckpt)(idx)
    assert ref.abs().max() > 0.1  # a real signal, not all-zero logits
    return (ref - ours).abs().max().item()


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(tmp_path, case):
    hf = hf_model(**CASES[case])
    hf.save_pretrained(tmp_path / "hf")
    write_tiny_tokenizer(tmp_path / "hf" / "tokenizer.json")
    out = convert(tmp_path / "hf", tmp_path / "ckpt")
    assert max_logit_diff(hf, out) < 1e-4
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    assert not list(out.glob("*.tmp"))


def test_sharded_safetensors(tmp_path):
    hf = hf_model(num_key_value_heads=2)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1
    assert max_logit_diff(hf, convert(tmp_path / "hf", tmp_path / "ckpt")) < 1e-4


def test_pytorch_bin(tmp_path):
    hf = hf_model(num_key_value_heads=2)
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "hf" / "pytorch_model.bin")  # the pre-safetensors format
    assert max_logit_diff(hf, convert(tmp_path / "hf", tmp_path / "ckpt")) < 1e-4


def test_dtype_option(tmp_path):
    from safetensors import safe_open
    hf_model().save_pretrained(tmp_path / "hf")
    out = convert(tmp_path / "hf", tmp_path / "ckpt", dtype="bfloat16")
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


# ----------------------------------------------------------------------------- GGUF

# llama.cpp's tensor names for HF's, written out here rather than taken from convert_hf.py
GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight", "self_attn.q_proj.weight": "attn_q.weight",
              "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
              "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
              "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
              "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight"}


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    # what llama.cpp's convert_hf_to_gguf.py does to Q and K rows (interleaved RoPE pairs)
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_rope_freqs(c) -> np.ndarray:
    # what llama.cpp's convert writes for Llama-3.1 RoPE scaling: a divisor per frequency
    s, hd = c.rope_parameters, c.hidden_size // c.num_attention_heads
    freqs = 1.0 / (s["rope_theta"] ** (np.arange(0, hd, 2) / hd))
    low_wavelen = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wavelen = s["original_max_position_embeddings"] / s["high_freq_factor"]
    factors = []
    for wavelen in 2 * np.pi / freqs:
        smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / \
            (s["high_freq_factor"] - s["low_freq_factor"])
        factors.append(1 if wavelen < high_wavelen else s["factor"] if wavelen > low_wavelen else
                       1 / ((1 - smooth) / s["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


def write_gguf(path, hf, tokenizer_json, qtypes: dict, pre="smollm", kv=None, rope_freqs=True):
    """A llama GGUF of hf's weights, quantised per llama.cpp name suffix, with metadata kv added and rope_freqs.weight
    for Llama-3.1 scaling (as llama.cpp writes it) unless told not to; returns {hf name: dequantised weight}."""
    import gguf
    from gguf.quants import dequantize, quantize
    c = hf.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    tj = json.loads(tokenizer_json.read_text())
    tokens = sorted(tj["model"]["vocab"], key=tj["model"]["vocab"].get)
    special = {t["content"] for t in tj["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for key, value in (kv or {}).items():
        {str: w.add_string, float: w.add_float32, int: w.add_uint32}[type(value)](key, value)
    if c.rope_parameters.get("rope_type") == "llama3" and rope_freqs:
        w.add_tensor("rope_freqs.weight", llama_cpp_rope_freqs(c))
    dequantised = {}
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        suffix = name.split(".", 3)[-1] if name.startswith("model.layers.") else name
        gname = GGUF_NAMES[suffix] if suffix == name else f"blk.{name.split('.')[2]}.{GGUF_NAMES[suffix]}"
        x = t.numpy()
        if suffix.endswith(("q_proj.weight", "k_proj.weight")):
            x = llama_cpp_permute(x, c.num_attention_heads if "q_proj" in suffix else c.num_key_value_heads)
        qtype = gguf.GGMLQuantizationType.F32 if x.ndim == 1 else qtypes[gname.split(".")[-2]]
        q = quantize(x, qtype)
        w.add_tensor(gname, q, raw_dtype=qtype)
        # rows are quantised independently, so the permute commutes with quantisation: the reference is
        # HF's weight quantised and dequantised, unpermuted
        dequantised[name] = torch.from_numpy(dequantize(quantize(t.numpy(), qtype), qtype).reshape(t.shape).copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dequantised


GGUF_CASES = {  # name: (LlamaConfig overrides, llama.cpp pre-tokenizer)
    "smollm2-style": (dict(num_key_value_heads=2, rope_theta=100000.0), "smollm"),
    "llama3.1-style": (dict(num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=True,
                            max_position_embeddings=16384,
                            rope_scaling=dict(LLAMA3_SCALING, original_max_position_embeddings=8192)), "llama-bpe"),
}


@pytest.mark.parametrize("case", GGUF_CASES)
def test_gguf_round_trip(tmp_path, case):
    import gguf
    from tokenizers import Regex, Tokenizer as HFTokenizer, pre_tokenizers as pt
    from tokenizer import LLAMA3_PATTERN, Tokenizer
    Q = gguf.GGMLQuantizationType
    qtypes = {"token_embd": Q.F16, "output": Q.Q8_0, "attn_q": Q.Q8_0, "attn_k": Q.Q4_0, "attn_v": Q.Q4_1,
              "attn_output": Q.BF16, "ffn_gate": Q.Q8_0, "ffn_up": Q.Q5_0, "ffn_down": Q.F32}
    overrides, pre = GGUF_CASES[case]
    hf = hf_model(**overrides)
    tok_json = write_tiny_tokenizer(tmp_path / "tokenizer.json")
    dequantised = write_gguf(tmp_path / "tiny.gguf", hf, tok_json, qtypes, pre)
    hf.load_state_dict(dequantised, strict=False)
    out = convert(tmp_path / "tiny.gguf", tmp_path / "ckpt")
    assert max_logit_diff(hf, out) < 1e-4
    args = json.loads((out / "config.json").read_text())
    assert (args["rope_theta"], args["norm_eps"], args["n_kv_heads"], args["vocab_size"]) == \
        (overrides["rope_theta"], 1e-5, 2, 300)
    if pre == "llama-bpe":  # Meta's Llama-3.1 scaling, recovered from rope_freqs.weight
        assert args["rope_scaling"] == dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                            original_max_position_embeddings=8192)

    # the tokenizer written from GGUF metadata: same ids as HF's for the source vocab with llama.cpp's pre-tokenizer
    ref = HFTokenizer.from_file(str(tok_json))
    ref.pre_tokenizer = pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False)]) \
        if pre == "smollm" else pt.Sequence([pt.Split(Regex(LLAMA3_PATTERN), "isolated"),
                                             pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    ours = Tokenizer.from_checkpoint(out)
    text = "To be, or not 2 be: 1234 arrows  of  fortune!\n\n  0.5"
    assert ours.encode(text) == ref.encode(text).ids and ours.decode(ours.encode(text)) == text
    assert (ours.bos_id, ours.eos_id) == (1, 2)


def llama31_gguf(tmp_path, **kw):
    import gguf
    hf = hf_model(**GGUF_CASES["llama3.1-style"][0])
    f32 = dict.fromkeys((n.split(".")[0] for n in GGUF_NAMES.values()), gguf.GGMLQuantizationType.F32)
    hf.load_state_dict(write_gguf(tmp_path / "tiny.gguf", hf, write_tiny_tokenizer(tmp_path / "t.json"), f32,
                                  "llama-bpe", **kw), strict=False)
    return hf, tmp_path / "tiny.gguf"


LLAMA3_KV = {"llama.rope.scaling.type": "llama3", "llama.rope.scaling.factor": 8.0,
             "llama.rope.scaling.original_context_length": 8192}


@pytest.mark.parametrize("rope_freqs", [False, True])
def test_gguf_llama3_scaling_keys(tmp_path, rope_freqs):
    # rope.scaling.type 'llama3' alone, or with the rope_freqs tensor llama.cpp writes: one scaling, Meta's values
    hf, path = llama31_gguf(tmp_path, kv=LLAMA3_KV, rope_freqs=rope_freqs)
    out = convert(path, tmp_path / "ckpt")
    assert json.loads((out / "config.json").read_text())["rope_scaling"] == dict(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    assert max_logit_diff(hf, out) < 1e-4


@pytest.mark.parametrize("kv,msg", [
    ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}, "RoPE scaling 'linear' is not supported"),
    ({"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
      "llama.rope.scaling.original_context_length": 4096}, "RoPE scaling 'yarn' is not supported"),
    ({"llama.rope.scale_linear": 2.0}, "RoPE scaling 'linear' is not supported"),  # the legacy key
    (dict(LLAMA3_KV, **{"llama.rope.scaling.factor": 4.0}), "rope_freqs.weight does not match"),  # freqs say 8
])
def test_gguf_other_rope_scaling_is_refused(tmp_path, kv, msg):
    _, path = llama31_gguf(tmp_path, kv=kv)
    with pytest.raises(UsageError, match=msg):
        convert(path, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / "config.json").exists()


def test_unpermute_inverts_llama_cpp():
    from convert_hf import unpermute
    w = torch.randn(6 * 8, 5)
    assert torch.equal(unpermute(torch.from_numpy(llama_cpp_permute(w.numpy(), 6)), 6), w)


# ----------------------------------------------------------------------------- bad input

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    hf_model(num_key_value_heads=2).save_pretrained(d)
    return d


def run_cli(*argv):
    code, _, err = run_script("convert_hf.py", *argv)
    lines = [l for l in err.splitlines() if l.startswith("convert_hf.py: error:")]
    assert code == 2 and len(lines) == 1, err
    return lines[0]


def edit_copy(hf_dir, tmp_path, edit):
    from safetensors.torch import load_file, save_file
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text((hf_dir / "config.json").read_text())
    sd = load_file(hf_dir / "model.safetensors")
    edit(sd)
    save_file(sd, d / "model.safetensors")
    return d


def test_cli_errors_are_one_line(hf_dir, tmp_path):
    assert "not found" in run_cli(tmp_path / "nope", "--out", tmp_path / "out")
    d = edit_copy(hf_dir, tmp_path, lambda sd: sd.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
    assert "model.layers.0.self_attn.q_proj.bias" in run_cli(d, "--out", tmp_path / "out")


# the CLI prints any UsageError as one line (checked above), so the other cases call the functions

def test_no_src():
    from convert_hf import main
    with pytest.raises(UsageError, match="SRC"):
        main(argparse.Namespace(default=False, src=None, out=None, dtype="auto"))


def test_truncated_safetensors(hf_dir, tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text((hf_dir / "config.json").read_text())
    data = (hf_dir / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match="model.safetensors is unreadable"):
        convert(d, tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()


def test_truncated_gguf(tmp_path):
    import gguf
    write_gguf(tmp_path / "tiny.gguf", hf_model(num_key_value_heads=2), write_tiny_tokenizer(tmp_path / "t.json"),
               dict.fromkeys((n.split(".")[0] for n in GGUF_NAMES.values()), gguf.GGMLQuantizationType.Q8_0))
    data = (tmp_path / "tiny.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 1000])
    with pytest.raises(UsageError, match="cut.gguf is not a readable GGUF"):
        convert(tmp_path / "cut.gguf", tmp_path / "out")


def test_missing_tensor(hf_dir, tmp_path):
    d = edit_copy(hf_dir, tmp_path, lambda sd: sd.pop("model.norm.weight"))
    with pytest.raises(UsageError, match="no tensor for norm.weight"):
        convert(d, tmp_path / "out")


def test_wrong_shape(hf_dir, tmp_path):
    d = edit_copy(hf_dir, tmp_path, lambda sd: sd.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(UsageError, match=r"norm.weight: the source has shape \(65,\)"):
        convert(d, tmp_path / "out")

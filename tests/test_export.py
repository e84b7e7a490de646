"""export.py: an exit written as a plain (k + 1)-layer Llama gives the exit's logits in transformers' LlamaForCausalLM,
back through convert_hf.py (Hugging Face folder and GGUF) and in llama.cpp when llama-cpp-python is installed;
--exit full is the base model; bad requests stop with one line."""
import json
from dataclasses import replace

import pytest
import torch

from balcony import BalconyModel
from cli import UsageError
from conftest import ROOT, make_tiny_checkpoint, run_script
from convert_hf import convert
from export import export
from model import ModelArgs, Transformer

EXIT = 2  # of the tiny model's 4 layers
CASES = {  # tiny_args overrides
    "llama3.1-untied-rope-scaling": dict(tie_embeddings=False, rope_theta=500000.0,  # wavelengths > 16 scaled
                                         rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                           original_max_position_embeddings=64)),
    "smollm2-tied": dict(tie_embeddings=True, rope_theta=100000.0, n_kv_heads=1),
}


def balcony_ckpt(path, **overrides):
    """A tiny checkpoint with a random balcony at EXIT. Every norm is random too: a swapped or missing norm shows."""
    from safetensors.torch import load_file, save_file
    ckpt = make_tiny_checkpoint(path, **overrides)
    g = torch.Generator().manual_seed(2)
    sd = load_file(ckpt / "model.safetensors")
    sd = {k: 1 + 0.5 * torch.randn(v.shape, generator=g) if "norm" in k else v for k, v in sd.items()}
    save_file(sd, ckpt / "model.safetensors")
    bm = BalconyModel(Transformer.from_checkpoint(ckpt), [EXIT], init="random")
    for name, p in bm.exits.named_parameters():
        if "norm" in name:
            p.data = 1 + 0.5 * torch.randn(p.shape, generator=g)
    bm.save_exits(ckpt / "balcony.safetensors")
    return ckpt


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> (checkpoint folder, loaded BalconyModel), each case built once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            ckpt = balcony_ckpt(tmp_path_factory.mktemp(name) / "ckpt", **CASES[name])
            cache[name] = ckpt, BalconyModel.from_checkpoint(ckpt, None, [EXIT])
        return cache[name]
    return get


RUNS = [(name, EXIT) for name in CASES] + [("smollm2-tied", None)]  # --exit full: the base model, once


IDX = torch.randint(0, 320, (2, 23), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(bm, exit):
    ref = bm(IDX, exit=exit)
    assert ref.abs().max() > 0.1  # a real signal
    return ref


@pytest.mark.parametrize("name,exit", RUNS)
def test_hf_folder_runs_in_transformers(built, tmp_path, name, exit):
    from transformers import AutoTokenizer, LlamaForCausalLM
    from tokenizer import Tokenizer
    ckpt, bm = built(name)
    out = export(bm, exit, ckpt, tmp_path / "hf")
    n = 4 if exit is None else exit + 1
    assert ModelArgs.from_hf_config(out / "config.json") == replace(bm.model.args, n_layers=n)  # every field kept
    hf = LlamaForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert hf.config.num_hidden_layers == n
    with torch.no_grad():
        assert (hf(IDX).logits - logits(bm, exit)).abs().max() < 1e-4
    text = "To be, or not 2 be: that is the question!  0123"
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == Tokenizer.from_checkpoint(ckpt).encode(text)
    # and back: convert_hf.py on the export is the exit as a plain checkpoint
    with torch.no_grad():
        assert (Transformer.from_checkpoint(convert(out, tmp_path / "back"))(IDX) - logits(bm, exit)).abs().max() < 1e-4


@pytest.mark.parametrize("name,exit", RUNS)
def test_gguf_round_trip(built, tmp_path, name, exit):
    from tokenizer import Tokenizer
    ckpt, bm = built(name)
    back = convert(export(bm, exit, ckpt, tmp_path / "x.gguf", "gguf"), tmp_path / "back")
    assert ModelArgs.from_json(back / "config.json") == replace(bm.model.args, n_layers=4 if exit is None else 3)
    with torch.no_grad():
        assert (Transformer.from_checkpoint(back)(IDX) - logits(bm, exit)).abs().max() < 1e-4
    text = "To be, or not 2 be: that is the question!  0123"
    assert Tokenizer.from_checkpoint(back).encode(text) == Tokenizer.from_checkpoint(ckpt).encode(text)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "q8_0", "q4_0", "q4_1"])
def test_gguf_dtypes(built, tmp_path, dtype):
    # each weight read back is ours rounded to the type (norms stay float32; at 4 bits the tied head is Q8_0)
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize, quantize
    from safetensors.torch import load_file
    from export import GGUF_TYPES, exit_as_llama
    ckpt, bm = built("llama3.1-untied-rope-scaling")
    back = load_file(convert(export(bm, EXIT, ckpt, tmp_path / "x.gguf", "gguf", dtype), tmp_path / "back")
                     / "model.safetensors")
    _, ours = exit_as_llama(bm, EXIT)
    for name in ("layers.0.attention.wv.weight", f"layers.{EXIT}.feed_forward.w2.weight", "tok_embeddings.weight"):
        q = Q.Q8_0 if dtype.startswith("q4") and name == "tok_embeddings.weight" else Q[GGUF_TYPES[dtype]]
        w = ours[name].detach().numpy()
        assert torch.equal(back[name], torch.from_numpy(dequantize(quantize(w, q), q).reshape(w.shape)))
    assert torch.equal(back["norm.weight"], ours["norm.weight"])


@pytest.mark.parametrize("name", CASES)
def test_llama_cpp_logits_equal_ours(built, tmp_path, name):
    llama_cpp = pytest.importorskip("llama_cpp")
    ckpt, bm = built(name)
    out = export(bm, EXIT, ckpt, tmp_path / "x.gguf", "gguf")
    llm = llama_cpp.Llama(str(out), n_ctx=64, logits_all=True, verbose=False)
    llm.eval(IDX[0].tolist())
    ref = logits(bm, EXIT)[0]
    got = torch.tensor(llm.scores[:IDX.size(1)])
    assert (got - ref).abs().max() < 1e-3  # ggml's float32 matmuls sum in another order


def test_refusals(built, tmp_path):
    ckpt, bm = built("smollm2-tied")
    with pytest.raises(UsageError, match=r"exit 1 has no trained balcony; trained exits: \[2\]"):
        export(bm, 1, ckpt, tmp_path / "a")
    (tmp_path / "b").mkdir()
    with pytest.raises(UsageError, match="exists; pass --force"):
        export(bm, EXIT, ckpt, tmp_path / "b")
    with pytest.raises(UsageError, match="q8_0 is for GGUF only"):
        export(bm, EXIT, ckpt, tmp_path / "c", dtype="q8_0")
    out = export(bm, EXIT, ckpt, tmp_path / "b", force=True)  # replaced, no temporary left
    assert (out / "config.json").is_file() and not list(tmp_path.glob("*.tmp"))


def test_cli(tmp_path):
    # one line and exit code 2 from the script's command line; the other refusals from main
    from export import get_parser, main
    ckpt = balcony_ckpt(tmp_path / "ckpt", **CASES["smollm2-tied"])
    code, _, err = run_script("export.py", "--checkpoint", ckpt, "--exit", 3, "--out", tmp_path / "a")
    assert code == 2 and err.splitlines() == ["export.py: error: exit 3 has no trained balcony; trained exits: [2] "
                                              "(or 4 for full depth)"], err
    parse = get_parser().parse_args
    with pytest.raises(UsageError, match="'x'"):
        main(parse(["--checkpoint", str(ckpt), "--exit", "x", "--out", str(tmp_path / "a")]))
    with pytest.raises(UsageError, match="not found"):
        main(parse(["--checkpoint", str(ckpt), "--exit", "2", "--balcony", str(tmp_path / "no"), "--out",
                    str(tmp_path / "a")]))
    main(parse(["--checkpoint", str(ckpt), "--exit", "2", "--format", "gguf", "--dtype", "q8_0", "--out",
                str(tmp_path / "a.gguf")]))
    assert ModelArgs.from_json(convert(tmp_path / "a.gguf", tmp_path / "back") / "config.json").n_layers == 3


def test_gguf_tokenizer_metadata_equals_llama_cpp_s(tmp_path):
    # the default model came from a GGUF that llama.cpp's converter wrote: export.py's tokenizer.ggml.* from the
    # converted checkpoint must give the same metadata back (tokens, types, merges, pre-tokenizer, special ids)
    import gguf
    from cli import DEFAULT_CHECKPOINT
    from export import add_gguf_tokenizer
    from fetch import DEFAULT_GGUF
    from tokenizer import Tokenizer
    src = ROOT / "data" / "smollm2" / DEFAULT_GGUF
    if not (src.is_file() and (DEFAULT_CHECKPOINT / "tokenizer.json").is_file()):
        pytest.skip("the default model is not fetched and converted")
    w = gguf.GGUFWriter(str(tmp_path / "tok.gguf"), "llama")
    add_gguf_tokenizer(w, DEFAULT_CHECKPOINT, Tokenizer.from_checkpoint(DEFAULT_CHECKPOINT), 49152)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    ours, ref = gguf.GGUFReader(tmp_path / "tok.gguf").fields, gguf.GGUFReader(src).fields
    # not written: the padding id (convert_hf.py does not keep it) and add_space_prefix (False, llama.cpp's default)
    keys = sorted(k for k in ref if k.startswith("tokenizer.") and not k.endswith(("padding_token_id", "space_prefix")))
    assert sorted(k for k in ours if k.startswith("tokenizer.")) == keys
    for k in keys:
        assert ours[k].contents() == ref[k].contents(), k

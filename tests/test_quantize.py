"""quantize.py: the int4 / int8 modules equal a dequantise-then-F.linear reference, GGUF Q4_0 / Q4_1 blocks map to
int4 packs that dequantise to gguf's own weights, a quantised model decodes as its own uncached forward does, no packed
tensor reaches a file, and bad combinations stop with one line."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from balcony import BalconyModel
from cli import UsageError
from conftest import make_tiny_checkpoint, tiny_args, write_tiny_tokenizer
from model import Transformer
from quantize import (WeightOnlyInt4Linear, WeightOnlyInt8Linear, blocks_to_int4, channel_quantize, group_dequantize,
                      group_quantize, gguf_q4_blocks, quantize, quantize_checkpoint)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]
BF16_EPS = 2.0 ** -7  # bf16's relative step (8 significant bits): round-to-nearest moves a value by at most half of it


def packed_dequantize(m: WeightOnlyInt4Linear, codes):
    # the weights the kernel multiplies: the codes with the scales and zeros as packed (bf16)
    sz = m.scales_and_zeros.float().cpu().transpose(0, 1)  # (N, K / group, 2)
    return group_dequantize(codes, sz[..., 0], sz[..., 1], m.group_size)


def assert_linear_close(y, x, w, rtol):
    # y against F.linear(x, w) in fp32 from bf16 activations: the error relative to the output's scale
    y, x = y.cpu(), x.cpu()
    ref = F.linear(x.to(torch.bfloat16).float(), w)
    assert ref.abs().max() > 0.1
    assert (y.float() - ref).abs().max() <= rtol * ref.abs().max(), (y.float() - ref).abs().max()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_linear_matches_dequantised_reference(group_size, dtype, device):
    torch.manual_seed(0)
    w, x = torch.randn(96, 128) * 0.05, torch.randn(3, 5, 128, dtype=dtype)
    codes, scales, zeros = group_quantize(w, group_size)
    # min-max groups: every weight within half a step of its value
    assert ((group_dequantize(codes, scales, zeros, group_size) - w).abs()
            <= scales.repeat_interleave(group_size, 1) / 2 + 1e-7).all()
    m = WeightOnlyInt4Linear(codes, scales, zeros, group_size, device=device)
    y = m(x.to(device))
    assert y.shape == (3, 5, 96) and y.dtype == dtype
    # bf16 output rounding and accumulation order only: the reference uses the packed (bf16) scales
    assert_linear_close(y, x, packed_dequantize(m, codes), rtol=2 * BF16_EPS)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_matches_dequantised_reference(dtype, device):
    torch.manual_seed(0)
    w, x = torch.randn(96, 64) * 0.05, torch.randn(4, 64, dtype=dtype)
    codes, scales = channel_quantize(w)
    assert ((codes.float() * scales[:, None] - w).abs() <= scales[:, None] / 2 + 1e-7).all()
    m = WeightOnlyInt8Linear(codes, scales, device=device)
    y = m(x.to(device))
    assert y.dtype == dtype
    assert_linear_close(y, x, codes.float() * m.scales.float().cpu()[:, None], rtol=2 * BF16_EPS)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_gguf_blocks_map_to_int4_packs(kind):
    import gguf
    from gguf.quants import dequantize, quantize as gguf_quantize

    qtype = gguf.GGMLQuantizationType[kind]
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((48, 128)) * 0.05 + (0.02 if kind == "Q4_1" else 0)).astype(np.float32)
    raw = gguf_quantize(w, qtype)
    theirs = torch.from_numpy(dequantize(raw, qtype).reshape(w.shape).copy())
    codes, scales, zeros = blocks_to_int4(**gguf_q4_blocks(raw, kind, w.shape))
    # in fp32 the mapping is exact up to the order of d q + m against d (q - 8) + (m + 8 d): a few ulps
    assert torch.allclose(group_dequantize(codes, scales, zeros, 32), theirs, rtol=0, atol=1e-6)
    # the pack holds bf16 scales and zeros: each weight moves by at most half a bf16 step of 8 |scale| + |zero|
    m = WeightOnlyInt4Linear(codes, scales, zeros, 32)
    bound = BF16_EPS / 2 * (8 * scales.abs() + zeros.abs()).repeat_interleave(32, 1)
    assert ((packed_dequantize(m, codes) - theirs).abs() <= bound + 1e-9).all()
    x = torch.randn(2, 128)
    assert_linear_close(m(x), x, theirs, rtol=4 * BF16_EPS)


def test_converted_gguf_decodes_with_its_own_blocks(tmp_path):
    # a tiny GGUF with Q4_0 / Q4_1 tensors (Q, K permuted as llama.cpp writes them): convert_hf.py keeps their
    # blocks, and the int4 model multiplies exactly the file's weights (as dequantised into model.safetensors)
    import gguf
    from test_convert import hf_model, write_gguf

    from convert_hf import convert
    Q = gguf.GGMLQuantizationType
    qtypes = {"token_embd": Q.Q8_0, "attn_q": Q.Q4_1, "attn_k": Q.Q4_0, "attn_v": Q.Q4_1, "attn_output": Q.Q4_0,
              "ffn_gate": Q.Q4_1, "ffn_up": Q.Q4_1, "ffn_down": Q.Q8_0}
    hf = hf_model(num_key_value_heads=2, tie_word_embeddings=True, intermediate_size=128)
    write_gguf(tmp_path / "tiny.gguf", hf, write_tiny_tokenizer(tmp_path / "t.json"), qtypes)
    ckpt = convert(tmp_path / "tiny.gguf", tmp_path / "ckpt")
    assert (ckpt / "model.q4.safetensors").is_file()
    model = Transformer.from_checkpoint(ckpt)
    floats = {n: p.detach().clone() for n, p in model.named_parameters()}
    quantize_checkpoint(model, ckpt, "int4", 32, head="int8")
    from quantize import read_blocks
    blocks = read_blocks(ckpt)
    assert len(blocks) == 3 * 6  # every Q4 tensor of the 3 layers; ffn_down (Q8_0) is re-quantised
    for name, (codes, scales, zeros) in blocks.items():
        m = model.get_submodule(name.removesuffix(".weight"))
        w = packed_dequantize(m, codes)
        assert ((w - floats[name]).abs() <= BF16_EPS / 2 * (8 * scales.abs() + zeros.abs()).repeat_interleave(32, 1)
                + 1e-9).all(), name
    assert isinstance(model.output, WeightOnlyInt8Linear) and isinstance(model.tok_embeddings, torch.nn.Embedding)


def test_stale_blocks_are_refused(tmp_path):
    import gguf
    from safetensors.torch import load_file, save_file
    from test_convert import hf_model, write_gguf

    from convert_hf import convert
    qtypes = dict.fromkeys(["token_embd", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                            "ffn_down"], gguf.GGMLQuantizationType.Q4_1)
    hf = hf_model(num_key_value_heads=2, tie_word_embeddings=True, intermediate_size=128)
    write_gguf(tmp_path / "tiny.gguf", hf, write_tiny_tokenizer(tmp_path / "t.json"), qtypes)
    ckpt = convert(tmp_path / "tiny.gguf", tmp_path / "ckpt")
    sd = load_file(ckpt / "model.safetensors")
    sd["layers.1.feed_forward.w1.weight"] += 0.01  # as if retrained after conversion
    save_file(sd, str(ckpt / "model.safetensors"))
    with pytest.raises(UsageError, match="does not match model.safetensors at layers.1.feed_forward.w1"):
        quantize_checkpoint(Transformer.from_checkpoint(ckpt), ckpt, "int4")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode,head", [("int4", "int8"), ("int4", "int4"), ("int8", "bfloat16"), ("int4", "none")])
def test_quantized_greedy_equals_its_uncached_forward(tiny_ckpt, mode, head, device):
    # the quantised model's cached, batched decode (generate) against its own uncached greedy loop, exits included
    from generate import generate
    torch.manual_seed(0)
    bm = BalconyModel(Transformer.from_checkpoint(tiny_ckpt, device=device), [2]).eval()
    quantize(bm, mode, 32, head)
    # every linear swapped; a head left as loaded is still the tied embedding
    assert [n for n, m in bm.named_modules() if isinstance(m, torch.nn.Linear)] == (["model.output"] if head == "none"
                                                                                     else [])
    assert (bm.model.output.weight is bm.model.tok_embeddings.weight) == (head == "none")
    prompt = [5, 17, 42, 7]
    for exit in (2, None):
        idx = torch.tensor([prompt], device=device)
        with torch.no_grad():
            for _ in range(8):
                idx = torch.cat([idx, bm(idx, exit=exit)[:, -1].argmax(-1, keepdim=True)], 1)
        assert generate(bm, [prompt], 8, exit=exit)[0]["tokens"] == idx[0, len(prompt):].tolist()


@pytest.mark.slow
def test_compiled_quantized_decoding_equals_eager(tiny_ckpt, monkeypatch):
    # CPU inductor around the int4 and int8 kernels (extern to it): the compiled decode step gives the eager tokens,
    # at an exit and at full depth
    import generate as g
    bm = BalconyModel(Transformer.from_checkpoint(tiny_ckpt), [2]).eval()
    quantize(bm, "int4", 32, "int8")
    prompt = [5, 17, 42, 7]
    ref = {exit: g.generate(bm, [prompt], 8, exit=exit)[0]["tokens"] for exit in (2, None)}
    for name in ("decode_one_token", "draft_one_token", "_compiled"):  # restored after the test
        monkeypatch.setattr(g, name, getattr(g, name))
    g.compile_steps()
    assert {exit: g.generate(bm, [prompt], 8, exit=exit)[0]["tokens"] for exit in (2, None)} == ref


def test_int4_keeps_balconies_int8(tiny_ckpt):
    # --quantize int4: the backbone's linears are int4, the trained balconies' int8 per channel (min-max int4 wrecks a
    # trained balcony's output), and each balcony module still equals its dequantised reference
    bm = BalconyModel(Transformer.from_checkpoint(tiny_ckpt), [2]).eval()
    w = bm.exits["2"].layer.attention.wq.weight.detach().clone()
    quantize(bm, "int4", 32, "none")
    kinds = {n: type(m) for n, m in bm.named_modules() if isinstance(m, (WeightOnlyInt4Linear, WeightOnlyInt8Linear))}
    assert {k for n, k in kinds.items() if n.startswith("exits.")} == {WeightOnlyInt8Linear}
    assert {k for n, k in kinds.items() if n.startswith("model.")} == {WeightOnlyInt4Linear}
    x = torch.randn(3, w.size(1))
    assert_linear_close(bm.exits["2"].layer.attention.wq(x), x, w, 2 * BF16_EPS + 2 / 127)


def test_no_packed_tensor_is_saved(tiny_ckpt, tmp_path):
    # the packed weights are non-persistent buffers: a saved state dict holds the norms and the embedding only
    bm = BalconyModel(Transformer.from_checkpoint(tiny_ckpt), [2]).eval()
    quantize(bm, "int4", 32, "int8")
    torch.save(bm.state_dict(), tmp_path / "sd.pt")
    sd = torch.load(tmp_path / "sd.pt", weights_only=True)
    assert sd and all(t.is_floating_point() for t in sd.values())
    assert not any(k.endswith(("wq.weight", "w1.weight", "output.weight", "scales_and_zeros", "scales")) for k in sd)


def test_bad_group_size_is_one_line():
    model = Transformer(tiny_args(hidden_dim=96))
    with pytest.raises(UsageError, match="--group-size 64 does not divide the width 96"):
        quantize(model, "int4", 64)
    with pytest.raises(UsageError, match="--group-size 48 is not one"):
        quantize(model, "int4", 48)


def test_generate_cli_quantizes(tiny_ckpt, capsys):
    # generate.py --quantize int4 decodes what the model quantised by hand decodes
    import json

    from generate import generate, get_parser, main
    from tokenizer import Tokenizer
    BalconyModel(Transformer.from_checkpoint(tiny_ckpt), [2]).save_exits(tiny_ckpt / "balcony.safetensors")
    main(get_parser().parse_args(["--checkpoint", str(tiny_ckpt), "--exit", "2", "--prompt", "To be", "--json",
                                  "--max-new-tokens", "6", "--quantize", "int4", "--quantize-head", "int4"]))
    got = json.loads(capsys.readouterr().out)["tokens"]
    bm = quantize(BalconyModel.from_checkpoint(tiny_ckpt, tiny_ckpt / "balcony.safetensors"), "int4", 32, "int4")
    tok = Tokenizer.from_checkpoint(tiny_ckpt)
    assert got == generate(bm, [tok.encode("To be", bos=tok.add_bos)], 6, exit=2)[0]["tokens"]


@pytest.mark.parametrize("script,args", [
    ("generate.py", ["--quantize", "int4", "--group-size", "64"]),  # the tiny model's FFN is 96 wide
    ("eval.py", ["--tasks", "chat", "--exits", "full", "--quantize", "int4", "--group-size", "64"]),
    ("train.py", ["--exit-layers", "2", "--train-backbone", "--out", "unused", "--quantize", "int4"]),
])
def test_bad_combination_is_one_line(tiny_ckpt, script, args):
    import subprocess
    import sys

    from conftest import ROOT
    r = subprocess.run([sys.executable, str(ROOT / script), "--checkpoint", str(tiny_ckpt), *args],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert ("it cannot train (--train-backbone, --from-scratch" if script == "train.py" else
            "--group-size 64 does not divide the width 96") in r.stderr


def test_train_on_a_quantized_backbone(tmp_path):
    # train.py --quantize int4: the exits train on the int4 backbone's states and load onto the float model
    import train
    from test_train import CORPUS, argv
    ckpt, data = make_tiny_checkpoint(tmp_path / "tiny"), tmp_path / "data"
    data.mkdir()
    (data / "play.txt").write_text(CORPUS * 3)
    assert train.main(train.parse_args(argv(tmp_path, ckpt, data, "q.safetensors", "--quantize", "int4"))) == 0
    bm = BalconyModel.from_checkpoint(ckpt, tmp_path / "q.safetensors")
    assert bm.exit_layers == [1, 2]


def test_bench_precision_table_runs(tiny_ckpt, capsys):
    # bench_generate.py --tables precision on a tiny model: every precision's row, llama.cpp's columns or a note
    import bench_generate
    BalconyModel(Transformer.from_checkpoint(tiny_ckpt), [2]).save_exits(tiny_ckpt / "balcony.safetensors")
    bench_generate.main(bench_generate.get_parser().parse_args(
        ["--checkpoint", str(tiny_ckpt), "--tables", "precision", "--max-new-tokens", "3", "--reps", "1",
         "--warmup", "0", "--threads", "1", "--precision-batch-sizes", "2"]))
    out = capsys.readouterr().out
    assert out.count("| 4 (full) | ") == 3  # batch 1 by engine, then batches 1 and 2 by precision
    assert "| transformers fp32, full depth |" in out and "| 2 | 2 | " in out
    assert "llama.cpp" in out.split("| exit |")[1] or "llama-cpp-python is not installed" in out

"""model.py: cached decode equals an uncached forward, fp32 agrees with fp64, presets have the published sizes,
and a bad checkpoint is refused with a clear message."""
import json

import pytest
import torch
from conftest import make_tiny_checkpoint, tiny_args

from cli import UsageError
from convert_hf import convert_hf
from model import ModelArgs, Transformer, rope_inv_freq

CONFIGS = {
    "gqa-tied": {},
    "mha-untied": dict(n_kv_heads=4, tie_embeddings=False),
    "llama3-scaling": dict(rope_theta=500000.0, rope_scaling=dict(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16)),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_cached_decode_equals_uncached_forward(name):
    torch.manual_seed(0)
    model = Transformer(tiny_args(**CONFIGS[name])).eval()
    idx = torch.randint(0, 320, (2, 40))
    with torch.no_grad():
        ref = model(idx)
        model.setup_caches(max_batch_size=2, max_seq_len=64)
        # a 7-token prefill, then a 5-token chunk (as a speculative verifier sends), then one token at a time
        outs = [model(idx[:, :7], torch.arange(7)), model(idx[:, 7:12], torch.arange(7, 12))]
        outs += [model(idx[:, t:t + 1], torch.tensor([t])) for t in range(12, 40)]
    torch.testing.assert_close(torch.cat(outs, 1), ref, atol=1e-5, rtol=0)


def test_rope_frequencies_stay_fp32_in_bf16():
    model = Transformer(tiny_args(rope_theta=500000.0)).to(torch.bfloat16)
    assert model.inv_freq.dtype == torch.float32 and torch.equal(model.inv_freq, rope_inv_freq(model.args))


def test_cached_forward_under_autocast():
    # an fp32 model under bf16 autocast: the projections come out bf16, the cache stays fp32 (and gets written)
    torch.manual_seed(0)
    model = Transformer(tiny_args()).eval()
    idx = torch.randint(0, 320, (2, 20))
    model.setup_caches(2, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(idx)
        got = torch.cat([model(idx[:, :12], torch.arange(12)), model(idx[:, 12:], torch.arange(12, 20))], 1)
    assert model.layers[0].attention.kv_cache.k_cache.dtype == torch.float32
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=0)


def test_per_row_positions_equal_one_row_at_a_time():
    # rows of one batch at different positions (input_pos (B, T)) give what each row gives alone
    torch.manual_seed(0)
    model = Transformer(tiny_args()).eval()
    idx = torch.randint(0, 320, (2, 10))
    with torch.no_grad():
        ref = [model(idx[b:b + 1, :7 + 3 * b])[0, -1] for b in range(2)]  # row 0 has 7 tokens, row 1 has 10
        model.setup_caches(2, 16)
        model(idx, torch.arange(10))  # a padded prefill: row 0's slots 7..9 hold padding, masked from now on
        last = torch.tensor([[6], [9]])  # each row's last token, again, at its own position
        got = model(idx.gather(1, last), last)[:, -1]
    torch.testing.assert_close(got, torch.stack(ref), atol=1e-5, rtol=0)


def test_fp32_matches_fp64():
    torch.manual_seed(0)
    model = Transformer(tiny_args()).eval()
    idx = torch.randint(0, 320, (1, 32))
    with torch.no_grad():
        lo = model(idx)
        hi = model.double()(idx)
    torch.testing.assert_close(lo.double(), hi, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name,params", [("llama-2-7b", 6_738_415_616), ("llama-3-8b", 8_030_261_248),
                                         ("llama-3.2-1b", 1_235_814_400), ("smollm2-135m", 134_515_008)])
def test_presets_have_published_sizes(name, params):
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_name(name))
    assert sum(p.numel() for p in model.parameters()) == params  # parameters() counts a tied head once


def test_unknown_preset():
    with pytest.raises(UsageError, match="unknown model preset"):
        ModelArgs.from_name("llama-9")


def test_from_checkpoint_roundtrip(tiny_ckpt):
    model = Transformer.from_checkpoint(tiny_ckpt)
    assert model.output.weight is model.tok_embeddings.weight
    torch.manual_seed(0)
    ref = Transformer(tiny_args())  # make_tiny_checkpoint seeds 0 the same way
    idx = torch.randint(0, 320, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(idx), ref(idx))


def test_from_checkpoint_refuses_bad_input(tmp_path, tiny_ckpt):
    with pytest.raises(UsageError, match="not found; convert a model first"):
        Transformer.from_checkpoint(tmp_path / "nowhere")
    truncated = make_tiny_checkpoint(tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match="unreadable"):
        Transformer.from_checkpoint(truncated)
    wider = make_tiny_checkpoint(tmp_path / "wider", hidden_dim=128)
    (wider / "config.json").write_text((tiny_ckpt / "config.json").read_text())
    with pytest.raises(UsageError, match="has shape"):
        Transformer.from_checkpoint(wider)
    untied = make_tiny_checkpoint(tmp_path / "untied", tie_embeddings=False)
    (untied / "config.json").write_text((tiny_ckpt / "config.json").read_text())
    with pytest.raises(UsageError, match="unexpected \\['output.weight'\\]"):
        Transformer.from_checkpoint(untied)


def test_from_checkpoint_casts_tensor_by_tensor(tmp_path):
    # an fp32 checkpoint loaded in bf16: memory peaks at the bf16 model plus about one fp32 tensor; the whole file
    # read first and cast after (as before) peaks at fp32 + bf16, three times the bf16 model
    from bench_train import peak_mib

    ckpt = make_tiny_checkpoint(tmp_path / "wide", dim=512, hidden_dim=1536, n_layers=8, n_heads=8, n_kv_heads=4)
    n = sum(p.numel() for p in Transformer.from_checkpoint(ckpt).checkpoint_state_dict().values())  # ~25M: 100 MB
    peak = peak_mib(lambda: Transformer.from_checkpoint(ckpt, dtype=torch.bfloat16), torch.device("cpu"))
    bf16_mib = 2 * n / 2 ** 20
    assert peak < 1.3 * bf16_mib, (peak, bf16_mib)


def test_bad_config_json_is_one_line(tmp_path, tiny_ckpt):
    # a truncated config.json, or one missing a field, is refused by name: never a JSON traceback, never the field's
    # default (ModelArgs' are Llama-2-7B's: the load would fail later on a shape, naming the weights)
    text = (tiny_ckpt / "config.json").read_text()
    (tiny_ckpt / "config.json").write_text(text[: len(text) // 2])
    with pytest.raises(UsageError, match=r"config.json is not a readable JSON file \(Expecting"):
        Transformer.from_checkpoint(tiny_ckpt)
    (tiny_ckpt / "config.json").write_text(json.dumps({k: v for k, v in json.loads(text).items() if k != "dim"}))
    with pytest.raises(UsageError, match=r"config.json misses \['dim'\]"):
        Transformer.from_checkpoint(tiny_ckpt)
    hf = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 320,
          "intermediate_size": 96}
    assert ModelArgs.from_hf_config(hf).dim == 64
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf)[:-5])
    with pytest.raises(UsageError, match="hf/config.json is not a readable JSON file"):
        ModelArgs.from_hf_config(tmp_path / "hf" / "config.json")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({k: v for k, v in hf.items() if k != "vocab_size"}))
    with pytest.raises(UsageError, match=r"hf/config.json misses \['vocab_size'\]"):
        convert_hf(tmp_path / "hf")  # convert_hf.py's source folder
    with pytest.raises(UsageError, match=r"rope_scaling misses \['factor'"):
        ModelArgs.from_hf_config({**hf, "rope_scaling": {"rope_type": "llama3"}})

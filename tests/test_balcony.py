"""balcony.py: full depth is the original model (transformers' logits, and bit for bit a copy loaded without exits),
exit k runs exactly k layers and one balcony, the backbone is frozen, Eq. 2's fused chunked KL equals F.kl_div
(values and gradients: fp64, bf16 autocast, compiled), and exit files round-trip and refuse other base models."""
import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_checkpoint, tiny_args

from balcony import (BalconyModel, distillation_kl, distillation_kl_reference, exit_metrics, heldout_metrics,
                     model_fingerprint)
from cli import UsageError
from model import Transformer


@pytest.fixture
def bm():
    torch.manual_seed(0)
    return BalconyModel(Transformer(tiny_args()).eval(), [1, 3]).eval()


def test_full_depth_is_the_original_model(tmp_path):
    # independent references: transformers' LlamaForCausalLM on the same weights, and a second copy of the base model
    # loaded without exits (wrapping must not touch the backbone: the exits are copies of the last layer, not it)
    from test_convert import hf_model
    from convert_hf import convert
    hf = hf_model(num_key_value_heads=2, tie_word_embeddings=True)
    hf.save_pretrained(tmp_path / "hf")
    ckpt = convert(tmp_path / "hf", tmp_path / "ckpt")
    bm = BalconyModel(Transformer.from_checkpoint(ckpt), [1, 2]).eval()
    plain = Transformer.from_checkpoint(ckpt)
    idx = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(idx).logits
        for exit in (None, bm.n_layers):
            assert torch.equal(bm(idx, exit=exit), plain(idx))
            torch.testing.assert_close(bm(idx, exit=exit), ref, atol=1e-4, rtol=0)
        bm.setup_caches(2, 32)  # cached: a prefill, then one token at a time
        cached = torch.cat([bm(idx[:, :12], input_pos=torch.arange(12))] +
                           [bm(idx[:, t:t + 1], input_pos=torch.tensor([t])) for t in range(12, 16)], dim=1)
        torch.testing.assert_close(cached, ref, atol=1e-4, rtol=0)


def count_calls(bm):
    calls = {"backbone": [], "balcony": []}
    for i, layer in enumerate(bm.model.layers):
        layer.register_forward_hook(lambda m, a, o, i=i: calls["backbone"].append(i))
    for k, ex in bm.exits.items():
        ex.layer.register_forward_hook(lambda m, a, o, k=k: calls["balcony"].append(int(k)))
    return calls


@pytest.mark.parametrize("exit", [1, 3])
def test_exit_runs_k_layers_and_one_balcony(bm, exit):
    calls = count_calls(bm)
    with torch.no_grad():
        bm(torch.randint(0, 320, (1, 8)), exit=exit)
    assert calls == {"backbone": list(range(exit)), "balcony": [exit]}


def test_untrained_exit_is_refused(bm):
    with pytest.raises(UsageError, match="exit 2 has no trained balcony"):
        bm(torch.zeros(1, 4, dtype=torch.long), exit=2)


def test_backbone_frozen_exits_trainable_and_initialised_from_last_layer(bm):
    assert not any(p.requires_grad for p in bm.model.parameters())
    assert all(p.requires_grad for p in bm.exits.parameters())
    last = bm.model.layers[-1].state_dict()
    for ex in bm.exits.values():
        for name, t in ex.layer.state_dict().items():
            assert torch.equal(t, last[name])
        assert torch.equal(ex.norm.weight, bm.model.norm.weight)
        assert ex.layer.attention.wq.weight.data_ptr() != bm.model.layers[-1].attention.wq.weight.data_ptr()


@pytest.mark.parametrize("exits,msg", [([0], "outside 1..3"), ([4], "outside 1..3"), ([2, 2], "duplicate")])
def test_bad_exit_layers(exits, msg):
    with pytest.raises(UsageError, match=msg):
        BalconyModel(Transformer(tiny_args()), exits)


def test_forward_train_matches_forward(bm):
    idx = torch.randint(0, 320, (2, 12))
    h_full, h_exits = bm.forward_train(idx)
    with torch.no_grad():
        torch.testing.assert_close(bm.model.output(h_full), bm(idx), atol=1e-5, rtol=0)
        for k, h in zip(bm.exit_layers, h_exits):
            torch.testing.assert_close(bm.model.output(h), bm(idx, exit=k), atol=1e-5, rtol=0)
    assert not h_full.requires_grad and all(h.requires_grad for h in h_exits)


def kl_and_grads(bm, idx, loss, weights):
    """Eq. 2 by `loss` on the exits of bm, and the gradients of sum_j weights[j] * KL_j for every exit parameter."""
    h_full, h_exits = bm.forward_train(idx)
    kl = loss(h_full, h_exits)
    (kl * weights).sum().backward()
    grads = [p.grad.clone() for p in bm.exits.parameters()]
    bm.zero_grad()
    return kl.detach(), grads


def f_kl_div(bm):  # the plain formula with F.kl_div, as the authors write it: full logits, autograd
    return lambda h_full, h_exits: distillation_kl_reference(bm.model.output.weight, h_full, h_exits)


@pytest.mark.parametrize("chunk", [1, 5, 7, 24, 1000])  # 24 tokens: chunks that divide them and chunks that do not
def test_fused_kl_equals_f_kl_div_in_value_and_gradient_fp64(chunk):
    torch.manual_seed(0)
    bm = BalconyModel(Transformer(tiny_args()), [1, 3], init="random").double()  # random exits: KL far from 0
    idx, weights = torch.randint(0, 320, (2, 12)), torch.tensor([0.3, 1.7], dtype=torch.float64)
    kl, grads = kl_and_grads(bm, idx, lambda h, hs: distillation_kl(bm.model.output, h, hs, chunk), weights)
    ref, ref_grads = kl_and_grads(bm, idx, f_kl_div(bm), weights)
    assert kl.dtype == torch.float64 and (kl > 0.1).all()
    torch.testing.assert_close(kl, ref, atol=1e-12, rtol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-10)
    assert bm.model.output.weight.grad is None  # the frozen head gets no gradient


def test_fused_kl_is_accurate_when_kl_is_small():
    """A trained exit's KL is small (1e-5..1e-4 nats a token) next to the teacher's entropy (~10 nats at a large,
    flat vocabulary): the fp32 value must keep its digits. Reference: the plain formula in float64 on the same
    inputs. Tolerance 0.02%: one dot product with (log p - log q) is 0.002% off here, the difference of the two sums
    sum p log p - sum p log q 0.3% (and 20% at half this KL)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 16384, bias=False)
    torch.nn.init.normal_(head.weight, std=0.1)
    h_full = torch.randn(2, 256, 64)
    h_exit = h_full + 0.01 * torch.randn(2, 256, 64)
    kl = distillation_kl(head, h_full, [h_exit])
    ref = distillation_kl_reference(head.weight.double(), h_full.double(), [h_exit.double()])
    assert 1e-5 < ref.item() / 512 < 1e-4  # nats a token
    torch.testing.assert_close(kl.double(), ref, rtol=2e-4, atol=0)


def test_fused_kl_under_bf16_autocast_is_close_to_fp32():
    """Under autocast the exits run in bf16 and so their hidden states differ from fp32 by bf16 rounding (~3
    significant digits); the loss's own softmax and KL are fp32 either way. Tolerance: 2% of the value, 5% of the
    largest gradient entry."""
    torch.manual_seed(0)
    bm = BalconyModel(Transformer(tiny_args()), [1, 3], init="random")
    idx, weights = torch.randint(0, 320, (2, 12)), torch.ones(2)
    fused = lambda h, hs: distillation_kl(bm.model.output, h, hs, 5)  # noqa: E731
    ref, ref_grads = kl_and_grads(bm, idx, f_kl_div(bm), weights)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kl, grads = kl_and_grads(bm, idx, fused, weights)
    assert kl.dtype == torch.float32
    torch.testing.assert_close(kl, ref, rtol=0.02, atol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=0.05 * r.abs().max().item())


def test_fused_kl_under_torch_compile():
    """Dynamo traces the autograd.Function (forward and its saved gradients) without a graph break. The aot_eager
    backend keeps this test to seconds on CPU; tests/test_cuda.py compiles the whole step with inductor."""
    torch.manual_seed(0)
    bm = BalconyModel(Transformer(tiny_args()), [1, 3], init="random")
    idx, weights = torch.randint(0, 320, (2, 12)), torch.tensor([0.3, 1.7])
    fused = lambda h, hs: distillation_kl(bm.model.output, h, hs, 7)  # noqa: E731
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    kl, grads = kl_and_grads(bm, idx, compiled, weights)
    ref, ref_grads = kl_and_grads(bm, idx, fused, weights)
    torch.testing.assert_close(kl, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_save_load_round_trip_and_refusals(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "base", seed=0)
    bm = BalconyModel(Transformer.from_checkpoint(ckpt), [1, 2], init="random")
    path = tmp_path / "balcony.safetensors"
    bm.save_exits(path)
    loaded = BalconyModel.from_checkpoint(ckpt, path)
    assert loaded.exit_layers == [1, 2]
    for (n1, t1), (n2, t2) in zip(bm.exits.state_dict().items(), loaded.exits.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2)
    other = make_tiny_checkpoint(tmp_path / "other", seed=1)
    with pytest.raises(UsageError, match="trained for another base model"):
        BalconyModel.from_checkpoint(other, path)
    with pytest.raises(UsageError, match="holds exits \\[1, 2\\], not \\[3\\]"):
        BalconyModel(Transformer.from_checkpoint(ckpt), [3]).load_exits(path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UsageError, match="not a readable balcony file"):
        BalconyModel.from_checkpoint(ckpt, tmp_path / "junk.safetensors")
    with pytest.raises(UsageError, match="not found; train exits first"):
        BalconyModel.from_checkpoint(ckpt, tmp_path / "missing.safetensors")


def test_fingerprint_is_the_same_in_fp32_and_bf16(tiny_ckpt):
    fp32 = Transformer.from_checkpoint(tiny_ckpt, dtype=torch.float32)
    bf16 = Transformer.from_checkpoint(tiny_ckpt, dtype=torch.bfloat16)
    assert model_fingerprint(fp32) == model_fingerprint(bf16)


def test_fingerprint_of_a_tensor_past_2_to_the_24_elements():
    # float32 index arithmetic rounds numel - 1 up to numel past 2**24 (SmolLM2's embedding has 28M elements)
    model = Transformer(tiny_args(dim=16, n_heads=2, n_kv_heads=1, hidden_dim=16, n_layers=1, vocab_size=2**20 + 1))
    assert model.tok_embeddings.weight.numel() > 2**24
    assert len(model_fingerprint(model)) == 16


@pytest.mark.parametrize("chunk", [7, 1000])
def test_exit_metrics_equal_plain_formulas(chunk):
    torch.manual_seed(0)
    bm = BalconyModel(Transformer(tiny_args()), [1, 2], init="random")
    x, y = torch.randint(0, 320, (2, 12)), torch.randint(0, 320, (2, 12))
    h_full, h_exits = bm.forward_train(x)
    kl, top1, nll, hits = exit_metrics(bm.model.output, h_full, h_exits + [h_full], y, chunk_size=chunk)
    with torch.no_grad():
        full = bm(x).flatten(0, 1)
        for j, logits in enumerate([bm(x, exit=1).flatten(0, 1), bm(x, exit=2).flatten(0, 1), full]):
            ref_kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(full, -1), log_target=True, reduction="sum")
            torch.testing.assert_close(kl[j], ref_kl, atol=1e-4, rtol=1e-4)
            assert top1[j] == (logits.argmax(-1) == full.argmax(-1)).sum()
            assert hits[j] == (logits.argmax(-1) == y.flatten()).sum()
            torch.testing.assert_close(nll[j], F.cross_entropy(logits, y.flatten(), reduction="sum"), atol=1e-3, rtol=1e-5)
    assert kl[-1].abs() < 1e-4 and top1[-1] == 24 and top1[0] < 24


def test_heldout_metrics_is_exit_metrics_per_token():
    """Batches of different sizes: the per-token means of exit_metrics' sums over all of them; all_reduce sees the
    sums (KL, top-1, NLL, target hits, tokens) before they are divided."""
    torch.manual_seed(0)
    bm = BalconyModel(Transformer(tiny_args()), [1, 2], init="random")
    x, y = torch.randint(0, 320, (3, 12)), torch.randint(0, 320, (3, 12))
    with torch.no_grad():
        h_full, h_exits = bm.forward_train(x)
    kl, top1, nll, hits = exit_metrics(bm.model.output, h_full, h_exits + [h_full], y) / 36
    seen = []
    m = heldout_metrics(bm.model.output, [(h_full[:1], [h[:1] for h in h_exits + [h_full]], y[:1]),
                                          (h_full[1:], [h[1:] for h in h_exits + [h_full]], y[1:])],
                        all_reduce=seen.append)
    assert m["tokens"] == 36 and seen[0].shape == (5, 3) and seen[0][4].tolist() == [36] * 3
    torch.testing.assert_close(torch.tensor(m["kl"]), kl, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(m["top1"]), top1)
    torch.testing.assert_close(torch.tensor(m["target_top1"]), hits)
    torch.testing.assert_close(torch.tensor(m["ppl"]), nll.exp(), atol=1e-4, rtol=1e-5)

"""CUDA paths: bf16 against fp32, and torch.compile of the decode step and of the training step with no graph break
(fullgraph=True raises on one). CI has no GPU: these skip there and run wherever CUDA is available."""
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_args

import generate
from balcony import BalconyModel
from model import Transformer
from train import ExitLoss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def device():
    return torch.device("cuda")


def tiny_balcony(device, dtype=torch.float32):
    torch.manual_seed(0)
    return BalconyModel(Transformer(tiny_args()), [1, 3]).to(device=device, dtype=dtype).eval()


def test_bf16_logits_match_fp32(device):
    # bf16 keeps 8 bits of mantissa: per-token KL(p_fp32 || p_bf16) stays below 1e-3 nats, logits within 0.05
    fp32, bf16 = tiny_balcony(device), tiny_balcony(device, torch.bfloat16)
    idx = torch.randint(0, 320, (2, 64), device=device)
    with torch.no_grad():
        for exit in (1, None):
            hi, lo = fp32(idx, exit=exit).float(), bf16(idx, exit=exit).float()
            torch.testing.assert_close(lo, hi, atol=5e-2, rtol=0)
            kl = F.kl_div(F.log_softmax(lo, -1), F.log_softmax(hi, -1), log_target=True, reduction="none").sum(-1)
            assert kl.max() < 1e-3


def test_compiled_decode_step_has_no_graph_break(device):
    bm = tiny_balcony(device)
    step = torch.compile(generate.decode_one_token, mode="reduce-overhead", fullgraph=True, dynamic=False)
    bm.setup_caches(1, 32, exits=[3])
    plan = generate.exit_plan([3])
    with torch.no_grad():
        for t in range(4):  # a few steps: CUDA graphs are recorded after warm-up
            cur, pos = torch.tensor([[t + 5]], device=device), torch.tensor([[t]], device=device)
            got = step(bm, cur, pos, plan).clone()
        ref = bm(torch.tensor([[5, 6, 7, 8]], device=device), exit=3)[:, -1]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_cached_attention_avoids_the_math_kernel(device):
    # with the math kernel excluded, SDPA raises rather than fall back to it: the masked, GQA cached path must find
    # the memory-efficient kernel (KV heads repeated; enable_gqa with a mask would leave only math)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    bm = tiny_balcony(device, torch.bfloat16)
    idx = torch.randint(0, 320, (2, 12), device=device)
    bm.setup_caches(2, 16)
    with torch.no_grad(), sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION]):
        got = bm(idx, input_pos=torch.arange(12, device=device))
    with torch.no_grad():
        torch.testing.assert_close(got.float(), bm(idx).float(), atol=5e-2, rtol=0)


def test_compiled_speculative_decoding_equals_eager(device, monkeypatch):
    bm = tiny_balcony(device)
    prompt = [5, 17, 33, 100, 7]
    ref = generate.generate(bm, [prompt], 24)[0]["tokens"]
    for name in ("decode_one_token", "draft_one_token", "_compiled"):  # restored after the test
        monkeypatch.setattr(generate, name, getattr(generate, name))
    generate.compile_steps()
    for _ in range(2):  # the second run replays the recorded graphs, whose outputs the first could still read
        assert generate.generate(bm, [prompt], 24, draft_exit=1, speculate_k=3)[0]["tokens"] == ref


def test_compiled_train_step_has_no_graph_break(device):
    bm = tiny_balcony(device)
    loss_fn = ExitLoss(bm, chunk_size=16, ce_weight=0.0)
    x = torch.randint(0, 320, (2, 32), device=device)
    eager_loss, eager_kl, _ = loss_fn(x, x)
    eager_loss.backward()
    eager_grads = [p.grad.clone() for p in bm.exits.parameters()]
    bm.zero_grad()
    compiled = torch.compile(loss_fn, dynamic=False, fullgraph=True)
    loss, kl, _ = compiled(x, x)
    loss.backward()
    torch.testing.assert_close(kl, eager_kl, atol=1e-4, rtol=1e-4)
    for g, p in zip(eager_grads, bm.exits.parameters()):
        torch.testing.assert_close(p.grad, g, atol=1e-4, rtol=1e-3)

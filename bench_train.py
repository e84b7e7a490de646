"""
Peak memory of one Balcony training step against sequence length and number of exits; on CUDA also tokens/s and MFU.

    python bench_train.py --n-layers 8                               # CPU: SmolLM2-135M shapes, random weights
    python bench_train.py --preset llama-3-8b --seq-lens 4096 --exits 3 --time   # CUDA: throughput and MFU too

The loss (balcony.distillation_kl, Eq. 2) makes logits for chunk_size tokens at a time and recomputes them in the
backward pass, so its memory should follow chunk_size, not tokens x vocab x exits. The table sets chunk_size = all
tokens against chunk_size = 256, next to what unchunked fp32 logits alone would take. Peak memory is, on CUDA,
torch.cuda.max_memory_allocated; on CPU, the peak resident set size (VmHWM, reset through /proc/self/clear_refs)
above the resident size before the step. Weights are random: memory and speed do not depend on their values.
"""
import argparse
import time
from pathlib import Path

import torch

from balcony import BalconyModel, distillation_kl
from cli import run_cli
from model import ModelArgs, Transformer
from train import ExitLoss

# dense bf16 peak of the GPU, for MFU (H100 SXM; pass --peak-tflops for another)
H100_BF16_TFLOPS = 989.0


def exit_layers(n_layers: int, n_exits: int) -> list:
    step = max(1, n_layers // 10)  # 30 layers, 3 exits: 15, 18, 21 as in the paper
    return [n_layers // 2 + i * step for i in range(n_exits)]


def _rss_kb(field: str) -> int:
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1])


def peak_mib(fn, device) -> float:
    """Peak memory fn() adds above what is allocated before it, in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    base = _rss_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    fn()
    return (_rss_kb("VmHWM") - base) / 1024


def flops_per_token(a: ModelArgs, n_exits: int, seq_len: int) -> float:
    """Model FLOPs of one training step per token (no recomputation counted): the frozen backbone and the teacher
    head forward only; each exit's block forward and backward with weight gradients; its head forward and backward
    to the hidden states (the head is frozen). Attention scores count 4 * T * dim per layer forward."""
    per_layer = 2 * (a.dim * a.head_dim * (a.n_heads * 2 + a.n_kv_heads * 2) + 3 * a.dim * a.hidden_dim)
    per_layer += 4 * seq_len * a.n_heads * a.head_dim
    head = 2 * a.dim * a.vocab_size
    return a.n_layers * per_layer + head + n_exits * (3 * per_layer + 2 * head)


def main(args):
    device = torch.device(args.device)
    margs = ModelArgs.from_name(args.preset)
    if args.n_layers:
        margs.n_layers = args.n_layers
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # autocast on CUDA, as train.py
    ctx = torch.autocast("cuda", dtype=dtype) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(margs)
    print(f"{args.preset}{f' ({margs.n_layers} layers)' if args.n_layers else ''} on {device}, batch {args.batch_size}, "
          f"fp32 weights{', bf16 autocast' if device.type == 'cuda' else ''}")
    print(f"{'seq_len':>7} {'exits':>5} {'chunk':>6} | {'step peak MiB':>13} {'loss peak MiB':>13} | "
          f"{'unchunked logits MiB':>20}")
    for n_exits in map(int, args.exits.split(",")):
        bm = BalconyModel(model, exit_layers(margs.n_layers, n_exits))
        for T in map(int, args.seq_lens.split(",")):
            tokens = args.batch_size * T
            x = torch.randint(0, margs.vocab_size, (args.batch_size, T + 1), device=device)
            x, y = x[:, :-1], x[:, 1:]
            for chunk in sorted({tokens, args.chunk_size}, reverse=True):
                loss_fn = ExitLoss(bm, chunk, 0.0)

                def step():
                    with ctx:
                        loss, _, _ = loss_fn(x, y)
                    loss.backward()
                    bm.exits.zero_grad(set_to_none=True)

                with torch.no_grad(), ctx:
                    h_full, h_exits = bm.forward_train(x)
                h_exits = [h.detach().requires_grad_() for h in h_exits]

                def loss_only():
                    with ctx:
                        kl = distillation_kl(bm.model.output, h_full, h_exits, chunk)
                    kl.sum().backward()
                    for h in h_exits:
                        h.grad = None

                step()  # warm up: lazy allocations, allocator caches
                mem_step, mem_loss = peak_mib(step, device), peak_mib(loss_only, device)
                logits = tokens * margs.vocab_size * 4 * (n_exits + 1) / 2 ** 20
                print(f"{T:>7} {n_exits:>5} {chunk:>6} | {mem_step:>13.0f} {mem_loss:>13.0f} | {logits:>20.0f}")
        if args.time:
            time_steps(bm, margs, n_exits, int(args.seq_lens.split(",")[-1]), args, ctx, device)
        del bm


def time_steps(bm, margs, n_exits, T, args, ctx, device):
    """tokens/s and MFU of the full optimiser step (forward, backward, AdamW) as train.py runs it."""
    loss_fn = ExitLoss(bm, args.chunk_size, 0.0)
    if args.compile:
        loss_fn = torch.compile(loss_fn, dynamic=False)
    opt = torch.optim.AdamW(bm.exits.parameters(), lr=1e-4, fused=device.type == "cuda")
    x = torch.randint(0, margs.vocab_size, (args.batch_size, T + 1), device=device)
    x, y = x[:, :-1], x[:, 1:]

    def step():
        with ctx:
            loss, _, _ = loss_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(bm.exits.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    step()  # compiles, if --compile
    sync()
    print(f"first step (includes compile): {time.perf_counter() - t0:.1f} s")
    step()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    dt = (time.perf_counter() - t0) / args.steps
    tok_s = args.batch_size * T / dt
    line = f"{n_exits} exits, seq_len {T}: {dt * 1000:.0f} ms/step, {tok_s:,.0f} tokens/s"
    if device.type == "cuda":
        mfu = flops_per_token(margs, n_exits, T) * tok_s / (args.peak_tflops * 1e12)
        line += f", MFU {mfu:.1%} of {args.peak_tflops:.0f} TFLOP/s"
    print(line)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = " (default: %(default)s)"
    p.add_argument("--preset", default="smollm2-135m", help="model shape, random weights" + d)
    p.add_argument("--n-layers", type=int, default=None, help="fewer backbone layers, for a quicker CPU run")
    p.add_argument("--seq-lens", default="256,1024", help="comma-separated sequence lengths" + d)
    p.add_argument("--exits", default="1,3", help="comma-separated numbers of exits" + d)
    p.add_argument("--batch-size", type=int, default=1, help=d.strip())
    p.add_argument("--chunk-size", type=int, default=256, help="the loss's chunk, against chunk = all tokens" + d)
    p.add_argument("--time", action="store_true", help="also time optimiser steps at the last seq_len")
    p.add_argument("--steps", type=int, default=10, help="timed steps with --time" + d)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=torch.cuda.is_available(),
                   help="torch.compile the timed step (default: on with CUDA)")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_TFLOPS, help="GPU bf16 peak, for MFU" + d)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help=d.strip())
    return p


if __name__ == "__main__":
    run_cli(main, get_parser().parse_args)

"""
One Balcony training step, ours against the authors' formulation, on the same model, batch and exits.

    python bench_train.py          # CPU: SmolLM2-135M shape, exits 15,18,21, batch 4 x 256, fp32, random weights
    python bench_train.py --preset llama-3-8b --seq-len 4096 --batch-size 1 --dtype bfloat16 --compile  # a GPU

ours: train.ExitLoss, as train.py runs it (one no-grad backbone pass, the exits, balcony.distillation_kl: Eq. 2
chunked, with its gradient made in the forward pass). authors: a transformers LlamaForCausalLM built from the same
weights, run with output_hidden_states; each exit (a copy of the last decoder layer and the final norm, as ours) on
its hidden states, then the head, full-vocab F.kl_div against the full model's logits, plain autograd. Both then
clip and take an AdamW step on the exits alone. floor: only the matrix products that any formulation must do
(bench_train.matmul_floor), timed the same way; its time bounds every formulation's from below.

Each formulation runs in a fresh process, so their memory does not mix: step peak is the memory a step adds above
what is resident before it (CUDA: max_memory_allocated; CPU: peak RSS, VmHWM reset through /proc/self/clear_refs),
process peak the whole process's (weights included). Seconds per step are the fastest of --steps steps after one
warm-up (which includes compiling), over --rounds runs of each formulation in the order A B B A: on a shared machine
the fastest step is the one least slowed by others. On CUDA, MFU counts the model FLOPs of flops_per_token. Weights are random:
speed and memory do not depend on their values.
"""
import argparse
import contextlib
import multiprocessing as mp
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from balcony import BalconyModel
from cli import DTYPE_HELP, DTYPES, default_dtype, run_cli
from convert_hf import HF_WEIGHT_MAP
from model import ModelArgs, Transformer
from train import ExitLoss

# dense bf16 peak of the GPU, for MFU (H100 SXM; pass --peak-tflops for another)
H100_BF16_TFLOPS = 989.0


def _rss_kb(field: str) -> int:
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1])


def peak_mib(fn, device) -> float:
    """Peak memory fn() adds above what is allocated before it, in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the device's own: the current one may be another (cuda:0 for a cuda:1 run)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
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


# ---------------------------------------------------------------------------------------- the authors' formulation
def hf_model(model: Transformer):
    """A transformers LlamaForCausalLM sharing model's weights (no copy)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    a = model.args
    config = LlamaConfig(hidden_size=a.dim, num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads,
                         num_key_value_heads=a.n_kv_heads, head_dim=a.head_dim, vocab_size=a.vocab_size,
                         intermediate_size=a.hidden_dim, rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta,
                         max_position_embeddings=a.max_seq_len, tie_word_embeddings=a.tie_embeddings,
                         rope_scaling={"rope_type": "llama3", **a.rope_scaling} if a.rope_scaling else None,
                         attn_implementation="sdpa")
    ours = {v: k for k, v in HF_WEIGHT_MAP.items() if v is not None}
    sd = {}
    for name, t in model.state_dict().items():
        parts = name.split(".")
        key = ".".join(p if not p.isdigit() else "{}" for p in parts)
        if key in ours:
            sd[ours[key].format(*[p for p in parts if p.isdigit()])] = t
    with torch.device("meta"):
        hf = LlamaForCausalLM(config)
    hf.load_state_dict(sd, strict=False, assign=True)
    if a.tie_embeddings:
        hf.lm_head.weight = hf.model.embed_tokens.weight
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config).to(model.inv_freq.device)  # its buffers, not on meta
    return hf.requires_grad_(False).eval()


class AuthorsLoss(torch.nn.Module):
    """Eq. 2 the direct way: every hidden state of the transformers model, then per exit a decoder layer and a norm
    (copies of the last ones, fp32) and the head on them, full (B, T, vocab) logits and F.kl_div, autograd for the
    backward."""

    def __init__(self, hf, exit_layers):
        super().__init__()
        import copy

        self.hf, self.exit_layers = hf, exit_layers
        self.layers = torch.nn.ModuleList(copy.deepcopy(hf.model.layers[-1]) for _ in exit_layers)
        self.norms = torch.nn.ModuleList(copy.deepcopy(hf.model.norm) for _ in exit_layers)
        for m in (self.layers, self.norms):
            m.float().requires_grad_(True)

    def forward(self, x):
        out = self.hf(x, output_hidden_states=True)
        teacher = F.log_softmax(out.logits.float(), -1)  # (B, T, vocab)
        pos = torch.arange(x.size(1), device=x.device)[None]
        rope = self.hf.model.rotary_emb(out.hidden_states[0], pos)
        loss = 0.0
        for k, layer, norm in zip(self.exit_layers, self.layers, self.norms):
            h = norm(layer(out.hidden_states[k], position_embeddings=rope, position_ids=pos))
            student = F.log_softmax(self.hf.lm_head(h).float(), -1)
            loss = loss + F.kl_div(student.flatten(0, 1), teacher.flatten(0, 1), log_target=True,
                                   reduction="batchmean")  # batchmean over the B*T rows: the mean per token
        return loss


def matmul_floor(model: Transformer, n_exits: int, tokens: int):
    """A step that does the matrix products no formulation of Eq. 2 can avoid, and nothing else: the backbone's
    projections forward; the head forward for the teacher and each exit; the head backward to each exit's hidden
    states; each exit block's projections forward and backward (input and weight gradients). No attention, norm,
    softmax or optimizer: its time is a floor under any step's on this machine."""
    w = lambda layer: [p for p in layer.parameters() if p.dim() == 2]  # noqa: E731
    backbone, block, head = [p for layer in model.layers for p in w(layer)], w(model.layers[-1]), model.output.weight
    acts = {d: torch.randn(tokens, d, dtype=head.dtype, device=head.device)
            for d in {d for p in backbone for d in p.shape}}
    grad_logits = torch.randn(tokens, head.shape[0], dtype=head.dtype, device=head.device)

    def step():
        for p in backbone:
            F.linear(acts[p.shape[1]], p)
        for _ in range(1 + n_exits):
            F.linear(acts[head.shape[1]], head)
        for _ in range(n_exits):
            grad_logits @ head
            for p in block:
                F.linear(acts[p.shape[1]], p), acts[p.shape[0]] @ p, acts[p.shape[0]].T @ acts[p.shape[1]]
    return step


# ----------------------------------------------------------------------------------------------------- the bench
def run(name: str, args) -> dict:
    """Build the model and `name`'s loss, take the steps; seconds per step and memory. Runs in its own process."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    margs = ModelArgs.from_name(args.preset)
    if args.n_layers:
        margs.n_layers = args.n_layers
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(margs).to(dtype).requires_grad_(False)  # random weights, the same in both processes
    exits = [int(k) for k in args.exits.split(",")]
    x = torch.randint(0, margs.vocab_size, (args.batch_size, args.seq_len), device=device)
    if name == "floor":
        return measure(matmul_floor(model, len(exits), x.numel()), margs, exits, args, device)
    if name == "ours":
        bm = BalconyModel(model, exits)
        bm.exits.float()  # fp32 master weights, as train.py
        loss_fn, params = ExitLoss(bm, args.chunk_size, 0.0), list(bm.exits.parameters())
        forward = lambda x: loss_fn(x, x)[0]  # noqa: E731
    else:
        loss_fn = AuthorsLoss(hf_model(model), exits)
        del model
        params, forward = [p for p in loss_fn.parameters() if p.requires_grad], loss_fn
    if args.compile:
        forward = torch.compile(forward, dynamic=False)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    ctx = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    def step():
        with ctx:
            loss = forward(x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return measure(step, margs, exits, args, device)


def measure(step, margs, exits, args, device) -> dict:
    """One warm-up step, then --steps timed ones: the fastest step's seconds and the memory peaks."""
    t0 = time.perf_counter()
    step()  # warm-up: compiles, if --compile; allocates AdamW's state
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the timed steps are synchronised by peak_mib
    first = time.perf_counter() - t0
    times, peaks = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        peaks.append(peak_mib(step, device))
        times.append(time.perf_counter() - t0)
    process = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else _rss_kb("VmHWM") / 1024
    if device.type != "cuda":  # VmHWM was reset before each step: the peak since start-up is the max of both
        process = max(process, _rss_kb("VmRSS") / 1024 + max(peaks))
    return dict(s=min(times), first=first, step_mib=max(peaks), process_mib=process,
                flops=flops_per_token(margs, len(exits), args.seq_len))


def main(args) -> int:
    args.dtype = args.dtype or default_dtype(args.device)
    tokens = args.batch_size * args.seq_len
    print(f"{args.preset}{f' ({args.n_layers} layers)' if args.n_layers else ''}, exits {args.exits}, batch "
          f"{args.batch_size} x {args.seq_len}, {args.dtype}, chunk {args.chunk_size}, {args.device}, "
          f"{torch.get_num_threads()} threads, compile {args.compile}; fastest of {args.steps} steps after a warm-up, "
          f"{args.rounds} rounds")
    names, results = args.formulations.split(","), {}
    order = [n for r in range(args.rounds) for n in (names if r % 2 == 0 else names[::-1])]  # ABBA: drift cancels
    with mp.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:  # a fresh process for each run
        for name in order:
            r = pool.apply(run, (name, args))
            best = results.setdefault(name, r)
            results[name] = {k: (min if k in ("s", "first") else max)(best[k], r[k]) for k in r}
    print("| formulation | s/step | tokens/s | step peak MiB | process peak MiB | first step s |" +
          (" MFU |" if args.device.startswith("cuda") else ""))
    print("|---|---|---|---|---|---|" + ("---|" if args.device.startswith("cuda") else ""))
    for name, r in results.items():
        line = (f"| {name} | {r['s']:.2f} | {tokens / r['s']:,.0f} | {r['step_mib']:,.0f} | {r['process_mib']:,.0f} "
                f"| {r['first']:.1f} |")
        if args.device.startswith("cuda"):
            line += f" {r['flops'] * tokens / r['s'] / (args.peak_tflops * 1e12):.1%} |"
        print(line)
    if {"ours", "authors"} <= set(results):
        o, a = results["ours"], results["authors"]
        print(f"ours: {a['s'] / o['s']:.2f}x the authors' speed, {o['step_mib'] / a['step_mib']:.2f}x their step "
              f"memory, {o['process_mib'] / a['process_mib']:.2f}x their process peak")
    if "floor" in results:
        f = results["floor"]
        print("against the matrix products alone: " + ", ".join(f"{n}'s step takes {r['s'] / f['s']:.2f}x their time"
                                                               for n, r in results.items() if n != "floor") +
              (f"; no formulation can run faster than {results['authors']['s'] / f['s']:.2f}x the authors'"
               if "authors" in results else ""))
    return 0


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = " (default: %(default)s)"
    cuda = torch.cuda.is_available()
    p.add_argument("--preset", default="smollm2-135m", help="model shape, random weights" + d)
    p.add_argument("--n-layers", type=int, default=None, help="fewer backbone layers, for a quicker run")
    p.add_argument("--exits", default="15,18,21", help="comma-separated exit layers" + d)
    p.add_argument("--batch-size", type=int, default=4, help=d.strip())
    p.add_argument("--seq-len", type=int, default=256, help=d.strip())
    p.add_argument("--chunk-size", type=int, default=256, help="ours: tokens whose logits exist at once" + d)
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help=f"the frozen model's weights ({DTYPE_HELP}); "
                   "exits fp32 under autocast when not float32")
    p.add_argument("--steps", type=int, default=3, help="timed steps per formulation" + d)
    p.add_argument("--rounds", type=int, default=2, help="runs of each formulation, alternating" + d)
    p.add_argument("--formulations", default="ours,authors,floor",
                   help="which to run, in order (floor: the unavoidable matrix products alone)" + d)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=cuda,
                   help="torch.compile the loss (default: on with CUDA)")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_TFLOPS, help="GPU bf16 peak, for MFU" + d)
    p.add_argument("--device", default="cuda" if cuda else "cpu", help=d.strip())
    return p


if __name__ == "__main__":
    run_cli(main, get_parser().parse_args)

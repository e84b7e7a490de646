"""
Train Balcony exits on a frozen converted checkpoint: the self-distillation loss of the paper's Eq. 2 (section 3).

    python train.py --exit-layers 15,18,21                  # SmolLM2-135M on its own chats (python chat_data.py)
    torchrun --nproc_per_node 8 train.py --exit-layers 15,18,21 --data corpus/ --seq-len 4096 --batch-size 4

Only the exits learn; the backbone and the shared LM head are frozen, so every batch costs one no-grad backbone pass
plus a block and the head per exit. The loop is nanoGPT's (DDP from torchrun's env, gradient accumulation, warmup
then cosine, clipping, periodic validation) cut into functions. data.py tokenises text once into a cached memmap.

Section 4.3's ablations are flags: --init random, --balcony mlp|attn, --loss kl+ce --kl-weight 0.001 --ce-weight 1,
--train-backbone (writes a whole checkpoint folder). ablate.py runs them side by side (the paper's Figure 5).

Table 4's two other modes train every weight on the mean next-token cross-entropy over all submodels (each exit and
full depth; --loss ce, no self-distillation) and write a whole checkpoint folder with its exits:

    python train.py --from-scratch tiny-16 --exit-layers 4,8,12 --out out/balcony-16   # a new model + balconies
    python train.py --from-scratch tiny-16 --exit-layers 4,8,12 --balcony none --out out/sorted-16   # Sorted
    python train.py --checkpoint out/plain-16 --exit-layers 4,8,12 --balcony none --train-backbone --out out/sft
                                                                                    # Sorted fine-tuning
--balcony none is an exit with no layer (the layer-k state through the final norm and the shared head: SortedLLaMA's
and LayerSkip's exit). pretrain_table.py runs Table 4.
"""
import argparse
import contextlib
import gc
import json
import math
import os
import shutil
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from balcony import (KINDS, BalconyModel, distillation_kl, distillation_kl_reference, heldout_metrics,
                     model_fingerprint)
from cli import (DEFAULT_CHECKPOINT, DTYPES, UsageError, add_quantize_args, atomic_write, default_dtype, quant_kwargs,
                 run_cli)
from convert_hf import TOKENIZER_FILES
from data import (FORMAT, add_data_args, data_files, get_batch, iter_batches, n_windows, open_mask, open_tokens,
                  step_windows, tokenize_corpus)
from model import ModelArgs, Transformer
from quantize import quantize_checkpoint
from tokenizer import Tokenizer


# ------------------------------------------------------------------------------------------------------- objective
def _ce_chunk(weight, h, y):
    return F.cross_entropy(F.linear(h, weight).float(), y, reduction="sum")


def chunked_ce(weight, hs, y, chunk_size: int):
    """Next-token cross-entropy of each normalised hidden state in hs ((B, T, D) each) against targets y (B, T),
    summed over tokens: (len(hs),). Chunks of tokens are recomputed in backward, so no logits tensor larger than
    (chunk_size, vocab) is kept for it."""
    y, c = y.reshape(-1), chunk_size
    return torch.stack([sum(checkpoint(_ce_chunk, weight, h.reshape(len(y), -1)[s:s + c], y[s:s + c],
                                       use_reentrant=False) for s in range(0, len(y), c)) for h in hs])


class ExitLoss(nn.Module):
    """The training objective as one module, so DDP and torch.compile can wrap it: per exit, kl_weight times Eq. 2's
    KL averaged over the target tokens, plus (--loss kl+ce) ce_weight times the exit's cross-entropy against the next
    token. masked: only the positions whose target y is not -1 (data.py's mask: a chat's answers) enter the loss, and
    the head's products in it; the backbone and the balconies still run on every position, as attention needs.
    Returns the loss and the unweighted per-exit KL and CE (None without CE) for the log."""

    def __init__(self, bm: BalconyModel, chunk_size: int, ce_weight: float = 0.0, kl_weight: float = 1.0,
                 masked: bool = False):
        super().__init__()
        self.bm, self.chunk_size, self.kl_weight, self.ce_weight = bm, chunk_size, kl_weight, ce_weight
        self.masked = masked

    def forward(self, x, y):
        h_full, h_exits = self.bm.forward_train(x)  # (B, T, D), [(B, T, D)] * n_exits
        return (self.masked_loss if self.masked else self.loss)(h_full, h_exits, y)

    @torch.compiler.disable  # how many positions count changes every batch: compiled, it would recompile every step
    def masked_loss(self, h_full, h_exits, y):
        keep = y.reshape(-1) >= 0  # (B * T,)
        return self.loss(h_full.flatten(0, 1)[keep], [h.flatten(0, 1)[keep] for h in h_exits], y.reshape(-1)[keep])

    def loss(self, h_full, h_exits, y):
        n = max(y.numel(), 1)  # the targets counted: every position unless masked
        if self.bm.train_backbone:  # the head trains too: the plain form gives it a gradient, the fused one does not
            kl = distillation_kl_reference(self.bm.model.output.weight, h_full, h_exits) / n  # (n_exits,)
        else:
            kl = distillation_kl(self.bm.model.output, h_full, h_exits, self.chunk_size) / n
        # The weighting, in one place. The paper's CE ablation (section 4.3) is kl_weight 0.001, ce_weight 1.
        loss = self.kl_weight * kl.sum()
        if not self.ce_weight:
            return loss, kl.detach(), None
        ce = chunked_ce(self.bm.model.output.weight, h_exits, y, self.chunk_size) / n  # chunked like the KL
        return loss + self.ce_weight * ce.sum(), kl.detach(), ce.detach()


class SubmodelLoss(nn.Module):
    """--loss ce, Table 4's objective where every weight trains (--from-scratch; Sorted fine-tuning with --balcony
    none --train-backbone): the mean next-token cross-entropy over all submodels, each exit and full depth. "Since we
    are training from scratch, we omit self-distillation" (section 4.3). Returns the loss, no KL, and the per-submodel
    CE (exits, then full depth) for the log."""

    def __init__(self, bm: BalconyModel, chunk_size: int):
        super().__init__()
        self.bm, self.chunk_size = bm, chunk_size

    def forward(self, x, y):
        hs = self.bm.forward_submodels(x)  # [(B, T, D)] * (n_exits + 1)
        ce = chunked_ce(self.bm.model.output.weight, hs, y, self.chunk_size) / x.numel()  # (n_exits + 1,)
        return ce.mean(), None, ce.detach()


def baseline_states(bm: BalconyModel, x):
    """No balconies: the final norm applied straight to the layer-k hidden states, as forward_train's outputs."""
    h, prev, normed = bm.model.tok_embeddings(x), 0, []
    for k in bm.exit_layers + [bm.n_layers]:
        h, prev = bm.run_layers(h, prev, k), k
        normed.append(bm.model.norm(h))
    return normed[-1], normed[:-1]


@torch.no_grad()
def evaluate(bm, val, args, ctx, rank=0, world_size=1, baseline=False, mask=None):
    """Validation KL(p_full || p) per target token (mask: data.py's loss mask, else every token), top-1 agreement with
    the full model and perplexity: three lists, one value per exit and a last one for full depth. baseline: no
    balconies (the final norm straight on layer-k states)."""
    device = bm.model.output.weight.device
    real = iter_batches(val, args.seq_len, args.batch_size, device, args.eval_windows, rank, world_size, mask)
    n_batches = math.ceil(min(n_windows(val, args.seq_len), args.eval_windows) / args.batch_size)

    def batches():
        # batches are dealt round-robin, so some ranks may get one fewer; with --fsdp every forward all-gathers each
        # layer (a collective), so every rank runs the same number of forwards: the short ones repeat the first
        # window and count none of its rows
        for _ in range(math.ceil(n_batches / world_size)):
            batch = next(real, None)
            x, y = batch or get_batch(val, [0], args.seq_len, device, mask)
            with ctx:
                h_full, h_exits = baseline_states(bm, x) if baseline else bm.forward_train(x)
            n = len(x) if batch else 0
            keep = y[:n] >= 0  # (n, T): the targets that count
            yield h_full[:n][keep], [h[:n][keep] for h in h_exits + [h_full]], y[:n][keep]

    m = heldout_metrics(bm.model.output, batches(), args.chunk_size, ctx=ctx,
                        all_reduce=dist.all_reduce if world_size > 1 else None)
    return m["kl"], m["top1"], m["ppl"]


def get_lr(step: int, max_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup, then cosine decay to max_lr / 10 at max_steps (nanoGPT's schedule)."""
    min_lr = max_lr / 10
    if step < warmup_steps:
        return max_lr * (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


CPUINFO = Path("/proc/cpuinfo")


def native_bf16(device) -> bool:
    """Whether the device multiplies bf16 natively: CUDA, or a CPU with AVX512-BF16 or AMX (the flags Linux lists in
    /proc/cpuinfo; about twice its fp32 rate on the head's products). Other CPUs emulate bf16, slower than fp32."""
    if device.type == "cuda":
        return True
    try:
        flags = set(CPUINFO.read_text().split())
    except OSError:  # not Linux
        return False
    return device.type == "cpu" and bool(flags & {"avx512_bf16", "amx_bf16"})


def train_dtype(device) -> str:
    """--dtype's default for training: bf16 where it is native (the exits' master weights and the loss's softmax and
    KL stay fp32 anyway), fp32 elsewhere."""
    return "bfloat16" if native_bf16(device) else default_dtype(device)


# ------------------------------------------------------------------------------------ Table 4: from scratch
# Shapes for --from-scratch. A training-only table, not model.py's PRESETS (the shapes of released checkpoints, each
# with its own vocabulary): a new model takes its vocabulary from the tokenizer it is trained with (--tokenizer).
SCRATCH_PRESETS = {
    # two CPU cores: the paper's 16 layers (exits 4, 8, 12), narrow enough to learn the Shakespeare plays in minutes
    "tiny-16": dict(dim=96, n_layers=16, n_heads=4, n_kv_heads=2, hidden_dim=256, max_seq_len=512,
                    tie_embeddings=True),
    # the paper's LLM-1B (section 4.1): LLaMA-3.2-1B's shape, pretrained at 2048 tokens, for a GPU
    "llm-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192, rope_theta=500000.0,
                   max_seq_len=2048, tie_embeddings=True),
}


def scratch_model(preset: str, vocab_size: int) -> Transformer:
    """A randomly initialised model of a SCRATCH_PRESETS shape (seed first), in fp32: every weight trains."""
    return Transformer(ModelArgs(**SCRATCH_PRESETS[preset], vocab_size=vocab_size))


def resolve_mode(args) -> list:
    """The exit layers, after filling in the defaults that depend on the mode (--loss: ce when every weight trains
    on every submodel, else Eq. 2's kl; --init: random from scratch, else the last layer) and refusing, in one line
    each, the combinations that mean nothing."""
    scratch, none = args.from_scratch is not None, args.balcony == "none"
    if scratch and args.from_scratch not in SCRATCH_PRESETS:
        raise UsageError(f"unknown --from-scratch preset {args.from_scratch!r}; known: {', '.join(SCRATCH_PRESETS)}")
    if scratch and args.train_backbone:
        raise UsageError("--from-scratch already trains every weight; drop --train-backbone")
    if scratch and args.fsdp:
        raise UsageError("--fsdp shards a frozen backbone; --from-scratch trains every weight: use plain torchrun")
    if args.tokenizer and not scratch:
        raise UsageError("--tokenizer chooses a new model's vocabulary (--from-scratch); a checkpoint keeps its own")
    if none and not (scratch or args.train_backbone):
        raise UsageError("--balcony none adds no layer, so on a frozen backbone nothing would train (its exits are "
                         "the 'no balcony' row train.py prints); add --train-backbone (Sorted fine-tuning) or "
                         "--from-scratch PRESET (Sorted pretraining)")
    args.loss = args.loss or ("ce" if scratch or none else "kl")
    if args.loss == "ce" and not (scratch or args.train_backbone):
        raise UsageError("--loss ce (the mean CE over submodels) trains every weight: add --train-backbone or "
                         "--from-scratch; for CE on frozen balconies use --loss kl+ce --kl-weight 0")
    if scratch and args.loss != "ce":
        raise UsageError(f"--from-scratch has no trained full model to distil from: it trains on the mean CE over "
                         f"submodels (section 4.3), not --loss {args.loss}; drop --loss")
    if args.loss == "kl" and args.kl_weight == 0:
        raise UsageError("--kl-weight 0 with --loss kl leaves nothing to train")
    args.init = args.init or ("random" if scratch else "last")
    if scratch and args.init == "last":
        raise UsageError("--from-scratch balconies start random, as the backbone does (section 4.3); drop --init last")
    if args.exit_layers == "none":  # full depth alone: plain pretraining, or (--train-backbone) more of it
        if args.loss != "ce":
            raise UsageError("--exit-layers none leaves no exit to train; with --from-scratch (or --train-backbone "
                             "--loss ce) it is plain (continued) pretraining")
        return []
    try:
        return [int(k) for k in args.exit_layers.split(",")]
    except ValueError:
        raise UsageError(f"--exit-layers {args.exit_layers!r} is not a comma-separated list of layers") from None


def submodel_table(exit_layers, metrics) -> str:
    """--from-scratch's result: held-out perplexity of each submodel and its top-1 agreement with full depth."""
    names = [*map(str, exit_layers), "full"]
    rows = ["| submodel | perplexity | top-1 agreement with full depth |", "|---|---|---|"]
    rows += [f"| {k} | {metrics[2][j]:.1f} | {metrics[1][j]:.1%} |" for j, k in enumerate(names)]
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------- training state
def run_config(args, global_batch: int, data_key: str) -> dict:
    """What a resumed run must share with the saved one to continue exactly (the data position is the step).
    --max-steps may grow: the learning rate then follows the new schedule from the resumed step on."""
    keys = ("seq_len", "lr", "warmup_steps", "weight_decay", "grad_clip", "init", "balcony", "loss", "kl_weight",
            "ce_weight", "train_backbone", "from_scratch", "seed", "dtype", "loss_on")
    quant = {"quantize": quant_kwargs(args)} if args.quantize != "none" else {}  # float runs keep old configs
    return {**{k: getattr(args, k) for k in keys}, "global_batch": global_batch, "data": data_key, "format": FORMAT,
            **quant}


def save_state(path: Path, bm, opt, step: int, fingerprint: str, config: dict):
    state = {"exits": bm.exits.state_dict(), "optimizer": opt.state_dict(), "step": step,
             "rng": torch.get_rng_state(), "fingerprint": fingerprint, "exit_layers": bm.exit_layers, "config": config,
             "backbone": bm.model.state_dict() if bm.train_backbone else None}
    atomic_write(path, lambda tmp: torch.save(state, tmp))  # a crash mid-write never leaves a half-written state


def load_state(path: Path, fingerprint: str, exit_layers: list, config: dict) -> dict:
    """A saved state, refused (one line) if unreadable or saved for another model, other exits or settings."""
    if not path.is_file():
        raise UsageError(f"{path} not found; nothing to resume (train without --resume)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load fails in many ways on a damaged file; they all mean the same to the user
        raise UsageError(f"{path} is not a readable training state ({type(e).__name__}); delete it and train "
                         f"without --resume") from None
    if not isinstance(state, dict) or not {"fingerprint", "exit_layers", "config"} <= set(state):
        raise UsageError(f"{path} is not a train.py training state")
    if state["fingerprint"] != fingerprint:
        raise UsageError(f"{path} was saved for another base model (fingerprint {state['fingerprint']}, this "
                         f"checkpoint's is {fingerprint})")
    if state["config"].get("format") != config["format"]:  # states from before the format was recorded: 2
        raise UsageError(f"{path} was saved by an older train.py (token format {state['config'].get('format', 2)}, "
                         f"now {config['format']}: chats train on their answers alone), so it cannot continue exactly; "
                         f"train without --resume")
    if state["exit_layers"] != exit_layers:
        raise UsageError(f"{path} trains exits {state['exit_layers']}, not --exit-layers {exit_layers}")
    diff = [f"{k} {state['config'].get(k)!r} -> {v!r}" for k, v in config.items() if state["config"].get(k) != v]
    if diff:
        raise UsageError(f"{path} was saved with other settings, so resuming would not continue exactly: "
                         + ", ".join(diff))
    return state


def save_checkpoint(model: Transformer, src: Path, out: Path):
    """--train-backbone: the trained model as a converted-checkpoint folder (convert_hf.py's layout, the tokenizer
    files copied from src), so that generate.py and eval.py take it as --checkpoint."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.checkpoint_state_dict().items()}
    atomic_write(out / "model.safetensors", lambda p: save_file(sd, str(p), metadata={"format": "pt"}))
    for f in TOKENIZER_FILES:
        if (src / f).is_file():
            atomic_write(out / f, lambda p: shutil.copyfile(src / f, p))
    atomic_write(out / "config.json", lambda p: p.write_text(model.args.to_json()))


def open_log(path: Path, resume_step=None):
    """The JSONL log, for appending. A new run starts it afresh; a resumed one first drops the lines after its
    state's step (written after that state was saved, they are about to be written again), so no step appears twice."""
    if resume_step is None or not path.exists():
        return open(path, "w")
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
    atomic_write(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))
    return open(path, "a")


# ------------------------------------------------------------------------------------------------- multi-process
def wrap_loss(loss_fn: nn.Module, device, ddp: bool, compile: bool) -> nn.Module:
    """DDP first, then torch.compile around it, as PyTorch's DDP notes ask: compiling the DDP module lets dynamo split
    the graph at DDP's gradient buckets, so all-reduces overlap the backward (DDP around a compiled module cannot)."""
    if ddp:
        loss_fn = wrap_ddp(loss_fn, device)
    return torch.compile(loss_fn, dynamic=False) if compile else loss_fn  # compiles on the first step


def wrap_ddp(loss_fn: nn.Module, device) -> DDP:
    """DDP over the trainable exits alone. It would otherwise broadcast every parameter and buffer from rank 0 at
    start-up, the whole frozen backbone included (16 GB for Llama-3-8B), though every rank loaded the same weights."""
    frozen = [n for n, p in loss_fn.named_parameters(remove_duplicate=False) if not p.requires_grad]
    frozen += [n for n, _ in loss_fn.named_buffers(remove_duplicate=False)]
    DDP._set_params_and_buffers_to_ignore_for_model(loss_fn, frozen)
    return DDP(loss_fn, device_ids=[device.index] if device.type == "cuda" else None)


def shard_backbone(bm: BalconyModel, device, world_size: int):
    """--fsdp: FSDP2 shards each frozen backbone layer across the ranks; a layer's forward all-gathers it and frees
    the gathered copy right after. The embeddings, final norm, head and the exits stay whole on every rank.
    The layers first, then bm as the root, entered through run_layers (every backbone pass goes through it): one
    root sets up all the layers' states and streams together, and each layer prefetches the next one's all-gather,
    which then runs while this layer computes. Each layer its own root (nothing above them) ran one layer at a time,
    gather then compute."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (world_size,))
    layers = set(bm.model.layers.parameters())
    for layer in bm.model.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)  # moves the shard to the mesh's device
    fully_shard(bm, mesh=mesh, ignored_params={p for p in bm.parameters() if p not in layers})
    register_fsdp_forward_method(bm, "run_layers")
    for layer, after in zip(bm.model.layers, bm.model.layers[1:]):
        layer.set_modules_to_forward_prefetch([after])
    bm.exits.to(device)
    for name, child in bm.model.named_children():
        if name != "layers":
            child.to(device)
    bm.model.inv_freq = bm.model.inv_freq.to(device)


STOP = []  # signals received; the loop finishes the step in flight, saves the state and exits, so resuming is exact


def _request_stop(signum, frame):
    STOP.append(signum)
    signal.signal(signum, signal.SIG_DFL)  # a second Ctrl-C stops at once


def stop_requested(ddp: bool, device) -> bool:
    flag = torch.tensor(float(bool(STOP)), device=device)
    if ddp:  # torchrun signals every rank, but they must agree on the step to stop at
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() > 0


def metrics_by_exit(exit_layers, metrics) -> dict:
    """evaluate()'s lists as {"val_kl": {"15": .., "full": ..}, ...} for the JSONL log."""
    names = [*map(str, exit_layers), "full"]
    return {key: dict(zip(names, vals)) for key, vals in zip(("val_kl", "val_top1", "val_ppl"), metrics)}


def exit_table(exit_layers, baseline, trained, backbone_trained=False) -> str:
    """Held-out quality per exit, without and with its balcony, and the full model's for reference."""
    rows = ["| exit | val KL, no balcony -> balcony | top-1 agreement | perplexity |", "|---|---|---|---|"]
    rows += [f"| {k} | {baseline[0][j]:.3f} -> {trained[0][j]:.3f} | {baseline[1][j]:.1%} -> {trained[1][j]:.1%} "
             f"| {baseline[2][j]:.1f} -> {trained[2][j]:.1f} |" for j, k in enumerate(exit_layers)]
    full = f"{baseline[2][-1]:.1f} -> {trained[2][-1]:.1f} (the backbone trained)" if backbone_trained else \
        f"{trained[2][-1]:.1f}"
    rows.append(f"| full | 0 | 100% | {full} |")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------------------- main
def main(args) -> int:
    ddp = "RANK" in os.environ  # launched by torchrun
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world_size = dist.get_rank(), dist.get_world_size()
        device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if torch.cuda.is_available() else "cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    else:
        rank, world_size, device = 0, 1, torch.device(args.device)
    code = train(args, rank, world_size, device)  # on an error torchrun ends the other ranks: no teardown to hang in
    if ddp:
        dist.barrier()
        # FSDP's modules sit in reference cycles that hold gloo work handles: freed at interpreter exit, after the
        # process group, they abort the process ("terminate called without an active exception"). Free them first.
        gc.collect()
        dist.destroy_process_group()
    return code


def train(args, rank: int, world_size: int, device) -> int:
    master, ddp = rank == 0, world_size > 1
    say = tqdm.write if master else (lambda *a: None)
    ckpt = Path(args.checkpoint)
    exit_layers = resolve_mode(args)
    new_model = args.train_backbone or args.from_scratch  # a whole checkpoint folder is written
    if new_model and (not args.out or Path(args.out).resolve() == ckpt.resolve()):
        raise UsageError(f"{'--from-scratch' if args.from_scratch else '--train-backbone'} changes the model, so it "
                         f"writes a new checkpoint folder with its exits: name one with --out, e.g. --out "
                         f"checkpoints/unfrozen")
    out = Path(args.out) if args.out else ckpt / "balcony.safetensors"
    exits_path = out / "balcony.safetensors" if new_model else out  # where generate.py and eval.py look
    state_path, log_path = exits_path.with_suffix(".state.pt"), exits_path.with_suffix(".log.jsonl")
    if args.fsdp and not dist.is_initialized():
        raise UsageError("--fsdp shards the backbone across processes; launch with torchrun --nproc_per_node N")
    chosen = args.dtype is None
    args.dtype = args.dtype or ("float32" if args.train_backbone else train_dtype(device))
    dtype = DTYPES[args.dtype]
    if args.train_backbone and (ddp or dtype != torch.float32):  # (--from-scratch keeps fp32 weights, autocasts)
        raise UsageError("--train-backbone (the unfrozen ablation) trains in one process with an fp32 backbone: drop "
                         "torchrun and --fsdp, and pass --dtype float32")
    if args.quantize != "none" and (new_model or args.loss == "ce" or args.fsdp):
        raise UsageError(f"--quantize {args.quantize} quantises the frozen backbone: it cannot train "
                         "(--train-backbone, --from-scratch, --loss ce) or be sharded (--fsdp)")
    torch.manual_seed(args.seed)  # the same random exits on every rank (--init random)
    # the frozen backbone and head are stored in --dtype once (no per-step casts); with --fsdp each rank reads them
    # into CPU memory and keeps only its shard of every layer on the device
    tok_dir = Path(args.tokenizer) if args.tokenizer else ckpt  # the tokenizer files a new checkpoint copies
    if args.from_scratch:
        model = scratch_model(args.from_scratch, Tokenizer.from_checkpoint(tok_dir).vocab_size).to(device)
    else:
        model = Transformer.from_checkpoint(ckpt, device="cpu" if args.fsdp else device, dtype=dtype)
    bm = BalconyModel(model, exit_layers, init=args.init, kind=args.balcony, train_backbone=bool(new_model))
    bm.exits.float()  # the exits' master weights, and so AdamW's state, stay fp32 whatever --dtype is
    if args.loss == "ce":
        bm.requires_grad_(True)  # every weight learns, on every submodel's loss
    if args.seq_len > bm.model.args.max_seq_len:
        raise UsageError(f"--seq-len {args.seq_len} exceeds the model's context of {bm.model.args.max_seq_len}")
    fingerprint = model_fingerprint(bm.model)  # of the float weights: the exits load onto any --quantize
    # the backbone's layers as they will decode (the teacher's too); the head stays float: the loss's gradient
    # multiplies by its weight
    quantize_checkpoint(bm.model, ckpt, **dict(quant_kwargs(args), head="none"))
    if args.fsdp:
        shard_backbone(bm, device, world_size)

    # rank 0 tokenises (or finds the cache); the others wait for it on disk, which may take hours on a big corpus:
    # longer than a collective's timeout
    files, tokenizer = data_files(args.data), Tokenizer.from_checkpoint(tok_dir)
    folder = tokenize_corpus(files, tokenizer, args.val_files, args.cache_dir, args.val_fraction, args.num_proc,
                             wait=not master)
    train_tokens, val_tokens = open_tokens(folder, "train"), open_tokens(folder, "val")
    train_mask, val_mask = open_mask(folder, "train"), open_mask(folder, "val")  # None: plain text, every token
    if args.loss_on == "all" or args.loss == "ce":  # the ablation, or --from-scratch's next-token loss: every token
        train_mask = None
    global_batch = args.batch_size * args.grad_accum * world_size  # windows per optimiser step
    n_train = n_windows(train_tokens, args.seq_len)
    if n_train < global_batch or n_windows(val_tokens, args.seq_len) < 1:
        raise UsageError(f"--data has {len(train_tokens)} training and {len(val_tokens)} validation tokens: too few "
                         f"for a global batch of {global_batch} x {args.seq_len} and one validation window")

    # the exits only, unless --train-backbone (then also the backbone up to the last exit and the head)
    params = [p for p in bm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay,
                            fused=device.type == "cuda")
    # autocast runs the exits in --dtype (the frozen weights already are); the loss's softmax and KL stay fp32
    ctx = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    # the original model's; a new one's random start is no baseline
    baseline = None if args.from_scratch else evaluate(bm, val_tokens, args, ctx, rank, world_size, True, val_mask)
    config, step = run_config(args, global_batch, folder.name), 0
    if args.resume:
        state = load_state(state_path, fingerprint, bm.exit_layers, config)
        if state["step"] > args.max_steps:
            raise UsageError(f"{state_path} is at step {state['step']}, past --max-steps {args.max_steps}; to train "
                             f"on, resume with a larger --max-steps")
        bm.exits.load_state_dict(state["exits"])
        if bm.train_backbone:
            bm.model.load_state_dict(state["backbone"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        step = state["step"]

    if args.loss == "ce":
        loss_fn = SubmodelLoss(bm, args.chunk_size)
    else:
        loss_fn = ExitLoss(bm, args.chunk_size, args.ce_weight if args.loss == "kl+ce" else 0.0, args.kl_weight,
                           masked=train_mask is not None)
    loss_fn = wrap_loss(loss_fn, device, ddp, device.type == "cuda" if args.compile is None else args.compile)

    exits_path.parent.mkdir(parents=True, exist_ok=True)
    log = open_log(log_path, step if args.resume else None) if master else None

    def record(obj):
        if log:
            log.write(json.dumps(obj) + "\n")
            log.flush()

    say(f"{sum(p.numel() for p in params):,} trainable parameters in exits {bm.exit_layers}"
        f"{' and the backbone' if bm.train_backbone else ''} ({args.balcony} balconies, --loss {args.loss}); "
        f"{n_train} training windows of {args.seq_len} tokens, {global_batch} per step; from step {step}")
    say(f"backbone and head in {args.dtype}" + (f" (the default on this {device.type}; --dtype to change)" if chosen
                                                 else "") + ", the exits' weights and the softmax and KL in float32")
    say(f"the loss on the chats' assistant answers: {int(train_mask[1:].sum()):,} of {len(train_tokens) - 1:,} "
        f"training targets" if train_mask is not None else "the loss on every token" +
        (" (--loss-on all)" if val_mask is not None else " (plain text)"))
    if baseline is not None:
        if not args.resume:  # a resumed run's log already has it
            record({"step": step, "eval": "no_balcony", **metrics_by_exit(exit_layers, baseline)})
        say("no balcony (final norm + head on layer-k states): val KL " +
            ", ".join(f"{k}: {v:.3f}" for k, v in zip(bm.exit_layers, baseline[0])))

    STOP.clear()
    handlers = {s: signal.signal(s, _request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    bar = tqdm(total=args.max_steps, initial=step, desc="train", disable=not master, dynamic_ncols=True)
    t_start, start_step, first_step_s, final = time.time(), step, 0.0, None
    try:
        while step < args.max_steps:
            t0 = time.time()
            lr = get_lr(step, args.lr, args.warmup_steps, args.max_steps)
            for group in opt.param_groups:
                group["lr"] = lr
            windows = step_windows(step, n_train, global_batch, args.seed)
            # per exit (and full depth, --loss ce): KL, CE, averaged over the step
            stats = torch.zeros(2, len(exit_layers) + 1, device=device)
            for micro in range(args.grad_accum):
                first = (micro * world_size + rank) * args.batch_size  # this rank's slice of the global batch
                x, y = get_batch(train_tokens, windows[first:first + args.batch_size], args.seq_len, device, train_mask)
                # DDP averages gradients across ranks on the last micro-step only
                sync = loss_fn.no_sync() if ddp and micro < args.grad_accum - 1 else contextlib.nullcontext()
                with sync:
                    with ctx:
                        loss, kl, ce = loss_fn(x, y)
                    (loss / args.grad_accum).backward()
                if kl is not None:
                    stats[0, :len(kl)] += kl / args.grad_accum
                if ce is not None:
                    stats[1, :len(ce)] += ce / args.grad_accum
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if ddp:
                dist.all_reduce(stats)
                stats /= world_size
            dt = time.time() - t0
            first_step_s = first_step_s or dt
            kl = stats[0, :len(exit_layers)].tolist()
            tok_s = global_batch * args.seq_len / dt
            bar.update()
            shown = zip([*exit_layers, "full"], stats[1].tolist()) if args.loss == "ce" else zip(exit_layers, kl)
            bar.set_postfix_str(" ".join(f"{args.loss}{k}={v:.3f}" for k, v in shown) + f" tok/s={tok_s:.0f}")
            entry = {"step": step, "lr": lr, "grad_norm": grad_norm.item(), "tokens_per_s": tok_s, "dt": dt}
            if args.loss == "ce":  # per exit, then full depth
                record({**entry, "ce": stats[1].tolist()})
            else:
                record({**entry, "kl": kl, **({"ce": stats[1, :-1].tolist()} if args.loss == "kl+ce" else {})})
            if step % args.eval_every == 0 or step == args.max_steps:
                final = evaluate(bm, val_tokens, args, ctx, rank, world_size, mask=val_mask)
                record({"step": step, "eval": "balcony", **metrics_by_exit(exit_layers, final)})
                say(f"step {step}: val KL " + ", ".join(f"{k}: {v:.3f}" for k, v in zip(exit_layers, final[0])))
            stop = step < args.max_steps and stop_requested(ddp, device)  # a collective: every rank asks
            if master and (stop or step % args.save_every == 0 or step == args.max_steps):
                save_state(state_path, bm, opt, step, fingerprint, config)  # the last step too: resume trains on
            if stop:
                say(f"stopped at step {step}; state saved to {state_path}; continue with --resume")
                return 130
    finally:
        bar.close()
        for s, h in handlers.items():
            signal.signal(s, h)
        if log:
            log.close()
    if final is None:  # resumed at the last step (killed after its state was saved, before the exits were)
        final = evaluate(bm, val_tokens, args, ctx, rank, world_size, mask=val_mask)
    if master:
        if bm.train_backbone:
            save_checkpoint(bm.model, tok_dir, out)
        bm.save_exits(exits_path, None if bm.train_backbone else fingerprint)  # last: the saved backbone's
        saved = f"exits saved to {out}"
        if bm.train_backbone:
            saved = f"checkpoint and {saved}" + ("" if args.from_scratch else " (full depth is no longer the original "
                                                                           "model)")
        say(f"{args.max_steps - start_step} steps in {time.time() - t_start:.0f} s (first step {first_step_s:.1f} s, "
            f"includes any compile); {saved}")
        say(submodel_table(exit_layers, final) if baseline is None else
            exit_table(exit_layers, baseline, final, bm.train_backbone))
    return 0


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = " (default: %(default)s)"
    p.add_argument("--exit-layers", required=True, help="comma-separated layers to put balconies after, e.g. 15,18,21 "
                   "(none: with --loss ce, full depth alone: plain pretraining)")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="converted model folder" + d)
    p.add_argument("--out", default=None, help="trained exits (default: <checkpoint>/balcony.safetensors), or with "
                   "--train-backbone a new checkpoint folder holding them; the "
                   "training state and JSONL log go next to it as .state.pt and .log.jsonl")
    add_data_args(p)  # --data, --val-files, --val-fraction, --cache-dir, --num-proc
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window" + d)
    p.add_argument("--batch-size", type=int, default=2, help="windows per micro-batch per process" + d)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step" + d)
    p.add_argument("--max-steps", type=int, default=300, help="optimiser steps (300: 1.6 epochs of data/chat)" + d)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (paper: 5e-4)" + d)
    p.add_argument("--warmup-steps", type=int, default=10, help="linear warmup, then cosine to lr/10" + d)
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay" + d)
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm" + d)
    p.add_argument("--init", choices=["last", "random"], default=None, help="balcony init: copy of the last "
                   "layer (paper; the default) or random (the default, and the only choice, with --from-scratch)")
    p.add_argument("--balcony", choices=[*KINDS, "none"], default="block", help="each balcony's layer: a full "
                   "decoder block (paper), only its MLP or attention half (section 4.3's ablation), or none: the "
                   "layer-k state through the final norm and shared head (Sorted's and LayerSkip's exit)" + d)
    p.add_argument("--loss", choices=["kl", "kl+ce", "ce"], default=None, help="kl: Eq. 2 (the default); kl+ce adds "
                   "each exit's next-token cross-entropy; ce: the mean cross-entropy over all submodels, exits and "
                   "full depth, every weight training (the default, and the only choice, with --from-scratch or "
                   "--balcony none)")
    p.add_argument("--from-scratch", metavar="PRESET", default=None, help="Table 4's pretraining: a randomly "
                   f"initialised model of this shape ({', '.join(SCRATCH_PRESETS)}) trained with its balconies on "
                   "--loss ce; --out is the new checkpoint folder, its vocabulary --tokenizer's")
    p.add_argument("--tokenizer", default=None, help="with --from-scratch: a folder with the tokenizer.json to use "
                   "(pretrain_table.py trains one; default: --checkpoint's)")
    p.add_argument("--kl-weight", type=float, default=1.0, help="weight of the KL term; the paper's CE ablation is "
                   "--loss kl+ce --kl-weight 0.001 --ce-weight 1" + d)
    p.add_argument("--ce-weight", type=float, default=1.0, help="weight of the CE term with --loss kl+ce" + d)
    p.add_argument("--train-backbone", action="store_true", help="section 4.3's unfrozen ablation: the backbone "
                   "(up to the last exit) and the head train with the exits on the same loss, the teacher being the "
                   "current full model, detached; --out is then a new checkpoint folder whose full depth is no "
                   "longer the original model")
    p.add_argument("--loss-on", choices=["answers", "all"], default="answers", help="answers: on chats, only the "
                   "positions that predict an assistant turn's tokens (plain text: every token); all: every token "
                   "(validation stays on the answers)" + d)
    p.add_argument("--chunk-size", type=int, default=256, help="tokens whose logits exist at once in the loss" + d)
    p.add_argument("--eval-every", type=int, default=30, help="validate every N steps, and at the end" + d)
    p.add_argument("--eval-windows", type=int, default=16, help="validation windows per evaluation" + d)
    p.add_argument("--save-every", type=int, default=50, help="write the training state every N steps" + d)
    p.add_argument("--resume", action="store_true", help="continue from the training state next to --out")
    p.add_argument("--seed", type=int, default=1337, help="exit init and data order" + d)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the training step (default: on with CUDA)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="the frozen backbone and head (default: "
                   "bfloat16 on CUDA and on CPUs with AVX512-BF16 or AMX, else float32; float32 with "
                   "--train-backbone); the exits' weights and optimiser state, the softmax and the KL stay float32")
    add_quantize_args(p)
    p.add_argument("--fsdp", action="store_true", help="with torchrun: shard the frozen backbone across processes "
                   "(FSDP2), for backbones too big for one GPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="without torchrun" + d)
    return p


def parse_args(argv=None):
    p = get_parser()
    args = p.parse_args(argv)
    for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "chunk_size", "eval_every", "eval_windows",
                 "save_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.kl_weight < 0 or args.ce_weight < 0:
        p.error("--kl-weight and --ce-weight must be at least 0")
    return args


if __name__ == "__main__":
    run_cli(main, parse_args)

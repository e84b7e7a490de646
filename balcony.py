"""
Balcony exits (Jamialahmadi et al., EMNLP 2025, section 3) wrapped around a frozen model.py Transformer.

Exit k runs backbone layers 1..k, then its balcony: one decoder block of the base architecture and an RMSNorm
(Eq. 1), then the base model's shared, frozen LM head. Balconies are trained alone with the self-distillation loss
sum_j KL(p_full || p_exit_j) (Eq. 2, `distillation_kl` below); the backbone never changes, so full depth is exactly
the original model.
"""
import contextlib
import hashlib
import json
import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import UsageError, atomic_write
from model import Attention, FeedForward, ModelArgs, RMSNorm, Transformer, TransformerBlock, ensure_cache


class AttentionOnly(nn.Module):
    """The attention half of a decoder block: its RMSNorm, attention and residual (section 4.3's ablation)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, input_pos=None):
        return x + self.attention(self.attention_norm(x), cos, sin, input_pos)


class MLPOnly(nn.Module):
    """The feed-forward half of a decoder block: its RMSNorm, SwiGLU and residual. Each token on its own: no KV
    cache, and no use for the RoPE tables it is handed."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.feed_forward = FeedForward(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, input_pos=None):
        return x + self.feed_forward(self.ffn_norm(x))


# What a balcony's layer is (train.py --balcony): the paper's full decoder block, or one half of it (section 4.3,
# Figure 5, left). The halves keep the block's parameter names, so "init from the last layer" copies matching parts.
KINDS = {"block": TransformerBlock, "mlp": MLPOnly, "attn": AttentionOnly}


class SharedNormExit(nn.Module):
    """train.py --balcony none: an exit with no layer of its own, Sorted's (SortedLLaMA) and LayerSkip's: the layer-k
    hidden state through the base model's final norm, then the shared head. The norm is the model's, held in a
    tuple so that it is neither registered twice nor saved with the exits: such an exit has no weights."""

    def __init__(self, norm: RMSNorm):
        super().__init__()
        self.shared = (norm,)

    def forward(self, x, cos, sin, input_pos=None):
        return self.shared[0](x)


class BalconyExit(nn.Module):
    """Eq. 1: X'_j = f_b(X_j, W'_j), a decoder block (or, to ablate, half of one) followed by an RMSNorm."""

    def __init__(self, args: ModelArgs, kind: str = "block"):
        super().__init__()
        self.layer = KINDS[kind](args)
        self.norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, input_pos=None):
        return self.norm(self.layer(x, cos, sin, input_pos))


def _log_softmax(z):
    return z.to(torch.promote_types(z.dtype, torch.float32)).log_softmax(-1)  # in fp32 (fp64 stays fp64)


def _log_probs(output_weight, h):
    return _log_softmax(F.linear(h, output_weight))  # (N, D) -> (N, vocab)


def _kl(teacher, student):
    return (teacher.exp() * (teacher - student)).sum()  # sum over tokens of KL(p || q), from log-probs


def distillation_kl_reference(output_weight, h_full, h_exits):
    """Eq. 2 as written, per exit: KL(p_full || p_exit) summed over tokens, shape (n_exits,). It makes every exit's
    full (tokens, vocab) logits and lets autograd differentiate them: the form to read and to test against."""
    teacher = _log_probs(output_weight, h_full.flatten(0, -2)).detach()  # a target: no gradient through p_full
    return torch.stack([F.kl_div(_log_probs(output_weight, h.flatten(0, -2)), teacher, log_target=True,
                                 reduction="sum") for h in h_exits])


class FusedDistillationKL(torch.autograd.Function):
    """Eq. 2 in chunks of tokens with its backward done in the forward pass (the fused linear cross-entropy of
    Liger-Kernel and Cut Cross-Entropy, applied to KL). For logits z = h W^T of an exit, q = softmax(z) and the
    teacher's p, d KL(p || q) / d z = q - p, so d KL / d h = (q - p) W: each chunk's logits are made, used for the
    KL and that gradient, and dropped. The frozen head W gets no gradient; nothing is recomputed in backward."""

    @staticmethod
    def forward(ctx, chunk_size, need_grad, weight, h_full, *h_exits):
        D, acc = weight.size(1), torch.promote_types(weight.dtype, torch.float32)  # softmax and KL in >= fp32
        grads = [torch.empty_like(h, memory_format=torch.contiguous_format) for h in h_exits] if need_grad else []
        h_full, h_exits = h_full.reshape(-1, D), [h.reshape(-1, D) for h in h_exits]
        kl = torch.zeros(len(h_exits), dtype=acc, device=weight.device)
        # the head's matmuls run in the head's own dtype (train.py --dtype), autocast or not
        with torch.autocast(weight.device.type, enabled=False):
            for s in range(0, h_full.size(0), chunk_size):
                logp = F.linear(h_full[s:s + chunk_size].to(weight.dtype), weight).to(acc).log_softmax(-1)  # (c, V)
                p = logp.exp()
                for j, h in enumerate(h_exits):
                    logq = F.linear(h[s:s + chunk_size].to(weight.dtype), weight).to(acc).log_softmax(-1)
                    # one dot product with the difference: sum p log p - sum p log q would subtract two sums of
                    # about entropy x tokens each, and lose the digits of a small KL
                    kl[j] += torch.dot(p.view(-1), (logp - logq).view(-1))  # sum p (log p - log q)
                    if need_grad:
                        dz = logq.exp_().sub_(p)  # q - p, in place
                        grads[j].view(-1, D)[s:s + chunk_size] = dz.to(weight.dtype) @ weight  # (c, D)
        ctx.save_for_backward(*grads)
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        grads = [g * grad_kl[j].to(g.dtype) for j, g in enumerate(ctx.saved_tensors)]
        return None, None, None, None, *grads


def distillation_kl(output: nn.Linear, h_full, h_exits, chunk_size: int = 256):
    """Eq. 2, per exit: KL(p_full || p_exit) summed over tokens, as a tensor of shape (n_exits,), equal to
    distillation_kl_reference. h_full, h_exits[j]: (B, T, D) normalised hidden states; no logits tensor larger than
    (chunk_size, vocab) ever exists, and the gradient reaches h_exits (never the frozen head or h_full)."""
    need_grad = torch.is_grad_enabled() and any(h.requires_grad for h in h_exits)
    return FusedDistillationKL.apply(chunk_size, need_grad, output.weight, h_full.detach(), *h_exits)


@torch.no_grad()
def exit_metrics(output: nn.Linear, h_full, hs, targets, chunk_size: int = 1024, teacher_output=None):
    """Held-out quality of each normalised hidden state in hs (an exit's, or h_full itself for full depth), summed
    over tokens: a (4, len(hs)) tensor of KL(p_full || p), top-1 agreement with the full model, the negative
    log-likelihood of targets (B, T), so exp(nll / tokens) is the perplexity, and top-1 hits on the targets
    themselves. Chunked like distillation_kl.
    teacher_output: h_full's own head when it is not `output` (ablate.py: a trained backbone against the original)."""
    D, teacher_output = h_full.size(-1), teacher_output or output  # modules: a quantised head (quantize.py) works
    h_full, hs, targets = h_full.reshape(-1, D), [h.reshape(-1, D) for h in hs], targets.reshape(-1, 1)
    sums = torch.zeros(4, len(hs), device=h_full.device)
    for s in range(0, h_full.size(0), chunk_size):
        teacher = _log_softmax(teacher_output(h_full[s:s + chunk_size]))
        for j, h in enumerate(hs):
            logp = _log_softmax(output(h[s:s + chunk_size]))
            sums[0, j] += _kl(teacher, logp)
            sums[1, j] += (logp.argmax(-1) == teacher.argmax(-1)).sum()
            sums[2, j] -= logp.gather(1, targets[s:s + chunk_size]).sum()
            sums[3, j] += (logp.argmax(-1, keepdim=True) == targets[s:s + chunk_size]).sum()
    return sums


@torch.no_grad()
def heldout_metrics(output: nn.Linear, batches, chunk_size: int = 1024, teacher_output=None, ctx=None,
                    all_reduce=None) -> dict:
    """exit_metrics per token over held-out batches, the one loop behind train.py's validation, eval.py's ppl and
    heldout_chat and ablate.py's scores. batches yields (h_full, hs, targets) as exit_metrics takes them; ctx: a
    context for the metrics (train.py's autocast); all_reduce: sums a tensor across ranks (train.py under DDP).
    Returns lists kl, top1, ppl, target_top1 (one value per state in hs) and the token count."""
    sums = None
    for h_full, hs, targets in batches:
        with ctx or contextlib.nullcontext():
            m = exit_metrics(output, h_full, hs, targets, chunk_size, teacher_output)
        m = torch.cat([m, torch.full_like(m[:1], targets.numel())])  # KL, top-1 hits, NLL, target hits, tokens
        sums = m if sums is None else sums + m
    if all_reduce is not None:
        all_reduce(sums)
    kl, top1, nll, target_top1 = (sums[:4] / sums[4]).tolist()
    return dict(kl=kl, top1=top1, ppl=[math.exp(v) for v in nll], target_top1=target_top1, tokens=int(sums[4, 0]))


class BalconyModel(nn.Module):
    """A base model with balconies of one `kind` (KINDS, or "none": SharedNormExit) at exit_layers. The backbone is
    frozen unless train_backbone: section 4.3's "unfrozen" ablation, where the backbone trains with the exits on the
    same loss, so full depth is no longer the original model."""

    def __init__(self, model: Transformer, exit_layers, init: str = "last", kind: str = "block",
                 train_backbone: bool = False):
        super().__init__()
        n = model.args.n_layers
        exit_layers = [int(k) for k in exit_layers]
        if len(set(exit_layers)) != len(exit_layers):
            raise UsageError(f"exit layers {exit_layers} contain a duplicate")
        bad = [k for k in exit_layers if not 1 <= k <= n - 1]
        if bad:
            raise UsageError(f"exit layer(s) {bad} outside 1..{n - 1} (the model has {n} layers)")
        if init not in ("last", "random"):
            raise UsageError(f"init must be 'last' or 'random', not {init!r}")
        if kind not in KINDS and kind != "none":
            raise UsageError(f"balcony kind must be one of {', '.join(KINDS)} or none, not {kind!r}")
        self.kind, self.train_backbone = kind, train_backbone
        self.model = model.requires_grad_(False)  # the paper: the backbone and the shared head stay frozen
        self.exit_layers = sorted(exit_layers)
        if train_backbone:  # all the loss reaches: the teacher is detached, so layers past the last exit and the final
            # norm get no gradient and stay as they are
            for m in [model.tok_embeddings, model.output, *model.layers[:max(self.exit_layers, default=0)]]:
                m.requires_grad_(True)
        self.exits = nn.ModuleDict({str(k): SharedNormExit(model.norm) if kind == "none" else
                                    BalconyExit(model.args, kind) for k in self.exit_layers})
        w = model.tok_embeddings.weight
        self.exits.to(device=w.device, dtype=w.dtype)
        last = model.layers[-1].state_dict()
        for ex in self.exits.values() if kind != "none" else ():
            if init == "last":
                # Section 3: start from the last decoder layer, already aligned with the LM head, and its final norm;
                # a half block takes that layer's matching half. (The authors' code copies layers[k].input_layernorm
                # into the exit norm instead.)
                ex.layer.load_state_dict({name: last[name] for name in ex.layer.state_dict()})
                ex.norm.load_state_dict(model.norm.state_dict())
            else:
                for name, p in ex.named_parameters():
                    if name.endswith("norm.weight"):
                        nn.init.ones_(p)
                    else:
                        nn.init.normal_(p, std=0.02)

    @property
    def n_layers(self) -> int:
        return self.model.args.n_layers

    def _check_exit(self, exit: Optional[int]) -> Optional[int]:
        if exit is None or exit == self.n_layers:
            return None
        if str(exit) not in self.exits:
            raise UsageError(f"exit {exit} has no trained balcony; trained exits: {self.exit_layers} "
                             f"(or {self.n_layers} for full depth)")
        return exit

    def setup_caches(self, max_batch_size: int, max_seq_len: int, exits=(None,)):
        """KV caches for what the exits in `exits` run (None: full depth): backbone layers 1..deepest and each
        exit's balcony, nothing deeper and no other balcony. Caches already big enough are reused
        (Transformer.setup_caches)."""
        exits = [self._check_exit(e) for e in exits]
        self.model.setup_caches(max_batch_size, max_seq_len, n_layers=max(e or self.n_layers for e in exits))
        for e in exits:
            if e is not None and self.kind not in ("mlp", "none"):  # no attention in the exit, nothing to cache
                att = self.exits[str(e)].layer.attention
                att.kv_cache = ensure_cache(att.kv_cache, self.model.args, max_batch_size, max_seq_len,
                                            self.model.tok_embeddings.weight)

    def run_layers(self, x, start: int, end: int, input_pos=None):
        """Backbone layers start+1..end (1-based, so (0, k) is layers 1..k) on hidden states x: (B, T, D)."""
        cos, sin = self.model.rope(x.size(1), input_pos)
        for layer in self.model.layers[start:end]:
            x = layer(x, cos, sin, input_pos)
        return x

    def exit_hidden(self, exit: Optional[int], x, input_pos=None):
        """Eq. 1 for exit `exit` on the layer-`exit` hidden states x: (B, T, D) -> normalised (B, T, D), ready for the
        shared head; at full depth (None or n_layers) the base model's final norm. With run_layers(x, 0, exit), the
        one way every caller runs exit k: layers 1..k, then this."""
        if exit is None or exit == self.n_layers:
            return self.model.norm(x)
        cos, sin = self.model.rope(x.size(1), input_pos)
        return self.exits[str(exit)](x, cos, sin, input_pos)

    def forward(self, idx, exit: Optional[int] = None, input_pos=None):
        """Logits (B, T, vocab) of exit `exit`; None (or n_layers) is the untouched base model."""
        exit = self._check_exit(exit)
        if exit is None:
            return self.model(idx, input_pos)
        x = self.run_layers(self.model.tok_embeddings(idx), 0, exit, input_pos)
        return self.model.output(self.exit_hidden(exit, x, input_pos))

    def backbone_taps(self, idx):
        """forward_train's backbone pass: the full model's final hidden states (normalised, before the head; the
        teacher, never with a gradient) and the layer-k hidden states of each exit k. Without autograd, unless
        train_backbone (then up to the last exit)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_backbone):
            x = self.model.tok_embeddings(idx)
            taps, prev = [], 0
            for k in self.exit_layers:
                x = self.run_layers(x, prev, k)
                taps.append(x)
                prev = k
        with torch.no_grad():
            h_full = self.model.norm(self.run_layers(x, prev, self.n_layers))
        return h_full, taps

    def forward_submodels(self, idx):
        """Every submodel's normalised final hidden states (B, T, D), each exit in exit_layers order then full depth,
        from one backbone pass with autograd all the way: the pass of section 4.3's pretraining from scratch and of
        Sorted fine-tuning, where every weight trains on every submodel's loss."""
        x, prev, hs = self.model.tok_embeddings(idx), 0, []
        for k in self.exit_layers:
            x, prev = self.run_layers(x, prev, k), k
            hs.append(self.exit_hidden(k, x))
        return hs + [self.model.norm(self.run_layers(x, prev, self.n_layers))]

    def forward_train(self, idx):
        """One backbone pass for training and evaluation: the full model's final hidden states (normalised, before
        the head) and every exit's, in exit_layers order; the exits keep their autograd."""
        h_full, taps = self.backbone_taps(idx)
        return h_full, [self.exit_hidden(k, t) for k, t in zip(self.exit_layers, taps)]

    # File I/O: the exit weights alone, tagged with the base model's fingerprint so they refuse other models.

    def save_exits(self, path, fingerprint: Optional[str] = None):
        """Write the exit weights alone (safetensors, atomically) with the exit layers, the balcony kind and the base's
        fingerprint (pass it when it was taken before the backbone was sharded)."""
        from safetensors.torch import save_file

        path = Path(path)
        meta = {"exit_layers": json.dumps(self.exit_layers), "balcony_kind": self.kind,
                "base_fingerprint": fingerprint or model_fingerprint(self.model),
                "model_args": self.model.args.to_json()}
        tensors = {f"exits.{k}": v.detach().contiguous().cpu() for k, v in self.exits.state_dict().items()}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    def load_exits(self, path):
        """Load exits written by save_exits; refuse exits trained on another base model, or of another kind."""
        meta, tensors = self.read_exits_file(path, tensors=True)
        if meta["base_fingerprint"] != model_fingerprint(self.model):
            raise UsageError(f"{path} was trained for another base model (fingerprint {meta['base_fingerprint']}, "
                             f"this model's is {model_fingerprint(self.model)}); train exits for this checkpoint")
        if meta["exit_layers"] != self.exit_layers:
            raise UsageError(f"{path} holds exits {meta['exit_layers']}, not {self.exit_layers}")
        if meta["kind"] != self.kind:
            raise UsageError(f"{path} holds {meta['kind']!r} balconies (train.py --balcony {meta['kind']}), not "
                             f"{self.kind!r} ones; load it with BalconyModel.from_exits_file, which reads the kind")
        w = self.model.tok_embeddings.weight
        sd = {k.removeprefix("exits."): v.to(device=w.device, dtype=w.dtype) for k, v in tensors.items()}
        self.exits.load_state_dict(sd)

    @staticmethod
    def read_exits_file(path, tensors: bool = False):
        """(metadata, tensors or None) of a file written by save_exits, with exit_layers as a list and the balcony
        kind as "kind"; a missing, unreadable or foreign file is one UsageError line."""
        from safetensors import SafetensorError, safe_open

        if not Path(path).is_file():
            raise UsageError(f"{path} not found; train exits first: python train.py --exit-layers 15,18,21")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                data = {k: f.get_tensor(k) for k in f.keys()} if tensors else None
        except (SafetensorError, OSError) as e:
            raise UsageError(f"{path} is not a readable balcony file ({e})") from None
        if not {"exit_layers", "base_fingerprint"} <= set(meta):
            raise UsageError(f"{path} has no balcony metadata; was it written by train.py?")
        # files written before the ablation kinds existed hold full blocks, the only kind there was
        meta = dict(meta, exit_layers=json.loads(meta["exit_layers"]), kind=meta.get("balcony_kind", "block"))
        return meta, data

    @classmethod
    def from_exits_file(cls, model: Transformer, exits_path) -> "BalconyModel":
        """Wrap a loaded base model with the exits of a file written by save_exits, of the kind it records."""
        meta, _ = cls.read_exits_file(exits_path)
        bm = cls(model, meta["exit_layers"], kind=meta["kind"])
        bm.load_exits(exits_path)
        return bm.eval()

    @classmethod
    def from_checkpoint(cls, checkpoint, balcony=None, exits=None, device="cpu", dtype=torch.float32,
                        labels=None) -> "BalconyModel":
        """How every script loads a model: the base model of `checkpoint` and the trained exits of `balcony` (default
        <checkpoint>/balcony.safetensors). exits: those the caller will run (None or n_layers: full depth; "auto":
        the cascade, which needs them all); the file is read only if one needs a balcony, and each must be in range and
        trained. exits=None: every exit in the file. labels[i], if given, says where exits[i] came from in an error."""
        path = Path(balcony) if balcony is not None else Path(checkpoint) / "balcony.safetensors"
        if exits is None:
            cls.read_exits_file(path)  # a missing or foreign file fails before the base model loads
        base = Transformer.from_checkpoint(checkpoint, device=device, dtype=dtype)
        n = base.args.n_layers
        exits = list(exits) if exits is not None else None
        layers = [(e, where) for e, where in zip(exits or [], labels or [None] * len(exits or []))
                  if isinstance(e, int)]  # the others are None (full depth) or the cascade
        for e, where in layers:
            if not 1 <= e <= n:
                at = f"{where}: " if where else ""
                raise UsageError(f"{at}exit {e} is outside 1..{n} (the model has {n} layers)")
        if exits is not None and all(e is None or e == n for e in exits):
            return cls(base, []).eval()
        model = cls.from_exits_file(base, path)
        for e, where in layers:
            try:
                model._check_exit(e)
            except UsageError as err:
                raise UsageError(f"{where}: {err}" if where else str(err)) from None
        return model


def model_fingerprint(model: Transformer) -> str:
    """A short hash of the base model's config and weights, stored with trained exits so they refuse other models.
    It samples 64 values of every tensor, rounded to bf16, so the same checkpoint loaded in fp32 or bf16 agrees."""
    h = hashlib.sha256(json.dumps(model.args.__dict__, sort_keys=True).encode())
    for name, t in sorted(model.checkpoint_state_dict().items()):
        flat = t.detach().reshape(-1)
        idx = torch.linspace(0, flat.numel() - 1, 64, dtype=torch.float64, device=flat.device).long()  # fp32 rounds past 2**24
        h.update(name.encode())
        h.update(flat[idx].to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    return h.hexdigest()[:16]

"""
Weight-only quantisation as a load-time transform (gpt-fast's quantize.py): load the plain model, then swap each
nn.Linear of the backbone, the balconies and the LM head for a module holding int4 or int8 weights. model.py and
balcony.py never learn that quantisation exists; the tied embedding table stays a plain nn.Embedding.

- int4, groupwise: w = (q - 8) * scale + zero for codes q in 0..15, one (scale, zero) per `group_size` inputs of a
  row. PyTorch's own kernels run it: `_weight_int4pack_mm_for_cpu` on CPU, `_weight_int4pack_mm` (tinygemm) on CUDA,
  both with bf16 activations, scales and zeros. Their packed weight layout depends on the machine (the CPU kernel's on
  its instruction set), so weights are packed at load, never saved: the packed tensors are non-persistent buffers.
- int8, per output channel: w = q * scale for q in -128..127, one scale per row, `_weight_int8pack_mm`.

The default model ships as a Q4_1 GGUF. Its blocks of 32 map onto the int4 kernel by value: Q4_1 stores
w = d * q + m, so scale = d and zero = m + 8 d; Q4_0 stores w = d * (q - 8), so zero = 0. convert_hf.py keeps the
blocks in model.q4.safetensors beside model.safetensors (the fp32 weights): for each of our weight names,
`<name>.qs` uint8 (out, in / 2) in GGUF's nibble order (byte j of a block holds element j in its low nibble and
element j + 16 in its high one), `<name>.d` float16 (out, in / 32) and, for Q4_1, `<name>.m` float16. Rows are in our
order (Q and K un-permuted; a row permutation keeps blocks whole). With int4 and group 32, quantize_checkpoint uses
those blocks, so the model decodes with the file's own weights (up to bf16 scales, see docs/quantization.md); every
other weight (the balconies, a tensor of another GGUF type, another group size) is quantised from its float weights
with min-max groups, as gpt-fast does.

The head (tied to the embedding, Q8_0 in the default GGUF) is quantised as `head` says: int4, int8 or bfloat16, or
kept as loaded ("none", the default: int8 and bf16 heads give bf16 logits, which flip near-ties; docs/quantization.md).
"""
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import QUANTIZE as MODES, QUANTIZE_HEADS as HEADS, UsageError, run_cli

GROUP_SIZES = (32, 64, 128, 256)  # what both int4 kernels take
BLOCKS_FILE = "model.q4.safetensors"
GGUF_BLOCK = 32


# ----------------------------------------------------------------------------- int4 and int8 values

def group_quantize(w: torch.Tensor, group_size: int):
    """Min-max asymmetric int4 per group of `group_size` inputs: codes (N, K) uint8 in 0..15, scales and zeros
    (N, K / group_size) fp32, with w ~ (codes - 8) * scale + zero (the kernels' convention)."""
    N, K = w.shape
    g = w.float().reshape(N, K // group_size, group_size)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    codes = ((g - lo) / scale).round().clamp(0, 15).to(torch.uint8).reshape(N, K)
    return codes, scale.squeeze(-1), (lo + 8 * scale).squeeze(-1)


def group_dequantize(codes, scales, zeros, group_size: int) -> torch.Tensor:
    # the reference the int4 module must equal: (N, K) codes, (N, K / group_size) scales and zeros -> (N, K) fp32
    s, z = (t.float().repeat_interleave(group_size, dim=1) for t in (scales, zeros))
    return (codes.float() - 8) * s + z


def channel_quantize(w: torch.Tensor):
    """Symmetric int8 per output channel: codes (N, K) int8 and scales (N,) fp32, w ~ codes * scale."""
    scale = (w.float().abs().amax(1) / 127).clamp(min=1e-12)
    return (w.float() / scale[:, None]).round().clamp(-128, 127).to(torch.int8), scale


# ----------------------------------------------------------------------------- the modules

class WeightOnlyInt4Linear(nn.Module):
    """y = x W^T with W stored as groupwise int4 (group_dequantize), packed for this device's kernel at build time.
    Activations run in bf16 (the kernels take nothing else fast); the output comes back in the input's dtype."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, device=None):
        super().__init__()
        N, K = codes.shape
        if K % group_size or group_size not in GROUP_SIZES:
            raise UsageError(f"int4 group size {group_size} does not divide the width {K} (or is not one of "
                             f"{GROUP_SIZES}); pick another --group-size")
        self.in_features, self.out_features, self.group_size = K, N, group_size
        device = torch.device(device or codes.device)
        codes = codes.to(device)
        if device.type == "cuda":  # tinygemm: two codes a byte (the even one high), K in tiles of 16 * inner_k_tiles
            inner = next(t for t in (8, 4, 2) if K % (16 * t) == 0)
            packed = torch.ops.aten._convert_weight_to_int4pack((codes[:, ::2] << 4 | codes[:, 1::2]), inner)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        sz = torch.stack([scales, zeros], dim=-1).transpose(0, 1)  # (K / group_size, N, 2), the kernels' layout
        self.register_buffer("weight", packed, persistent=False)  # machine-dependent layout: never saved
        self.register_buffer("scales_and_zeros", sz.to(device=device, dtype=torch.bfloat16).contiguous(),
                             persistent=False)

    def forward(self, x):
        y = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (B*T, K)
        if y.is_cuda:
            y = torch.ops.aten._weight_int4pack_mm(y, self.weight, self.group_size, self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(y, self.weight, self.group_size, self.scales_and_zeros)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


class WeightOnlyInt8Linear(nn.Module):
    """y = x W^T with W = codes * scale per output channel (channel_quantize); bf16 activations."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, device=None):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        device = device or codes.device
        self.register_buffer("weight", codes.to(device), persistent=False)  # never saved either: a load-time form
        self.register_buffer("scales", scales.to(device=device, dtype=torch.bfloat16), persistent=False)

    def forward(self, x):
        y = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if y.is_cuda:  # no fused CUDA kernel needed at decode's sizes: the cast reads int8, as gpt-fast does
            y = F.linear(y, self.weight.to(y.dtype)) * self.scales
        else:
            y = torch.ops.aten._weight_int8pack_mm(y, self.weight, self.scales)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Bf16Linear(nn.Module):
    """A float head in bf16 under a float model: F.linear in bf16, output in the input's dtype."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight.detach().to(torch.bfloat16), persistent=False)
        self.out_features, self.in_features = weight.shape

    def forward(self, x):
        return F.linear(x.to(torch.bfloat16), self.weight).to(x.dtype)


# ----------------------------------------------------------------------------- GGUF Q4_0 / Q4_1 blocks

def gguf_q4_blocks(data, kind: str, shape) -> dict:
    """A Q4_0 or Q4_1 tensor's raw GGUF bytes (rows of blocks) -> {"qs": uint8 (N, K/2), "d": fp16 (N, K/32)[, "m"]}.
    A block is d (fp16)[, m (fp16)], then 16 bytes of codes."""
    N, K = shape
    raw = torch.from_numpy(data.copy()).view(torch.uint8).reshape(N, K // GGUF_BLOCK, -1)
    head = 4 if kind == "Q4_1" else 2
    out = {"qs": raw[..., head:].reshape(N, K // 2).contiguous(),
           "d": raw[..., 0:2].contiguous().view(torch.float16).reshape(N, K // GGUF_BLOCK)}
    if kind == "Q4_1":
        out["m"] = raw[..., 2:4].contiguous().view(torch.float16).reshape(N, K // GGUF_BLOCK)
    return out


def blocks_to_int4(qs, d, m=None):
    """GGUF blocks -> (codes (N, K) uint8, scales, zeros (N, K/32) fp32) of the int4 kernels' convention."""
    N = qs.size(0)
    b = qs.reshape(N, -1, GGUF_BLOCK // 2)  # (N, blocks, 16)
    codes = torch.cat([b & 0x0F, b >> 4], dim=-1).reshape(N, -1)  # low nibbles are elements 0..15, high 16..31
    scales = d.float()
    zeros = torch.zeros_like(scales) if m is None else m.float() + 8 * scales  # d q + m = d (q - 8) + (m + 8 d)
    return codes, scales, zeros


def read_blocks(ckpt_dir) -> dict:
    """{our weight name: (codes, scales, zeros)} from <ckpt_dir>/model.q4.safetensors, or {} if it has none."""
    from safetensors.torch import load_file

    path = Path(ckpt_dir) / BLOCKS_FILE
    if not path.is_file():
        return {}
    sd = load_file(path)
    names = {k.rsplit(".", 1)[0] for k in sd}
    return {n: blocks_to_int4(sd[f"{n}.qs"], sd[f"{n}.d"], sd.get(f"{n}.m")) for n in names}


# ----------------------------------------------------------------------------- the transform

def check_args(mode: str, group_size: int, head: str = "none"):
    # quantize() is also called from Python, not only through add_quantize_args' choices
    if mode not in MODES:
        raise UsageError(f"--quantize must be one of {', '.join(MODES)}, not {mode!r}")
    if head not in HEADS:
        raise UsageError(f"--quantize-head must be one of {', '.join(HEADS)}, not {head!r}")
    if mode == "int4" and group_size not in GROUP_SIZES:
        raise UsageError(f"--group-size {group_size} is not one the int4 kernels take ({GROUP_SIZES})")


def quantized_linear(w: torch.Tensor, mode: str, group_size: int, blocks=None) -> nn.Module:
    """The module that replaces an nn.Linear of weight w (N, K); `blocks` (codes, scales, zeros) instead of w's own
    int4 values where given."""
    if mode == "bfloat16":
        return Bf16Linear(w)
    if mode == "int8":
        return WeightOnlyInt8Linear(*channel_quantize(w.detach()))
    if w.size(1) % group_size:
        raise UsageError(f"--group-size {group_size} does not divide the width {w.size(1)} of a {tuple(w.shape)} "
                         f"weight; pick one that does ({', '.join(str(g) for g in GROUP_SIZES if w.size(1) % g == 0)})")
    return WeightOnlyInt4Linear(*(blocks or group_quantize(w.detach(), group_size)), group_size, device=w.device)


def quantize(model: nn.Module, mode: str, group_size: int = 32, head: str = "none", blocks=None,
             head_name: str = "output") -> nn.Module:
    """Swap every nn.Linear of `model` (a Transformer or BalconyModel, in place) for its `mode` form; `head_name`'s
    linear (the LM head) for its `head` form ("none": left as it is). blocks: {weight name, relative to `model` with the
    prefix "model." dropped, as in our checkpoints: (codes, scales, zeros)} from read_blocks, used for int4 at
    group 32. Load trained exits before this (their fingerprint reads the float weights)."""
    check_args(mode, group_size, head)
    blocks = (blocks or {}) if mode == "int4" and group_size == GGUF_BLOCK else {}
    for name, m in list(model.named_modules()):
        if not isinstance(m, nn.Linear):
            continue
        parent, _, attr = name.rpartition(".")
        kind = head if attr == head_name and parent in ("", "model") else mode
        if kind == "int4" and name.startswith("exits."):
            # trained balconies are no 4-bit file's values: min-max int4 of exit 15's balcony moved its output by 45%
            # (relative L2, trained exits of the default model), int8 per channel by 1.2%; a balcony is one layer
            kind = "int8"
        if kind == "none":
            continue
        ours = name.removeprefix("model.") + ".weight"
        new = quantized_linear(m.weight, kind, group_size, blocks.get(ours) if kind == "int4" else None)
        setattr(model.get_submodule(parent), attr, new)
    return model


def quantize_checkpoint(model: nn.Module, ckpt_dir, mode: str = "none", group_size: int = 32, head: str = "none"):
    """quantize() with the checkpoint's GGUF blocks (model.q4.safetensors) where it has them, after checking that they
    are the blocks of the float weights loaded (a retrained or re-converted model.safetensors makes them stale)."""
    if mode == "none":
        return model
    check_args(mode, group_size, head)
    blocks = read_blocks(ckpt_dir) if mode == "int4" and group_size == GGUF_BLOCK else {}
    params = dict(model.named_parameters())
    for name, (codes, scales, zeros) in blocks.items():
        w = params.get(name, params.get("model." + name))
        if w is None or w.shape != codes.shape or not torch.allclose(
                group_dequantize(codes[:4], scales[:4], zeros[:4], GGUF_BLOCK), w[:4].float(), rtol=1e-2, atol=1e-3):
            raise UsageError(f"{Path(ckpt_dir) / BLOCKS_FILE} does not match model.safetensors at {name}; convert "
                             "the model again (python convert_hf.py --default)")
    return quantize(model, mode, group_size, head, blocks)


# ----------------------------------------------------------------------------- what bf16 scales cost

def main(args):
    """For every tensor kept as GGUF blocks: the int4 pack's weights (bf16 scales and zeros) against the file's own
    (gguf's dequantize, which model.safetensors holds): the largest difference and the relative RMS, beside the
    4-bit rounding itself (a uniform step of `scale`: RMS scale / sqrt(12))."""
    from model import Transformer
    model = Transformer.from_checkpoint(args.checkpoint)
    floats = dict(model.named_parameters())
    blocks = read_blocks(args.checkpoint)
    if not blocks:
        raise UsageError(f"{Path(args.checkpoint) / BLOCKS_FILE} not found: convert a Q4_0 / Q4_1 GGUF first")
    worst, err2, ref2, step2 = 0.0, 0.0, 0.0, 0.0
    for name, (codes, scales, zeros) in sorted(blocks.items()):
        w = floats[name].detach()
        packed = WeightOnlyInt4Linear(codes, scales, zeros, GGUF_BLOCK).scales_and_zeros.float().transpose(0, 1)
        d = group_dequantize(codes, packed[..., 0], packed[..., 1], GGUF_BLOCK) - w
        worst = max(worst, d.abs().max().item())
        err2, ref2 = err2 + d.pow(2).sum().item(), ref2 + w.pow(2).sum().item()
        step2 += (scales.pow(2).sum() * GGUF_BLOCK / 12).item()
    print(f"{len(blocks)} tensors from {BLOCKS_FILE}: bf16 scales and zeros move the file's weights by at most "
          f"{worst:.2e}; relative RMS {(err2 / ref2) ** 0.5:.2e}, against {(step2 / ref2) ** 0.5:.2e} for the 4-bit "
          "rounding the file already holds")


def get_parser():
    import argparse

    from cli import DEFAULT_CHECKPOINT
    p = argparse.ArgumentParser(description=main.__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="converted model folder (from a Q4_0/Q4_1 GGUF)")
    return p


if __name__ == "__main__":
    run_cli(main, get_parser().parse_args)

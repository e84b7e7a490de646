"""
A plain LLaMA (Llama-2, Llama-3/3.1/3.2, SmolLM2) in one file, with a static KV cache.

Nothing here knows about Balcony: balcony.py wraps this model from outside. Weight names follow Meta's
(tok_embeddings, layers.{i}.attention.wq, ...), RoPE uses Hugging Face's rotate-half layout so HF weights load
with no permutation, and the KV cache is gpt-fast's: preallocated buffers written at an `input_pos` tensor, so a
decode step always has the same shapes (torch.compile with CUDA graphs likes that).
"""
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import UsageError


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None: same as n_heads (MHA)
    vocab_size: int = 32000
    hidden_dim: Optional[int] = None  # SwiGLU width; None: Llama-2's rule from dim
    head_dim: Optional[int] = None  # None: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # Llama-3.1: {factor, low_freq_factor, high_freq_factor, original_max_position_embeddings}
    max_seq_len: int = 2048
    tie_embeddings: bool = False

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.hidden_dim is None:  # Llama-2: 2/3 of 4*dim, rounded up to a multiple of 256
            self.hidden_dim = 256 * math.ceil(int(2 * 4 * self.dim / 3) / 256)
        if self.n_heads % self.n_kv_heads:
            raise UsageError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        if name not in PRESETS:
            raise UsageError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    @classmethod
    def from_hf_config(cls, config) -> "ModelArgs":
        """From a Hugging Face LlamaConfig: a dict, or the path of a config.json. The optional keys default to
        LlamaConfig's own defaults; the sizes have none."""
        where = "config.json" if isinstance(config, dict) else config
        if not isinstance(config, dict):
            config = read_json(config)
        if config.get("model_type", "llama") != "llama":
            raise UsageError(f"model_type {config['model_type']!r} is not supported; only 'llama' is")
        require(config, ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                         "intermediate_size"), where)
        # transformers >= 5 writes rope_theta and the scaling inside one rope_parameters dict
        rope = config.get("rope_parameters") or {}
        scaling = config.get("rope_scaling") or rope or None
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind == "default":
                scaling = None
            elif kind != "llama3":
                raise UsageError(f"rope_scaling type {kind!r} is not supported; only 'llama3' is")
            else:
                keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                require(scaling, keys, f"{where}: rope_scaling")
                scaling = {k: scaling[k] for k in keys}
        return cls(
            dim=config["hidden_size"],
            n_layers=config["num_hidden_layers"],
            n_heads=config["num_attention_heads"],
            n_kv_heads=config.get("num_key_value_heads"),
            vocab_size=config["vocab_size"],
            hidden_dim=config["intermediate_size"],
            head_dim=config.get("head_dim"),
            norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=config.get("rope_theta", rope.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            max_seq_len=config.get("max_position_embeddings", 2048),
            tie_embeddings=config.get("tie_word_embeddings", False),
        )

    @classmethod
    def from_json(cls, path) -> "ModelArgs":
        """From the config.json of a converted checkpoint (to_json's, every field): a missing field is refused, as
        its default (Llama-2-7B's) would be a guess."""
        d = read_json(path)
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise UsageError(f"{path}: unknown ModelArgs fields {sorted(unknown)}; is this a converted checkpoint?")
        require(d, [f.name for f in fields(cls)], path)
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def read_json(path) -> dict:
    """A config file's JSON object; a missing, truncated or non-UTF-8 file is one UsageError line."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: bad JSON (JSONDecodeError) or bad UTF-8 (UnicodeDecodeError)
        raise UsageError(f"{path} is not a readable JSON file ({e}); is it complete?") from None
    if not isinstance(d, dict):
        raise UsageError(f"{path} holds no JSON object")
    return d


def require(config: dict, keys, where):
    missing = [k for k in keys if k not in config]
    if missing:
        raise UsageError(f"{where} misses {missing}; is the file complete?")


_LLAMA3_SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
PRESETS = {
    "llama-2-7b": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, hidden_dim=11008, norm_eps=1e-5,
                       max_seq_len=4096),
    "llama-3-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, hidden_dim=14336,
                       rope_theta=500000.0, max_seq_len=8192),
    "llama-3.1-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, hidden_dim=14336,
                         rope_theta=500000.0, rope_scaling=_LLAMA3_SCALING, max_seq_len=131072),
    "llama-3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, hidden_dim=8192,
                         rope_theta=500000.0, tie_embeddings=True, max_seq_len=131072,
                         rope_scaling=dict(_LLAMA3_SCALING, factor=32.0)),
    "smollm2-135m": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, hidden_dim=1536,
                         rope_theta=100000.0, tie_embeddings=True, max_seq_len=8192),
    # not a published model: the shape gpu_check.py --dry-run runs the paper-shape steps at, in seconds on a CPU
    "tiny": dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=320, hidden_dim=96, max_seq_len=256),
}


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2, dtype=torch.float64) / args.head_dim))
    if args.rope_scaling is not None:  # Llama-3.1: slow down low frequencies, keep high ones, blend in between
        s = args.rope_scaling
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        low_wavelen, high_wavelen = old_len / s["low_freq_factor"], old_len / s["high_freq_factor"]
        smooth = (old_len / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
        blended = (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq
        inv_freq = torch.where(wavelen > low_wavelen, inv_freq / s["factor"],
                               torch.where(wavelen < high_wavelen, inv_freq, blended))
    return inv_freq.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, hd); cos, sin: (T, hd). HF's rotate-half: pairs are (i, i + hd/2), not (2i, 2i+1).
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 (as HF does), scale in the input's dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class KVCache(nn.Module):
    """Buffers for max_batch_size rows and max_seq_len positions, allocated once. A forward on B rows uses rows
    0..B-1, and attention reads the first `length` positions: all of them unless the caller narrows it to what a
    request can reach, so a cache allocated for long requests costs nothing on short ones."""

    def __init__(self, max_batch_size: int, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.length = max_seq_len

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # input_pos: (B, T) each row's positions; k, v: (B, n_kv, T, hd). Writes in place and returns rows 0..B-1.
        # The cast keeps an fp32 cache writable under bf16 autocast, where the projections come out in bf16.
        B = k.size(0)
        rows = torch.arange(B, device=k.device)[:, None]  # (B, 1)
        self.k_cache[rows, :, input_pos] = k.transpose(1, 2).to(self.k_cache.dtype)  # (B, T, n_kv, hd) slots
        self.v_cache[rows, :, input_pos] = v.transpose(1, 2).to(self.v_cache.dtype)
        return self.k_cache[:B, :, :self.length], self.v_cache[:B, :, :self.length]


def ensure_cache(cache: Optional[KVCache], args: ModelArgs, batch: int, seq_len: int, like: torch.Tensor):
    """`cache` if it holds batch rows and seq_len positions, else a new one big enough for both (dtype and device of
    `like`); either way reading seq_len positions."""
    if cache is None or cache.k_cache.size(0) < batch or cache.k_cache.size(2) < seq_len:
        old_b, old_s = (0, 0) if cache is None else (cache.k_cache.size(0), cache.k_cache.size(2))
        cache = KVCache(max(batch, old_b), args.n_kv_heads, max(seq_len, old_s), args.head_dim, like.dtype,
                        like.device)
    cache.length = seq_len
    return cache


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x, cos, sin, input_pos=None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KVH, T, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if input_pos is None:  # no cache: plain causal attention over these T tokens
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:  # static cache: attend over the cache's slots, masking those after each query's position
            pos = input_pos.expand(B, T)  # (T,): the same positions for every row; (B, T): a row's own
            k, v = self.kv_cache.update(pos, k, v)
            mask = torch.arange(k.size(2), device=x.device) <= pos[:, None, :, None]  # (B, 1, T, S)
            if q.is_cuda:  # CUDA's kernels that take a mask do not take enable_gqa: with both, SDPA runs the math one
                k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
                v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, enable_gqa=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)  # down
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, input_pos=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        # nanoGPT's init: random models (tests, speed benchmarks) get trained-model-like activation scales
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def _apply(self, fn, recurse=True):
        # .to(bfloat16) would round the RoPE frequencies (and every position's angle with them): keep them fp32
        super()._apply(fn, recurse)
        if self.inv_freq.dtype in (torch.float16, torch.bfloat16):
            self.inv_freq = rope_inv_freq(self.args).to(self.inv_freq.device)
        return self

    def rope(self, T: int, input_pos: Optional[torch.Tensor] = None):
        """cos, sin for positions input_pos, or 0..T-1 when there is no cache: (T, head_dim) for positions (T,)
        shared by every row, (B, 1, T, head_dim) for per-row positions (B, T)."""
        pos = torch.arange(T, device=self.inv_freq.device) if input_pos is None else input_pos
        freqs = pos[..., None].float() * self.inv_freq  # (..., T, hd/2), in fp32 whatever the model's dtype
        emb = torch.cat((freqs, freqs), dim=-1)
        if emb.dim() == 3:
            emb = emb.unsqueeze(1)  # broadcast over heads
        dtype = self.tok_embeddings.weight.dtype
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def setup_caches(self, max_batch_size: int, max_seq_len: int, n_layers: Optional[int] = None):
        """KV caches for the first n_layers layers (all by default) holding at least max_batch_size rows and
        max_seq_len positions. A cache that is big enough is kept, so repeated requests reuse the same buffers (and
        a compiled step its graphs); one too small is replaced by one big enough for both. Deeper layers are left
        as they are. Attention then reads max_seq_len positions."""
        if max_seq_len > self.args.max_seq_len:
            raise UsageError(f"a context of {max_seq_len} tokens exceeds the model's {self.args.max_seq_len}")
        for layer in self.layers[:n_layers]:
            layer.attention.kv_cache = ensure_cache(layer.attention.kv_cache, self.args, max_batch_size, max_seq_len,
                                                    self.tok_embeddings.weight)

    def forward(self, idx: torch.Tensor, input_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        # idx: (B, T) token ids; input_pos: (T,) their positions in the KV cache, or None for an uncached forward
        x = self.tok_embeddings(idx)  # (B, T, D)
        cos, sin = self.rope(idx.size(1), input_pos)
        for layer in self.layers:
            x = layer(x, cos, sin, input_pos)
        return self.output(self.norm(x))  # (B, T, vocab)

    def checkpoint_state_dict(self) -> dict:
        """The tensors a checkpoint stores: a tied output head is not stored twice."""
        sd = self.state_dict()
        if self.args.tie_embeddings:
            del sd["output.weight"]
        return sd

    @classmethod
    def from_checkpoint(cls, path, device="cpu", dtype=torch.float32) -> "Transformer":
        """Load a folder written by convert_hf.py: config.json (ModelArgs) and model.safetensors (our names)."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        config, weights = path / "config.json", path / "model.safetensors"
        for f in (config, weights):
            if not f.is_file():
                raise UsageError(f"{f} not found; convert a model first: python convert_hf.py --default")
        args = ModelArgs.from_json(config)
        with torch.device("meta"):
            model = cls(args)
        expected = model.checkpoint_state_dict()
        try:
            with safe_open(weights, framework="pt", backend="pread") as f:
                shapes = {name: torch.Size(f.get_slice(name).get_shape()) for name in f.keys()}  # no data read yet
                missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
                if missing or unexpected:
                    raise UsageError(f"{weights} does not match {config}: missing {missing[:3]}, "
                                     f"unexpected {unexpected[:3]}")
                for name, shape in shapes.items():
                    if shape != expected[name].shape:
                        raise UsageError(f"{weights}: {name} has shape {tuple(shape)}, config.json implies "
                                         f"{tuple(expected[name].shape)}")
                # tensor by tensor: each is read, cast and moved before the next is read, so memory peaks at the model
                # in `dtype` plus one stored tensor (an fp32 8B checkpoint loaded in bf16 on a GPU: 16 GB, not 48)
                sd = {name: f.get_tensor(name).to(device=device, dtype=dtype) for name in shapes}
        except (SafetensorError, OSError) as e:
            raise UsageError(f"{weights} is unreadable ({e}); convert the model again") from None
        model.load_state_dict(sd, strict=False, assign=True)
        if args.tie_embeddings:
            model.output.weight = model.tok_embeddings.weight
        model.inv_freq = rope_inv_freq(args).to(device)
        return model.eval()

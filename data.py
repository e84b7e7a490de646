"""
The data of train.py: --data files -> documents -> one token file, cached; then windows and batches from it.

Every document is tokenised once, followed by EOS, into a memmapped token file (nanoGPT's train.bin), training
documents first and the held-out ones last; train.py reads windows of it back, shuffled afresh every epoch.
"""
import fnmatch
import functools
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cli import UsageError

ROOT = Path(__file__).resolve().parent
CORPUS, CACHE_DIR = ROOT / "data" / "shakespeare", ROOT / "data" / "tokens"
# The corpus holds each play twice (modern and First Folio spelling), so whole plays are held out, both editions.
VAL_FILES = "hamlet_*,macbeth_*,tempest_*"
# Fixed text whose encoding keys the token cache, so a different tokenizer re-tokenises.
PROBE = "The quick brown fox, 1234567890 times!\n\tdef f(x): return x**2  # ÆØÅ naïve café 東京 🙂 <|endoftext|>"


def data_files(data) -> list:
    """The .txt / .jsonl files named by --data (files or folders); by default the Shakespeare plays."""
    if not data:
        if not (CORPUS / ".complete").exists():
            raise UsageError(f"{CORPUS} not found; fetch the corpus first: python fetch.py corpus")
        return sorted(CORPUS.glob("*_gut*.txt"))  # the plays, not metadata.txt
    files = []
    for p in map(Path, data):
        if not p.exists():
            raise UsageError(f"--data {p} not found")
        files += sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".jsonl") and f.is_file()) if p.is_dir() else [p]
    if not files:
        raise UsageError(f"no .txt or .jsonl files in {', '.join(map(str, data))}")
    return files


def read_documents(path: Path):
    if path.suffix != ".jsonl":
        yield path.read_text(encoding="utf-8", errors="replace")  # a plain-text file is one document
        return
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)["text"]
                except (ValueError, KeyError, TypeError):
                    raise UsageError(f"{path}:{i}: not a JSON object with a 'text' field") from None


def tokenize_corpus(files, tokenizer, val_files=VAL_FILES, cache_dir=CACHE_DIR) -> Path:
    """Tokenise every document once, each followed by EOS, into <cache_dir>/<key>/tokens.bin: training files first,
    then the files matching val_files (or, if none or all match, the last 5% of tokens). Returns the folder."""
    patterns = val_files.split(",")
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    probe = tokenizer.encode(PROBE, bos=True, eos=True)
    key = hashlib.sha256(json.dumps([probe, patterns, stats]).encode()).hexdigest()[:16]
    folder = Path(cache_dir) / key
    if (folder / "meta.json").exists():
        return folder
    val = [any(fnmatch.fnmatch(f.name, p) for p in patterns) for f in files]
    ordered = [(f, v) for f, v in zip(files, val) if not v] + [(f, v) for f, v in zip(files, val) if v]
    chunks, n_train = [], 0
    with tqdm(total=sum(s for _, s, _ in stats), unit="B", unit_scale=True, desc="tokenising") as bar:
        for f, is_val in ordered:
            for doc in read_documents(f):
                chunks.append(np.array(tokenizer.encode(doc, bos=tokenizer.add_bos, eos=True), dtype=np.uint32))
                n_train += 0 if is_val else len(chunks[-1])
            bar.update(f.stat().st_size)
    tokens = np.concatenate(chunks)
    val_start = n_train if 0 < n_train < len(tokens) else int(0.95 * len(tokens))
    dtype = np.uint16 if tokens.max() < 2 ** 16 else np.uint32
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "tokens.bin.tmp"
    tokens.astype(dtype).tofile(tmp)
    os.replace(tmp, folder / "tokens.bin")
    meta = {"dtype": np.dtype(dtype).name, "n_tokens": len(tokens), "val_start": val_start, "files": stats}
    (folder / "meta.json").write_text(json.dumps(meta))  # written last: its presence marks a complete cache
    return folder


def open_tokens(folder: Path, split: str) -> np.ndarray:
    """The 'train' or 'val' part of a tokenize_corpus folder, as a read-only memmap."""
    meta = json.loads((folder / "meta.json").read_text())
    tokens = np.memmap(folder / "tokens.bin", dtype=meta["dtype"], mode="r")
    return tokens[:meta["val_start"]] if split == "train" else tokens[meta["val_start"]:]


def load_tokens(data, tokenizer, split: str, val_files=VAL_FILES, cache_dir=CACHE_DIR) -> np.ndarray:
    """The 'train' or 'val' tokens of --data (a list of paths; None: Shakespeare), tokenising once."""
    return open_tokens(tokenize_corpus(data_files(data), tokenizer, val_files, cache_dir), split)


def n_windows(tokens, seq_len: int) -> int:
    return (len(tokens) - 1) // seq_len  # each window also needs the token after it as a target


def get_batch(tokens, windows, seq_len: int, device):
    """Windows i (tokens packed back to back, seq_len each) -> inputs x and next-token targets y, both (B, T)."""
    rows = np.stack([tokens[i * seq_len: (i + 1) * seq_len + 1] for i in windows]).astype(np.int64)
    rows = torch.from_numpy(rows).to(device)
    return rows[:, :-1], rows[:, 1:]


def iter_batches(tokens, seq_len: int, batch_size: int, device, max_windows=None, rank=0, world_size=1):
    """The first max_windows windows in order (all if None), batch by batch; rank r gets every world_size-th batch."""
    n = min(n_windows(tokens, seq_len), max_windows or float("inf"))
    for b, s in enumerate(range(0, n, batch_size)):
        if b % world_size == rank:
            yield get_batch(tokens, range(s, min(s + batch_size, n)), seq_len, device)


@functools.lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def step_windows(step: int, n: int, global_batch: int, seed: int) -> np.ndarray:
    """The windows of one step's global batch: a fresh shuffle every epoch, so the step alone fixes the position."""
    g = np.arange(step * global_batch, (step + 1) * global_batch)
    return np.array([epoch_order(n, seed, e)[i] for e, i in zip(g // n, g % n)])

"""
The data of train.py: --data files -> documents -> one cached token file; then windows and batches from it.

    python data.py --data corpus/ --checkpoint checkpoints/llama-3-8b      # tokenise once, before a long launch
    torchrun --nproc_per_node 8 train.py --data corpus/ ...                # rank 0 tokenises or finds the cache

What --data reads (files, or folders searched for them; any other file named directly is refused):
    .txt                  the whole file is one document
    .jsonl, .jsonl.gz     a document per line
    .parquet, .arrow      a document per row (.arrow: the files of a Hugging Face save_to_disk folder)
A line or row is a chat if it has "messages" ([{"role", "content"}, ...]) or "prompt" + "text" (the chat
[user: prompt, assistant: text], the Cosmopedia recipe of the paper's section 4): it becomes the model's chat template,
tokens exactly as tokenizer.encode_chat gives them. Otherwise its "text" is plain text: BOS if the model wants one,
the text, EOS.

Every document is tokenised once into <cache-dir>/<key>/tokens.bin (nanoGPT's train.bin): training documents first,
held-out ones last. Documents stream through a pool of processes in chunks, in order, so memory stays bounded by a few
chunks (and by the longest document) and the file is the same for any number of processes. The folder appears by an
atomic rename when complete, and its key hashes the files (path, size, mtime), the split and the tokenizer, so a
changed input or tokenizer never reuses a stale cache.
"""
import argparse
import collections
import fnmatch
import functools
import gzip
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cli import DEFAULT_CHECKPOINT, ROOT, UsageError, run_cli
from tokenizer import Tokenizer

CORPUS, CACHE_DIR = ROOT / "data" / "shakespeare", ROOT / "data" / "tokens"
CHAT = ROOT / "data" / "chat"  # the default: the model's own answers to real questions (python chat_data.py)
# chat_data.py's held-out chats, and, as the corpus holds each play twice (modern and First Folio spelling), whole
# plays, both editions
VAL_FILES = "val.jsonl,hamlet_*,macbeth_*,tempest_*"
# Fixed text whose encoding keys the token cache, so a different tokenizer re-tokenises.
PROBE = "The quick brown fox, 1234567890 times!\n\tdef f(x): return x**2  # ÆØÅ naïve café 東京 🙂 <|endoftext|>"
FORMAT = 2  # part of the cache key: bump it when the way documents become tokens changes
KINDS = {".txt": "txt", ".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".parquet": "table", ".arrow": "table"}
READABLE = ".txt, .jsonl, .jsonl.gz, .parquet or .arrow (a Hugging Face save_to_disk folder)"
FIELDS = ("messages", "prompt", "text")  # the columns a row may use
CHUNK_DOCS = 256  # documents per task handed to a tokenising process
WAIT_S = 24 * 3600  # how long torchrun's other ranks wait for rank 0's cache: a billion tokens take minutes to hours


# ---------------------------------------------------------------------------------------------------- reading
def file_kind(path: Path):
    """'txt', 'jsonl' or 'table' by the file name's ending; None for a type we do not read."""
    return next((kind for end, kind in KINDS.items() if path.name.lower().endswith(end)), None)


def data_files(data) -> list:
    """The files named by --data (files, or folders searched for the types we read); by default chat_data.py's."""
    if not data:
        if not (CHAT / "meta.json").exists():
            raise UsageError(f"{CHAT} not found; generate the default training data first: python chat_data.py")
        return [CHAT / "train.jsonl", CHAT / "val.jsonl"]
    files = []
    for p in map(Path, data):
        if not p.exists():
            raise UsageError(f"--data {p} not found")
        if p.is_dir():  # a save_to_disk folder's .arrow files sort in order; its .json files are skipped
            files += sorted(f for f in p.rglob("*") if f.is_file() and file_kind(f))
        elif file_kind(p):
            files.append(p)
        else:
            raise UsageError(f"--data {p}: not a type we read; give {READABLE} files, or folders of them")
    if not files:
        raise UsageError(f"no {READABLE} files in {', '.join(map(str, data))}")
    return files


def read_chunks(path: Path):
    """The raw documents of one file, CHUNK_DOCS at a time, as (number of the first, list): the text of a .txt file,
    the lines of a JSONL file (blank ones too, so numbers are line numbers), or a table's rows as dicts."""
    kind = file_kind(path)
    if kind == "txt":
        yield 1, [path.read_text(encoding="utf-8-sig", errors="replace")]  # -sig: a byte order mark is not text
    elif kind == "jsonl":
        with (gzip.open if path.name.lower().endswith(".gz") else open)(path, "rb") as f:
            for start in itertools.count(1, CHUNK_DOCS):
                try:
                    lines = list(itertools.islice(f, CHUNK_DOCS))
                except (OSError, EOFError) as e:  # a damaged or truncated .gz
                    raise UsageError(f"{path}: {e}") from None
                if not lines:
                    break
                yield start, lines
    else:
        yield from read_table(path)


def read_table(path: Path):
    """A .parquet file or an Arrow IPC file's rows, only the columns we use, read one record batch at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        if path.suffix.lower() == ".parquet":
            table = pq.ParquetFile(path)
            names, batches = table.schema_arrow.names, table.iter_batches(batch_size=CHUNK_DOCS)
        else:  # the Arrow IPC stream format of save_to_disk and of the datasets cache
            batches = pa.ipc.open_stream(pa.memory_map(str(path)))
            names = batches.schema.names
    except (pa.ArrowInvalid, OSError) as e:
        raise UsageError(f"{path}: not a readable {path.suffix} file ({e})") from None
    columns = [c for c in FIELDS if c in names]
    if columns in ([], ["prompt"]):
        raise UsageError(f"{path} has no 'text', 'prompt' + 'text' or 'messages' column (it has {', '.join(names)})")
    start = 1
    for batch in batches:
        for s in range(0, batch.num_rows, CHUNK_DOCS):
            rows = batch.slice(s, CHUNK_DOCS).select(columns).to_pylist()
            yield start, rows
            start += len(rows)


def parse_json(line: bytes):
    try:
        return json.loads(line)
    except ValueError:  # bad JSON or bad UTF-8
        raise UsageError("not a line of JSON") from None


def document(row):
    """A JSON line or table row -> a str of plain text or a chat (a list of {"role", "content"} messages)."""
    if not isinstance(row, dict):
        raise UsageError("not a JSON object")
    if row.get("messages") is not None:
        m = row["messages"]
        if not isinstance(m, list) or not m or not all(
                isinstance(x, dict) and isinstance(x.get("role"), str) and isinstance(x.get("content"), str) for x in m):
            raise UsageError("'messages' is not a list of {\"role\": str, \"content\": str} objects")
        return [{"role": x["role"], "content": x["content"]} for x in m]
    if not isinstance(row.get("text"), str):
        raise UsageError("no 'text' (a string), 'prompt' + 'text' or 'messages' field")
    if row.get("prompt") is None:
        return row["text"]
    if not isinstance(row["prompt"], str):
        raise UsageError("'prompt' is not a string")
    return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["text"]}]


def encode_document(tokenizer, doc) -> list:
    if isinstance(doc, str):
        return tokenizer.encode(doc, bos=tokenizer.add_bos, eos=True)
    # ends with the template's end-of-turn token; today=False: a template's date (Llama-3.2 writes today's) is its
    # fixed one, so the tokens, the cache key and train.py --resume's check stay the same from day to day
    return tokenizer.encode_chat(doc, add_generation_prompt=False, today=False)


def held_out(doc, fraction: float) -> bool:
    """Whether the fraction split holds a document out: by a hash of its content, so the choice depends on neither
    the order nor the number of files or processes, and copies of a document land on the same side."""
    digest = hashlib.blake2b(json.dumps(doc).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2 ** 64


# ---------------------------------------------------------------------------------------------- tokenising
WORKER = {}  # what tokenize_chunk needs, set once per process by init_worker (forked, so never pickled)


def init_worker(tokenizer, dtype, fraction: float, in_pool: bool):
    if in_pool:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    WORKER.update(tokenizer=tokenizer, dtype=dtype, fraction=fraction)


def tokenize_chunk(task):
    """One chunk of documents -> (training tokens, held-out tokens, number of documents)."""
    path, is_val, start, items = task
    tok, fraction = WORKER["tokenizer"], WORKER["fraction"]
    ids, n_docs = ([], []), 0
    for i, item in enumerate(items, start):
        try:
            if isinstance(item, bytes):  # a JSONL line
                if not item.strip():
                    continue
                doc = document(parse_json(item))
            else:  # the text of a .txt file, or a table row
                doc = item if isinstance(item, str) else document(item)
            ids[is_val or (fraction > 0 and held_out(doc, fraction))].extend(encode_document(tok, doc))
        except UsageError as e:
            raise UsageError(f"{path}:{i}: {e}") from None
        n_docs += 1
    return np.array(ids[0], dtype=WORKER["dtype"]), np.array(ids[1], dtype=WORKER["dtype"]), n_docs


def imap_ordered(fn, tasks, num_proc: int, initargs):
    """fn over tasks in num_proc processes, results in task order, at most 2 * num_proc tasks in flight (Pool.imap
    would read every task ahead, the whole corpus). One process: the same calls, in this one."""
    if num_proc == 1:
        init_worker(*initargs, in_pool=False)
        yield from map(fn, tasks)
        return
    # fork: the workers inherit the tokenizer instead of unpickling it, and do not re-import torch
    with multiprocessing.get_context("fork").Pool(num_proc, init_worker, (*initargs, True)) as pool:
        pending = collections.deque()
        for task in tasks:
            pending.append(pool.apply_async(fn, (task,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def cache_key(tokenizer, patterns: list, fraction: float, stats: list) -> str:
    try:
        chat = encode_document(tokenizer, [{"role": "user", "content": PROBE}])
    except UsageError:  # no chat format: a chat document would be refused anyway
        chat = None
    probe = [tokenizer.encode(PROBE, bos=True, eos=True), chat, tokenizer.add_bos]
    return hashlib.sha256(json.dumps([FORMAT, probe, patterns, fraction, stats]).encode()).hexdigest()[:16]


def wait_for(path: Path, timeout_s: float):
    t0 = time.time()
    while not path.exists():
        if time.time() - t0 > timeout_s:
            raise UsageError(f"waited {timeout_s:.0f} s for rank 0 to tokenise --data into {path.parent}; tokenise "
                             f"it first with python data.py (on every node unless --cache-dir is shared)")
        time.sleep(2)


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def is_val_file(f: Path, val_files: str) -> bool:
    """Whether a file is held out: its name or path matches one of the comma-separated patterns of val_files."""
    return any(fnmatch.fnmatch(f.name, p) or fnmatch.fnmatch(str(f), p) for p in val_files.split(",") if p)


def tokenize_corpus(files, tokenizer, val_files=VAL_FILES, cache_dir=CACHE_DIR, val_fraction=0.0, num_proc=None,
                    wait=False) -> Path:
    """Tokenise every document once into <cache_dir>/<key>/tokens.bin: the training documents, then the held-out
    ones (the files matching val_files, by name or path, and a val_fraction of the others' documents); if that
    holds out none or all, the last 5% of tokens. wait: another process (torchrun's rank 0) writes the cache.
    Returns the folder."""
    patterns = [p for p in val_files.split(",") if p]
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    folder = Path(cache_dir) / cache_key(tokenizer, patterns, val_fraction, stats)
    if wait:
        wait_for(folder / "meta.json", WAIT_S)
    if (folder / "meta.json").exists():
        return folder
    dtype = np.uint16 if tokenizer.vocab_size <= 2 ** 16 else np.uint32
    val = [is_val_file(f, val_files) for f in files]
    tasks = ((str(f), v, start, items) for f, v in zip(files, val) for start, items in read_chunks(f))
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp", dir=folder.parent))
    try:
        n_train = n_val = n_docs = 0
        with open(tmp / "tokens.bin", "wb") as train_f, open(tmp / "val.bin", "w+b") as val_f, \
                tqdm(unit="tok", unit_scale=True, desc="tokenising") as bar:
            initargs = (tokenizer, dtype, val_fraction)
            for train_ids, val_ids, n in imap_ordered(tokenize_chunk, tasks, num_proc or cpu_count(), initargs):
                train_ids.tofile(train_f)
                val_ids.tofile(val_f)
                n_train, n_val, n_docs = n_train + len(train_ids), n_val + len(val_ids), n_docs + n
                bar.update(len(train_ids) + len(val_ids))
            val_f.seek(0)
            shutil.copyfileobj(val_f, train_f)  # the held-out tokens go last
        (tmp / "val.bin").unlink()
        n_tokens = n_train + n_val
        val_start = n_train if n_train and n_val else int(0.95 * n_tokens)
        meta = {"format": FORMAT, "dtype": np.dtype(dtype).name, "n_tokens": n_tokens, "val_start": val_start,
                "n_docs": n_docs, "files": stats}
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.rename(tmp, folder)  # atomic: the cache is there complete, or not at all
        except OSError:
            if not (folder / "meta.json").exists():  # not another process that finished the same cache first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def open_tokens(folder: Path, split: str) -> np.ndarray:
    """The 'train' or 'val' part of a tokenize_corpus folder, as a read-only memmap."""
    meta = json.loads((folder / "meta.json").read_text())
    tokens = np.memmap(folder / "tokens.bin", dtype=meta["dtype"], mode="r")
    return tokens[:meta["val_start"]] if split == "train" else tokens[meta["val_start"]:]


def load_tokens(data, tokenizer, split: str, val_files=VAL_FILES, cache_dir=CACHE_DIR) -> np.ndarray:
    """The 'train' or 'val' tokens of --data (a list of paths; None: chat_data.py's chats), tokenising once."""
    return open_tokens(tokenize_corpus(data_files(data), tokenizer, val_files, cache_dir), split)


# ------------------------------------------------------------------------------------------ windows and batches
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


# ---------------------------------------------------------------------------------------------------------- main
def fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction in [0, 1)")
    return value


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not at least 1")
    return value


def add_data_args(p):
    """The flags that choose the data and its split, shared with train.py, so a cache prepared here is the one it
    finds."""
    d = " (default: %(default)s)"
    p.add_argument("--data", nargs="+", default=None, help=f"{READABLE} files, or folders of them; see data.py's help "
                   "for the fields (default: data/chat, written by python chat_data.py)")
    p.add_argument("--val-files", default=VAL_FILES, help="comma-separated name or path patterns of held-out files; "
                   "if nothing is held out, the last 5%% of tokens" + d)
    p.add_argument("--val-fraction", type=fraction, default=0.0, help="also hold out this fraction of the other "
                   "files' documents, chosen by a hash of each document" + d)
    p.add_argument("--cache-dir", default=CACHE_DIR, type=Path, help="token cache" + d)
    p.add_argument("--num-proc", type=positive, default=None,
                   help=f"tokenising processes (default: every core, here {cpu_count()})")


def main(args) -> int:
    files = data_files(args.data)
    tokenizer = Tokenizer.from_checkpoint(args.checkpoint)
    folder = tokenize_corpus(files, tokenizer, args.val_files, args.cache_dir, args.val_fraction, args.num_proc)
    meta = json.loads((folder / "meta.json").read_text())
    print(f"{folder}: {meta['val_start']:,} training and {meta['n_tokens'] - meta['val_start']:,} held-out tokens "
          f"({meta['dtype']}) from {meta['n_docs']:,} documents in {len(files)} files")
    return 0


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                   help="converted model folder: its tokenizer and chat template (default: %(default)s)")
    add_data_args(p)
    return p


if __name__ == "__main__":
    run_cli(main, get_parser().parse_args)

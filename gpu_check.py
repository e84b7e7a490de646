"""
Everything the first GPU owes, in one prepared command: about 8 minutes on one H100 or H200.

    python gpu_check.py                # a GPU: results in out/gpu-check/ (results.json, summary.md), summary printed
    python gpu_check.py --dry-run      # CPU, tiny shapes, every step on the same code path (no compile): ~1 minute

Steps, in order, each in its own process with its own time box, so a crash, an out-of-memory or a timeout in one
leaves the others' figures (a step that runs out of time keeps the rows it had written):
  tests           tests/test_cuda.py and every other test whose name says cuda (pytest -k cuda)
  train           one training step at the paper's shape: Llama-3-8B config, random weights, bf16, compiled, 1 x 4096
                  tokens, exits 15,18,21 (bench_train.run): s/step, tokens/s, MFU, peak memory
  train_authors   the same step in the authors' formulation (bench_train.AuthorsLoss), eager, if it fits
  decode_8b       batch-1 decoding at the 8B shape (random weights, bf16, compiled), full depth and each exit:
                  tokens/s and the fraction of the memory bandwidth a device copy reaches in the same process
  batch_8b        decode tokens/s at batch 1/8/32/128 per exit, 8B shape, eager
  int4            decode_8b with int4 weights (quantize.py, groups of 32), when it exists
  decode_default  the default model: batch-1 bf16 compiled per exit (tokens/s, bandwidth fraction); compiled
                  speculative decoding against eager greedy, in fp32 (identical) and bf16 (agreement)
  distill         make demo's recipe (train.py on the model's own chats) for --distill-minutes at GPU speed, then
                  held-out chat agreement per exit against the demo's exits; the exits in bf16, one file per exit

Weights are random where the step says so: speed and memory do not depend on their values. The bandwidth fraction
counts the bytes of weights a token reads (cascade.bytes_per_token), in the form they are held (int4: 0.625 bytes a
weight, scales and zeros included); the KV cache, a few MB at these lengths, is left out.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from cli import DEFAULT_CHECKPOINT, DTYPES, ROOT, UsageError, default_dtype, run_cli

# seconds each step may take on a GPU, process start and compile included (inductor compiles each exit's decode step
# apart, ~20 s each at 32 layers): under 10 minutes if every box runs out, about 8 if most finish early
BOXES = dict(tests=80, train=85, train_authors=45, decode_8b=90, batch_8b=30, int4=60, decode_default=110,
             distill=95)
STEPS = list(BOXES)
PAPER = dict(preset="llama-3-8b", exits="15,18,21", seq_len=4096)  # section 4's model and exits
TINY = dict(preset="tiny", exits="1,2,3", seq_len=32)  # --dry-run
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}  # dense bf16, for MFU


def shapes(args) -> dict:
    return TINY if args.dry_run else PAPER


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Record:
    """A step's results as a JSON file rewritten after every row, so a step stopped at its time box keeps them."""

    def __init__(self, path: Path):
        self.path, self.data = path, {}

    def __setitem__(self, key, value):
        self.data[key] = value
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)

    def row(self, table: str, row: dict):
        self[table] = self.data.get(table, []) + [row]


# ---------------------------------------------------------------------------------------------------------- steps
def step_tests(args, rec, device):
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda", str(ROOT / "tests")]
    cmd += ["--collect-only"] if args.dry_run else []  # the CPU cases run in the suite anyway
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = r.stdout.strip().splitlines()
    rec["summary"] = lines[-1] if lines else r.stderr[-500:]
    rec["failed"] = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    rec["not_run"] = [line for line in lines if line.startswith("SKIPPED")]
    return r.returncode  # failures fail the step; their names are in "failed"


def train_step(name: str, args, rec, device):
    import bench_train

    s = shapes(args)
    ns = SimpleNamespace(device=str(device), dtype=default_dtype(device), batch_size=1, chunk_size=256, steps=3,
                         compile=device.type == "cuda" and name == "ours", n_layers=None, **s)
    if args.dry_run:
        ns.steps = 1
    rec["config"] = dict(vars(ns), formulation=name)
    r = bench_train.run(name, ns)
    tokens = ns.batch_size * ns.seq_len
    row = dict(s_per_step=r["s"], tokens_per_s=tokens / r["s"], first_step_s=r["first"], step_peak_mib=r["step_mib"],
               process_peak_mib=r["process_mib"], model_tflop_per_step=r["flops"] * tokens / 1e12)
    if device.type == "cuda":
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in torch.cuda.get_device_name(device)), None)
        row.update(peak_tflops=peak, mfu=peak and r["flops"] * tokens / r["s"] / (peak * 1e12))
    rec["result"] = row


def step_train(args, rec, device):
    train_step("ours", args, rec, device)


def step_train_authors(args, rec, device):
    train_step("authors", args, rec, device)


def copy_bandwidth(device, mib: int) -> float:
    """Bytes per second a device-to-device copy moves, read plus written: what batch-1 decoding can hope for."""
    x = torch.empty(mib * 2 ** 20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync(device)
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync(device)
    return 2 * x.numel() * 10 / (time.perf_counter() - t)


def decode_ns(args, new_tokens: int = 128, reps: int = 3) -> SimpleNamespace:
    """bench_generate's knobs: new tokens per run, warm-up runs and timed runs (median)."""
    return SimpleNamespace(max_new_tokens=4 if args.dry_run else new_tokens, warmup=1, reps=1 if args.dry_run else reps)


def random_balcony(args, device, dtype):
    """The paper's shape (or --dry-run's) with random weights and exits initialised from the last layer."""
    from balcony import BalconyModel
    from model import ModelArgs, Transformer

    s = shapes(args)
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(ModelArgs.from_name(s["preset"])).to(dtype)
    return BalconyModel(model, [int(k) for k in s["exits"].split(",")]).eval()


def weight_reads(model) -> dict:
    """Bytes of weights a batch-1 token reads at each exit (None: full depth), full depth first, as they are held."""
    from cascade import bytes_per_token

    return {exit: bytes_per_token(model, exit) for exit in [None, *model.exit_layers]}


def decode_rows(model, rec, table: str, args, device, prompt: list, reads: dict):
    """Batch-1 tokens/s per exit and the fraction of the copy bandwidth its weights' reads (bytes per token) use."""
    from bench_generate import bench

    bw = copy_bandwidth(device, 64 if args.dry_run else 4096)
    rec["copy_bandwidth_gb_s"] = bw / 1e9
    for exit, read in reads.items():
        tps, _ = bench(model, prompt, decode_ns(args), exit=exit)
        rec.row(table, dict(exit=exit or "full", tokens_per_s=tps, weight_gb_per_token=read / 1e9,
                            bandwidth_fraction=read * tps / bw))


def step_decode_8b(args, rec, device, quantize=None):
    from generate import compile_steps

    model = random_balcony(args, device, DTYPES["bfloat16" if quantize else default_dtype(device)])
    if quantize:  # int4 in groups of 32 with a bf16 scale and zero each, 0.625 bytes a weight, the head's too
        quantize(model, "int4", 32, head="int4")
    reads = weight_reads(model)
    if device.type == "cuda":
        compile_steps()
    rec["compiled"] = device.type == "cuda"
    prompt = torch.randint(0, model.model.args.vocab_size, (32,), generator=torch.Generator().manual_seed(0))
    decode_rows(model, rec, "batch1", args, device, prompt.tolist(), reads)


def step_batch_8b(args, rec, device):
    from bench_generate import decode_rate

    model = random_balcony(args, device, DTYPES[default_dtype(device)])
    g, V = torch.Generator().manual_seed(0), model.model.args.vocab_size
    for b in [1, 8] if args.dry_run else [1, 8, 32, 128]:
        prompts = [torch.randint(0, V, (12 + i % 30,), generator=g).tolist() for i in range(b)]  # 12 to 41 tokens
        for exit in [None, *model.exit_layers]:
            rec.row("throughput", dict(batch=b, exit=exit or "full",  # 16 cells: short runs
                                       tokens_per_s=decode_rate(model, prompts, exit, decode_ns(args, 32, 1))))


def step_int4(args, rec, device):
    if not (ROOT / "quantize.py").is_file():
        rec["skipped"] = "quantize.py (weight-only int4) is not in this checkout yet"
        return
    from quantize import quantize
    step_decode_8b(args, rec, device, quantize)


def step_decode_default(args, rec, device):
    from balcony import BalconyModel
    from generate import compile_steps, generate
    from tokenizer import Tokenizer

    ckpt = Path(args.checkpoint)
    exits_file = ckpt / "balcony.safetensors"
    if not (ckpt / "model.safetensors").is_file():
        rec["skipped"] = f"no converted model in {ckpt} (python convert_hf.py --default)"
        return
    exits = BalconyModel.read_exits_file(exits_file)[0]["exit_layers"] if exits_file.is_file() else []
    tok = Tokenizer.from_checkpoint(ckpt)
    prompt = tok.encode_chat([{"role": "user", "content": "Why is the sky blue? Answer in a few sentences."}])
    n_new = decode_ns(args).max_new_tokens
    # eager greedy references before compile_steps (it swaps the steps for compiled ones in this process). fp32
    # without TF32: speculative decoding verifies k+1 tokens in one forward, which is exact only in true fp32
    torch.set_float32_matmul_precision("highest")
    models = {name: BalconyModel.from_checkpoint(ckpt, exits_file, exits, device, DTYPES[name])
              for name in dict.fromkeys(["float32", default_dtype(device)])}  # bf16 too on CUDA
    refs = {name: generate(m, [prompt], n_new)[0]["tokens"] for name, m in models.items()}
    if device.type == "cuda":
        compile_steps()
    rec["compiled"] = device.type == "cuda"
    torch.set_float32_matmul_precision("high" if device.type == "cuda" else "highest")
    m = models[default_dtype(device)]
    decode_rows(m, rec, "batch1", args, device, prompt, weight_reads(m))
    if not exits:
        rec["speculative"] = f"skipped: no trained exits in {exits_file}"
        return
    torch.set_float32_matmul_precision("highest")
    for name, m in models.items():
        r = generate(m, [prompt], n_new, draft_exit=exits[-1], speculate_k=3)[0]
        same = next((i for i, (a, b) in enumerate(zip(r["tokens"], refs[name])) if a != b), len(refs[name]))
        rec.row("speculative", dict(dtype=name, draft_exit=exits[-1], k=3, identical=r["tokens"] == refs[name],
                                    tokens_equal_before_first_difference=same, tokens=len(refs[name]),
                                    acceptance_rate=r["acceptance_rate"]))


def dry_chats(ckpt: Path, folder: Path) -> Path:
    """--dry-run's chat data: the model's own 16-token answers to bench_generate's eight questions, 6 train, 2 val."""
    from bench_generate import QUESTIONS
    from chat_data import answer
    from balcony import BalconyModel
    from tokenizer import Tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    bm = BalconyModel.from_checkpoint(ckpt, exits=[None])
    answers = answer(bm, Tokenizer.from_checkpoint(ckpt), QUESTIONS, 16, batch_size=8)
    rows = [json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
            for q, (a, _, _) in zip(QUESTIONS, answers)]
    (folder / "train.jsonl").write_text("\n".join(rows[:6]) + "\n")
    (folder / "val.jsonl").write_text("\n".join(rows[6:]) + "\n")
    return folder


def step_distill(args, rec, device):
    import train
    from balcony import BalconyModel
    from chat_data import read_chats
    from data import CHAT
    from eval import eval_heldout_chat
    from tokenizer import Tokenizer

    ckpt, chat, work = Path(args.checkpoint), Path(args.chat_data or CHAT), Path(args.work)
    if args.dry_run and (ckpt / "model.safetensors").is_file():
        chat = dry_chats(ckpt, work / "chat")
    if not (ckpt / "model.safetensors").is_file() or not (chat / "train.jsonl").is_file():
        rec["skipped"] = f"needs a converted model in {ckpt} and chats in {chat} (make demo's first steps)"
        return
    exits = "1,2,3" if args.dry_run else "15,18,21"
    # make demo's train.py call, at a GPU's batch; eager (a 135M model compiles for longer than these steps take)
    recipe = ["--exit-layers", exits, "--checkpoint", str(ckpt), "--data", str(chat), "--cache-dir",
              str(work / "tokens"), "--batch-size", str(2 if args.dry_run else args.distill_batch), "--no-compile",
              "--eval-windows", "4", "--save-every", "100000"]
    if args.dry_run:
        recipe += ["--seq-len", "64"]

    def run(name, steps, *extra):
        out = work / f"{name}.safetensors"
        code = train.main(train.parse_args([*recipe, "--max-steps", str(steps), "--eval-every", str(steps),
                                            "--out", str(out), *extra]))
        if code:
            raise RuntimeError(f"train.py returned {code}")
        return out, [r for r in map(json.loads, out.with_suffix(".log.jsonl").read_text().splitlines()) if "dt" in r]

    # a few steps give the step time, then the steps that fill --distill-minutes, with their own schedule
    _, log = run("probe", 3 if args.dry_run else 20, "--warmup-steps", "1")
    step_s = sorted(r["dt"] for r in log)[len(log) // 2]
    steps = 2 if args.dry_run else max(2, int(args.distill_minutes * 60 / step_s))
    t = time.perf_counter()
    exits_path, log = run("exits", steps, "--warmup-steps", str(max(1, steps // 15)))  # demo: 10 of 150
    r = train.parse_args(recipe)
    rec["training"] = dict(steps=steps, seconds=time.perf_counter() - t, median_step_s=step_s,
                           tokens=steps * r.batch_size * r.seq_len, batch=r.batch_size, seq_len=r.seq_len)
    # held-out chat agreement per exit: these exits, and the demo's (trained on CPU) where they exist
    tok, chats = Tokenizer.from_checkpoint(ckpt), read_chats(chat / "val.jsonl")[:4 if args.dry_run else None]
    layers = [int(k) for k in exits.split(",")]
    for name, path in (("this run", exits_path), ("demo", ckpt / "balcony.safetensors")):
        if path.is_file() and BalconyModel.read_exits_file(path)[0]["exit_layers"] == layers:
            bm = BalconyModel.from_checkpoint(ckpt, path, layers, device, DTYPES[default_dtype(device)])
            for e, r in zip(layers, eval_heldout_chat(bm, tok, chats, layers, 16)):
                rec.row("heldout_chat", dict(exits=name, exit=e, top1_agree=r["top1_agree"], kl=r["kl"],
                                             tokens=r["tokens"]))
    # the exits in bf16, one file per exit: each loads alone (generate.py --balcony), and each stays far below the
    # 16 MB a copied-back file may have (three 135M-model blocks together are 21 MB in bf16)
    bm = BalconyModel.from_checkpoint(ckpt, exits_path, layers, "cpu", torch.bfloat16)
    for e in layers:
        one = BalconyModel(bm.model, [e], kind=bm.kind)
        one.exits[str(e)].load_state_dict(bm.exits[str(e)].state_dict())
        one.save_exits(Path(args.out) / f"exit{e}.safetensors")
    rec["exits_files"] = [f"exit{e}.safetensors" for e in layers]


# ------------------------------------------------------------------------------------------------------- the runner
def dry_checkpoint(folder: Path) -> Path:
    """--dry-run's stand-in for the default model: the tiny shape with the default model's tokenizer (and vocabulary
    size), random weights and random exits 1,2,3 as its balcony.safetensors, so every default-model step runs."""
    from balcony import BalconyModel
    from model import ModelArgs, Transformer
    from tokenizer import Tokenizer
    from train import save_checkpoint

    margs = ModelArgs.from_name("tiny")
    margs.vocab_size = Tokenizer.from_checkpoint(DEFAULT_CHECKPOINT).vocab_size
    torch.manual_seed(0)
    model = Transformer(margs)
    save_checkpoint(model, DEFAULT_CHECKPOINT, folder)
    BalconyModel(model, [1, 2, 3], init="random").save_exits(folder / "balcony.safetensors")
    return folder



def run_step(name: str, args) -> dict:
    """Run one step in a fresh process (own memory, own CUDA context), killed with its children at its time box."""
    box = 120 if args.dry_run else BOXES[name]
    path = Path(args.work) / f"{name}.json"
    path.unlink(missing_ok=True)
    log = Path(args.work) / f"{name}.log"
    t = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, str(ROOT / "gpu_check.py"), *args.argv, "--step", name], stdout=f,
                             stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)  # its own process group
        try:
            code = p.wait(timeout=box)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            code = None
    out = dict(json.loads(path.read_text()) if path.is_file() else {}, seconds=round(time.perf_counter() - t, 1))
    tail = log.read_text(errors="replace").strip().splitlines()[-3:]
    if "skipped" in out:
        out["status"] = "skipped"
    elif code is None:
        out.update(status=f"timed out after {box} s (rows written before it are kept)", log_tail=tail)
    elif code:
        out.update(status=f"failed (exit {code})", log_tail=tail)
    else:
        out["status"] = "ok"
    return out


def fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def table(rows: list) -> list:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)] + \
        ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]


def summary(results: dict) -> str:
    lines = [f"# gpu_check: {results['device']}, torch {results['torch']}, {results['date']}"
             + (" (--dry-run: tiny shapes on CPU, not figures)" if results["dry_run"] else ""), ""]
    for name, r in results["steps"].items():
        lines += [f"## {name}: {r['status']} ({r['seconds']} s)"]
        lines += [f"    {line}" for line in r.get("log_tail", [])]
        scalars = {k: v for k, v in r.items() if k not in ("status", "seconds", "log_tail", "config")
                   and not isinstance(v, (list, dict))}
        lines += [", ".join(f"{k}: {fmt(v)}" for k, v in scalars.items())] if scalars else []
        for k, v in r.items():
            if isinstance(v, dict) and k != "config":
                lines += [f"{k}: " + ", ".join(f"{a}: {fmt(b)}" for a, b in v.items())]
            elif isinstance(v, list) and v and isinstance(v[0], dict):
                lines += ["", *table(v)]
            elif isinstance(v, list) and v and k != "log_tail":
                lines += [f"{k}:", *(f"    {x}" for x in v)]
        lines.append("")
    return "\n".join(lines)


def main(args) -> int:
    device = torch.device("cpu" if args.dry_run else args.device)
    out, work = Path(args.out), Path(args.work)
    if args.step:  # inside a step's process
        return getattr(sys.modules[__name__], f"step_{args.step}")(args, Record(work / f"{args.step}.json"), device)
    if device.type != "cuda" and not args.dry_run:
        raise UsageError("no CUDA device: run on a GPU, or pass --dry-run for the CPU rehearsal")
    steps = args.only.split(",") if args.only else STEPS
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise UsageError(f"unknown step(s) {unknown}; the steps are {', '.join(STEPS)}")
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    if args.dry_run and (DEFAULT_CHECKPOINT / "config.json").is_file():  # else the default-model steps say skipped
        args.argv += ["--checkpoint", str(dry_checkpoint(work / "tiny-default"))]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (--dry-run)"
    results = dict(device=name, torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   dry_run=args.dry_run, steps={})
    for step in steps:
        print(f"gpu_check: {step} ...", file=sys.stderr, flush=True)
        results["steps"][step] = run_step(step, args)
        (out / "results.json").write_text(json.dumps(results, indent=1))  # after every step: a kill keeps the rest
    md = summary(results)
    (out / "summary.md").write_text(md)
    print(md)
    return 0 if all(r["status"] in ("ok", "skipped") for r in results["steps"].values()) else 1


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = " (default: %(default)s)"
    p.add_argument("--out", default=str(ROOT / "out" / "gpu-check"), help="results.json, summary.md, exit files" + d)
    p.add_argument("--work", default=str(ROOT / "out" / "gpu-check-work"), help="scratch: logs, token cache, "
                   "training states (not for copying back)" + d)
    p.add_argument("--dry-run", action="store_true", help="every step on CPU with tiny shapes, no compile")
    p.add_argument("--only", default="", help=f"comma-separated steps to run, of {','.join(STEPS)}")
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="the default model, converted, with the "
                   "demo's exits as balcony.safetensors" + d)
    p.add_argument("--chat-data", default=None, help="chat_data.py's folder (default: data/chat)")
    p.add_argument("--distill-minutes", type=float, default=1.0, help="distill: training time after the probe" + d)
    p.add_argument("--distill-batch", type=int, default=16, help="distill: windows per step (demo: 2)" + d)
    p.add_argument("--device", default="cuda")
    p.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)  # set by the runner for a step's process
    return p


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = get_parser().parse_args(argv)
    args.argv = argv  # handed on to each step's process
    return args


if __name__ == "__main__":
    run_cli(main, parse_args)

"""
The paper's ablations (section 4.3 and appendix B, Figure 5) at one fixed budget: six train.py runs that differ from
the paper's recipe in one flag each, then per exit the held-out KL and top-1 agreement against the original full
model and ARC-Easy / PIQA accuracy (eval.py), in one table.

    OMP_NUM_THREADS=1 python ablate.py                    # SmolLM2-135M, Shakespeare, exits 15,18,21: the README's
    python ablate.py --max-steps 150 --seq-len 256 --out out/ablation-150   # train.py's default budget per run

| run      | train.py flags                               | the paper's finding (Figure 5)              |
|----------|----------------------------------------------|---------------------------------------------|
| paper    | none: a full block initialised from the last | (the reference)                             |
|          | layer, trained on Eq. 2's KL, backbone frozen |                                             |
| random   | --init random                                | init from the last layer beats random       |
| mlp      | --balcony mlp                                | a full block beats an MLP-only balcony ...  |
| attn     | --balcony attn                               | ... and an attention-only one               |
| kl+ce    | --loss kl+ce --kl-weight 0.001 --ce-weight 1 | adding CE brings nothing                    |
| unfrozen | --train-backbone                             | freezing the backbone beats training it     |

Every run sees the same steps, windows and batch (the unfrozen one costs more time per step). Outputs go to --out:
exits files, the unfrozen run's whole checkpoint folder, results.json and table.md. A trained run is not trained
again and an interrupted one resumes, so a stopped grid continues; --out refuses another budget. Scoring uses
eval.py's tasks and metrics; the frozen runs share the original backbone, so one backbone pass scores all of them.
"""
import argparse
import json
from pathlib import Path

import torch

import train
from balcony import BalconyModel, heldout_metrics
from cli import DEFAULT_CHECKPOINT, ROOT, UsageError, run_cli
from data import CORPUS, iter_batches, load_tokens
from eval import task_metrics
from fetch import fetch
from tasks import TASKS
from tokenizer import Tokenizer

RUNS = {
    "paper": [],
    "random": ["--init", "random"],
    "mlp": ["--balcony", "mlp"],
    "attn": ["--balcony", "attn"],
    "kl+ce": ["--loss", "kl+ce", "--kl-weight", "0.001", "--ce-weight", "1"],
    "unfrozen": ["--train-backbone"],
}


def run_paths(name: str, args, out: Path):
    """A run's checkpoint folder, exits file and train.py --out: the unfrozen run writes a whole checkpoint folder."""
    if "--train-backbone" in RUNS[name]:
        return out / name, out / name / "balcony.safetensors", out / name
    exits = out / f"{name}.safetensors"
    return Path(args.checkpoint), exits, exits


def train_run(name: str, args, out: Path) -> int:
    _, exits, train_out = run_paths(name, args, out)
    budget = ["--checkpoint", args.checkpoint, "--exit-layers", args.exit_layers, "--max-steps", args.max_steps,
              "--seq-len", args.seq_len, "--batch-size", args.batch_size,
              "--warmup-steps", max(1, args.max_steps // 10), "--eval-every", args.max_steps,
              "--eval-windows", 1, "--save-every", args.max_steps, "--device", args.device,  # its own checks: 1 window
              "--dtype", "float32"]  # one dtype for all six: the unfrozen run trains an fp32 backbone only
    resume = ["--resume"] if exits.with_suffix(".state.pt").is_file() else []  # an interrupted run continues
    print(f"\n== {name}: train.py {' '.join(RUNS[name])}", flush=True)
    return train.main(train.parse_args([*map(str, budget), "--data", *args.data,
                                        *RUNS[name], *resume, "--out", str(train_out)]))


class RunExit(int):
    """Exit `layer` of run `run`: the int eval.py expects of an exit, equal only to the same run's."""

    def __new__(cls, run: str, layer: int):
        e = super().__new__(cls, layer)
        e.run = run
        return e

    def __eq__(self, other):
        return isinstance(other, RunExit) and (self.run, int(self)) == (other.run, int(other))

    def __hash__(self):
        return hash((self.run, int(self)))


class SharedBackbone:
    """Several runs' exits (BalconyModels with the same exit layers) on one backbone, so that one backbone pass
    scores them all. It offers what heldout() and eval.py's scoring use of a BalconyModel: .model, .n_layers,
    .exit_layers (here RunExits) and forward_train."""

    def __init__(self, runs: dict):
        self.runs, self.first = runs, next(iter(runs.values()))
        self.model, self.n_layers = self.first.model, self.first.n_layers
        self.exit_layers = [RunExit(name, k) for name, bm in runs.items() for k in bm.exit_layers]

    def forward_train(self, idx):
        h_full, taps = self.first.backbone_taps(idx)
        return h_full, [bm.exit_hidden(k, t) for bm in self.runs.values() for k, t in zip(bm.exit_layers, taps)]


@torch.no_grad()
def heldout(bm, original: BalconyModel, val, args):
    """Per exit and full depth: KL(p_original || p) per token and top-1 agreement with the original full model, on
    the first --eval-windows held-out windows (original: the untouched model, with no exits)."""
    def batches():
        for x, y in iter_batches(val, args.seq_len, args.batch_size, bm.model.output.weight.device, args.eval_windows):
            h_full, h_exits = bm.forward_train(x)
            h_ref = h_full if bm.model is original.model else original.forward_train(x)[0]
            yield h_ref, h_exits + [h_full], y

    m = heldout_metrics(bm.model.output, batches(), teacher_output=original.model.output)
    return m["kl"], m["top1"]


def score(bm: SharedBackbone, full_name: str, original: BalconyModel, val, tok, root: Path, args) -> dict:
    """{(run, exit): {kl, top1, arc_easy, piqa}} for every exit of bm and its full depth (as (full_name, "full"))."""
    exits = bm.exit_layers + [None]
    kl, top1 = heldout(bm, original, val, args)
    acc = {t: task_metrics(bm, tok, TASKS[t].load(root, TASKS[t].shots)[:args.limit], exits, 16, desc=t)
           for t in ("arc_easy", "piqa")}
    keys = [(e.run, str(int(e))) for e in bm.exit_layers] + [(full_name, "full")]
    return {key: dict(kl=kl[i], top1=top1[i], **{t: acc[t][i]["acc"] for t in acc}) for i, key in enumerate(keys)}


def table(rows: dict, limit: int) -> str:
    """Figure 5 as rows: per run and exit, held-out KL and agreement with the original full model, ARC-E and PIQA
    accuracy. Full depth is the original model's, and the unfrozen run's own (the frozen runs keep the original)."""
    head = ["run", "exit", "held-out KL to original", "top-1 agreement", f"ARC-E acc (n={limit})",
            f"PIQA acc (n={limit})", "avg acc"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (run, e), r in rows.items():
        arc, piqa = 100 * r["arc_easy"], 100 * r["piqa"]
        lines.append(f"| {run} | {e} | {r['kl']:.3f} | {r['top1']:.1%} | {arc:.1f} | {piqa:.1f} | "
                     f"{(arc + piqa) / 2:.1f} |")
    return "\n".join(lines)


def open_grid(args, known: dict, budget_keys) -> tuple:
    """The --runs list (each one of `known`) and the --out folder, stamped with the budget (the args named by
    budget_keys): a folder holding runs of another budget is refused, so reruns only ever continue a grid."""
    runs = [r for r in args.runs.split(",") if r]
    unknown = [r for r in runs if r not in known]
    if unknown or not runs:
        raise UsageError(f"unknown run(s) {unknown or args.runs!r}; known: {', '.join(known)}")
    out = Path(args.out)
    budget = json.loads(json.dumps({k: getattr(args, k) for k in budget_keys}, default=str))
    if (out / "budget.json").is_file() and json.loads((out / "budget.json").read_text()) != budget:
        raise UsageError(f"{out} holds runs trained with {(out / 'budget.json').read_text()}; use another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "budget.json").write_text(json.dumps(budget))
    return runs, out


def main(args):
    runs, out = open_grid(args, RUNS, ("checkpoint", "exit_layers", "max_steps", "seq_len", "batch_size", "data"))
    for name in runs:
        if not run_paths(name, args, out)[1].is_file():
            code = train_run(name, args, out)
            if code:
                return code  # stopped (Ctrl-C): the state is saved, run again to continue

    print("\n== scoring", flush=True)
    original = BalconyModel.from_checkpoint(args.checkpoint, exits=[None], device=args.device)
    tok = Tokenizer.from_checkpoint(args.checkpoint)
    val = load_tokens(args.data, tok, "val")
    root = Path(args.evals_dir) if args.evals_dir else fetch("evals")
    rows, frozen = {}, {}
    for name in runs:
        ckpt, exits, _ = run_paths(name, args, out)
        if ckpt == Path(args.checkpoint):  # frozen runs share the original backbone: one pass scores them all
            frozen[name] = BalconyModel.from_exits_file(original.model, exits)
        else:
            rows.update(score(SharedBackbone({name: BalconyModel.from_checkpoint(ckpt, exits, device=args.device)}),
                              name, original, val, tok, root, args))
    if frozen:
        rows.update(score(SharedBackbone(frozen), "original model", original, val, tok, root, args))
    rows = dict(sorted(rows.items(), key=lambda kv: ([*runs, "original model"].index(kv[0][0]), kv[0][1] == "full")))
    (out / "results.json").write_text(json.dumps({f"{r} {e}": v for (r, e), v in rows.items()}, indent=1))
    md = table(rows, args.limit)
    (out / "table.md").write_text(md + "\n")
    print(f"\n{args.max_steps} steps x {args.batch_size} x {args.seq_len} tokens per run:\n{md}")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = " (default: %(default)s)"
    p.add_argument("--runs", default=",".join(RUNS), help="comma-separated runs" + d)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="converted model folder" + d)
    p.add_argument("--exit-layers", default="15,18,21", help="balcony layers" + d)
    p.add_argument("--max-steps", type=int, default=8, help="optimiser steps per run" + d)
    p.add_argument("--seq-len", type=int, default=128, help="tokens per window" + d)
    p.add_argument("--batch-size", type=int, default=2, help="windows per step" + d)
    p.add_argument("--data", nargs="+", default=[str(CORPUS)], help="train.py's --data (default: the Shakespeare "
                   "plays, as the README's table was measured; train.py's own default is the chat data)")
    p.add_argument("--eval-windows", type=int, default=8, help="held-out windows for KL and agreement" + d)
    p.add_argument("--limit", type=int, default=200, help="ARC-Easy and PIQA examples" + d)
    p.add_argument("--evals-dir", default=None, help="eval.py's --evals-dir (default: python fetch.py evals's)")
    p.add_argument("--out", default=ROOT / "out" / "ablation", help="runs, scores and table.md" + d)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def parse_args(argv=None):
    p = get_parser()
    args = p.parse_args(argv)
    for name in ("max_steps", "seq_len", "batch_size", "eval_windows", "limit"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


if __name__ == "__main__":
    run_cli(main, parse_args)

"""
Load test of serve.py: open-loop Poisson arrivals at rising rates, on loopback, for each policy (full depth, a fixed
exit, @auto with a budget), through the official openai client, streaming.

Per run: throughput (output tokens/s), time to first token and time per output token (p50, p95), the share of
requests per exit at admission and of @auto requests moved shallower mid-stream, the mean depth of the tokens, and
the quality of the mix: the held-out chat top-1 agreement with full depth of the exits served, weighted by the
tokens each served (eval.py --tasks heldout_chat's numbers, read from its --json file). TTFT is the
time to the first streamed chunk, sent when the prefill has made the first token; TPOT is (last chunk - first chunk) /
(tokens - 1), as vLLM's benchmark_serving measures them. Prompts are the held-out chats' questions (chat_data.py);
every request decodes --max-tokens tokens (ignore_eos, as vLLM's benchmark does), so each exit does the same work.

    python eval.py --exits 15,18,21,full --tasks heldout_chat --json out/eval_heldout.json
    python bench_serve.py --tpot-ms 150 --rates 0.25,1,2,4 --quality out/eval_heldout.json --plot docs/serving.png
"""
import argparse
import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from cli import DEFAULT_CHECKPOINT, ROOT, UsageError, add_quantize_args, run_cli


def percentile(xs: list, q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))] if xs else float("nan")


async def one_request(client, model: str, question: str, max_tokens: int) -> dict:
    import openai

    t0 = time.perf_counter()
    try:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        first = last = None
        exits, depths = {}, []  # content chunks per exit served: an @auto request may move shallower mid-stream
        async for chunk in stream:
            last = time.perf_counter()
            first = first or last
            tokens = chunk.usage.completion_tokens if chunk.usage else None
            if chunk.choices and chunk.choices[0].delta.content:
                label = chunk.model.rpartition("@")[2] if "@" in chunk.model else "full"
                exits[label] = exits.get(label, 0) + 1
                depths.append(chunk.model_extra["exit"])
    except openai.RateLimitError:
        return dict(rejected=True)
    return dict(rejected=False, ttft=first - t0, tpot=(last - first) / (tokens - 1) if tokens > 1 else None,
                tokens=tokens, exit=next(iter(exits)), exits=exits, depth=sum(depths) / len(depths))


async def run_load(base_url: str, model: str, rate: float, n: int, duration: float, questions: list,
                   max_tokens: int, seed: int) -> tuple:
    """Open loop: requests leave at Poisson times whatever the server does, up to n or for `duration` seconds."""
    import random

    import openai

    rng = random.Random(seed)
    client = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)
    t0, at, tasks = time.perf_counter(), 0.0, []
    for i in range(n):
        at += rng.expovariate(rate)
        if at > duration:
            break
        await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
        tasks.append(asyncio.create_task(one_request(client, model, questions[i % len(questions)], max_tokens)))
    results = await asyncio.gather(*tasks)
    await client.close()
    return results, time.perf_counter() - t0


def summarize(results: list, wall: float, agreement: dict) -> dict:
    ok = [r for r in results if not r["rejected"]]
    tokens = sum(r["tokens"] for r in ok)
    by_exit = {}  # tokens served at each exit, a request's split by its chunks
    for r in ok:
        for e, c in r["exits"].items():
            by_exit[e] = by_exit.get(e, 0) + r["tokens"] * c / sum(r["exits"].values())
    share = {e: sum(r["exit"] == e for r in ok) / len(ok) for e in {r["exit"] for r in ok}}  # at admission
    tpot = [r["tpot"] for r in ok if r["tpot"] is not None]
    quality = (sum(agreement[e] * t for e, t in by_exit.items()) / tokens if agreement and all(e in agreement
                                                                                            for e in by_exit)
               else None)
    return dict(requests=len(results), rejected=len(results) - len(ok), tokens=tokens, wall_s=wall,
                tokens_per_s=tokens / wall, ttft_p50=percentile([r["ttft"] for r in ok], 50),
                ttft_p95=percentile([r["ttft"] for r in ok], 95), tpot_p50=percentile(tpot, 50),
                tpot_p95=percentile(tpot, 95), share=share, moved=sum(len(r["exits"]) > 1 for r in ok) / len(ok),
                mean_depth=sum(r["depth"] for r in ok) / len(ok), agreement=quality)


def verdict(rows: list, budget_s: float) -> list:
    """The target, checked: at each rate, full depth's p95 TPOT against the budget and @auto's; at the lowest rate,
    @auto's share of full-depth requests."""
    by = {(r["policy"], r["rate"]): r for r in rows}
    rates = sorted({r["rate"] for r in rows})
    lines = []
    for rate in rates:
        full, auto = by.get(("full", rate)), by.get(("auto", rate))
        if full and auto:
            within = "within" if auto["tpot_p95"] <= budget_s else "over"
            lines.append(f"rate {rate:g}/s: full depth p95 TPOT {full['tpot_p95'] / budget_s:.2f}x the budget, "
                         f"@auto {auto['tpot_p95'] / budget_s:.2f}x ({within}), mean depth {auto['mean_depth']:.1f}")
    low = by.get(("auto", rates[0]))
    if low:
        lines.append(f"lowest rate {rates[0]:g}/s: @auto served {low['share'].get('full', 0):.0%} of its requests at "
                     f"full depth")
    return lines


def read_agreement(quality) -> dict:
    """{exit label: held-out chat top-1 agreement with full depth}, from eval.py's --json file or given inline as
    "15=30.1,18=33.3,21=44.7" (percent)."""
    if not quality:
        return {}
    if "=" in quality:
        pairs = [item.split("=") for item in quality.split(",")]
        return {"full": 1.0, **{e.strip(): float(v) / 100 for e, v in pairs}}
    if not Path(quality).is_file():
        raise UsageError(f"--quality {quality} not found; write it with: python eval.py --tasks heldout_chat "
                         f"--json {quality}")
    results = json.loads(Path(quality).read_text())["results"]
    if "heldout_chat" not in results:
        raise UsageError(f"--quality {quality} has no heldout_chat results; run eval.py with --tasks heldout_chat")
    return {e: s["top1_agree"] for e, s in results["heldout_chat"]["exits"].items()}


def plot(rows: list, budget_ms: float, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for policy in dict.fromkeys(r["policy"] for r in rows):
        rs = [r for r in rows if r["policy"] == policy]
        label = {"full": "full depth", "auto": "@auto"}.get(policy, f"exit {policy}")
        a.plot([r["rate"] for r in rs], [1000 * r["tpot_p95"] for r in rs], "o-", label=label)
        b.plot([r["rate"] for r in rs], [r["mean_depth"] for r in rs], "o-", label=label)
    a.axhline(budget_ms, color="grey", ls="--", label=f"budget {budget_ms:g} ms")
    a.set(xlabel="arrival rate (requests/s)", ylabel="p95 time per output token (ms)", title="latency")
    b.set(xlabel="arrival rate (requests/s)", ylabel="mean exit depth (layers)", title="depth served")
    a.legend()
    b.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def start_server(args) -> tuple:
    """serve.py in its own process on a free loopback port; returns (process, base url) once it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, str(ROOT / "serve.py"), "--checkpoint", str(args.checkpoint), "--port", str(port),
           "--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue), "--tpot-ms", str(args.tpot_ms),
           "--max-seq", str(args.max_seq), "--quantize", args.quantize, "--group-size", str(args.group_size),
           "--quantize-head", args.quantize_head] + (["--balcony", args.balcony] if args.balcony else [])
    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(cmd, stdout=open(args.log, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise UsageError(f"serve.py exited with code {proc.returncode}; see {args.log}")
        try:
            names = [m["id"] for m in json.loads(urllib.request.urlopen(url + "/v1/models").read())["data"]]
            return proc, url, names
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise UsageError(f"serve.py did not answer within 5 minutes; see {args.log}")


def main(args):
    from chat_data import read_chats

    rates = [float(r) for r in args.rates.split(",")]
    agreement = read_agreement(args.quality)
    questions = [msgs[-2]["content"] for msgs in read_chats(Path(args.chat_data))]  # the user turns
    proc, url, names = start_server(args)
    name = names[0]
    policies = args.policies.split(",")
    model_ids = {p: name if p == "full" else f"{name}@{p}" for p in policies}
    missing = [m for m in model_ids.values() if m not in names]
    rows = []
    try:
        if missing:
            raise UsageError(f"the server has no {missing}; it serves {names}")
        asyncio.run(run_load(url + "/v1", name, 10.0, 2, 1.0, questions, 4, 0))  # warm-up
        for rate in rates:
            for policy in policies:
                results, wall = asyncio.run(run_load(url + "/v1", model_ids[policy], rate, args.requests,
                                                     args.duration, questions, args.max_tokens, args.seed))
                row = dict(policy=policy, rate=rate, **summarize(results, wall, agreement))
                rows.append(row)
                print(json.dumps(row), flush=True)
                time.sleep(1)  # let the last rows leave before the next run
        metrics = urllib.request.urlopen(url + "/metrics").read().decode()
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the server drains and exits
        proc.wait(30)
    print("\n| policy | rate (req/s) | requests (429) | tokens/s | TTFT p50 / p95 (s) | TPOT p50 / p95 (ms) | "
          "requests per exit at admission | moved shallower | mean depth | chat agreement of the mix |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        share = ", ".join(f"{e}: {s:.0%}" for e, s in sorted(r["share"].items(), key=lambda x: str(x[0])))
        q = "" if r["agreement"] is None else f"{100 * r['agreement']:.1f}%"
        print(f"| {r['policy']} | {r['rate']:g} | {r['requests']} ({r['rejected']}) | {r['tokens_per_s']:.1f} | "
              f"{r['ttft_p50']:.2f} / {r['ttft_p95']:.2f} | {1000 * r['tpot_p50']:.0f} / {1000 * r['tpot_p95']:.0f} | "
              f"{share} | {r['moved']:.0%} | {r['mean_depth']:.1f} | {q} |")
    keys = ("auto", "speed", "arrivals", "prefill", "demoted")
    print("\n" + "\n".join(line for line in metrics.splitlines() if any(k in line for k in keys)))
    for line in verdict(rows, args.tpot_ms / 1000):
        print(line)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(args=vars(args), rows=rows, metrics=metrics), indent=2,
                                              default=str))
    if args.plot:
        plot(rows, args.tpot_ms, args.plot)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="converted model folder")
    p.add_argument("--balcony", default=None, help="trained exits (default: <checkpoint>/balcony.safetensors)")
    p.add_argument("--policies", default="full,21,auto", help="model ids after the @: full, an exit, auto")
    p.add_argument("--rates", default="0.25,1,2,4", help="arrival rates to run, requests/s")
    p.add_argument("--requests", type=int, default=24, help="requests per run at most")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals per run at most")
    p.add_argument("--max-tokens", type=int, default=48, help="per request")
    p.add_argument("--tpot-ms", type=float, default=150.0, help="@auto's budget, passed to serve.py")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--max-seq", type=int, default=512)
    add_quantize_args(p)  # passed to serve.py
    p.add_argument("--seed", type=int, default=0, help="arrival times")
    p.add_argument("--chat-data", default=ROOT / "data" / "chat" / "val.jsonl", help="questions to ask")
    p.add_argument("--quality", default=None,
                   help="held-out chat agreement per exit: eval.py's --json file with heldout_chat results, or "
                        "15=30.1,18=33.3,21=44.7 (percent)")
    p.add_argument("--json", default=str(ROOT / "out" / "bench_serve.json"), help="write all rows here")
    p.add_argument("--plot", default=None, help="PNG of p95 TPOT and mean depth against arrival rate")
    p.add_argument("--log", default=str(ROOT / "out" / "bench_serve_server.log"), help="serve.py's output")
    return p


if __name__ == "__main__":
    run_cli(main, get_parser().parse_args)

"""gpu_check.py --dry-run: every step of the GPU run on CPU with tiny shapes, so the command cannot rot before a GPU
shows up; and the pieces of the CUDA path a CPU can check: one --dtype default, timing code that names its device."""
import json

import pytest
import torch

import bench_train
import gpu_check
from cli import default_dtype


@pytest.mark.slow
def test_dry_run_runs_every_step(tmp_path):
    out = tmp_path / "out"
    args = gpu_check.parse_args(["--dry-run", "--out", str(out), "--work", str(tmp_path / "work")])
    assert gpu_check.main(args) == 0
    steps = json.loads((out / "results.json").read_text())["steps"]
    assert list(steps) == gpu_check.STEPS
    model = (gpu_check.DEFAULT_CHECKPOINT / "config.json").is_file()  # its tokenizer, for the stand-in
    expected_skips = {"int4"} | (set() if model else {"decode_default", "distill"})
    assert {k for k, r in steps.items() if r["status"] == "skipped"} <= expected_skips
    assert all(r["status"] == "ok" for k, r in steps.items() if k not in expected_skips), steps
    assert steps["train"]["result"]["s_per_step"] > 0 and steps["train_authors"]["result"]["s_per_step"] > 0
    assert [r["exit"] for r in steps["decode_8b"]["batch1"]] == ["full", 1, 2, 3]
    assert all(0 < r["bandwidth_fraction"] for r in steps["decode_8b"]["batch1"])
    assert {r["batch"] for r in steps["batch_8b"]["throughput"]} == {1, 8}
    if model:
        rows = [(r["exits"], r["exit"]) for r in steps["distill"]["heldout_chat"]]  # the stand-in's exits as the demo's
        assert rows == [(name, e) for name in ("this run", "demo") for e in (1, 2, 3)]
        assert steps["distill"]["exits_files"] == ["exit1.safetensors", "exit2.safetensors", "exit3.safetensors"]
    # what comes back from a GPU machine: at most 8 files, none over 16 MB
    files = list(out.iterdir())
    assert len(files) <= 8 and all(f.stat().st_size < 16e6 for f in files)
    assert (out / "summary.md").read_text().startswith("# gpu_check: CPU (--dry-run)")


@pytest.mark.parametrize("script", ["eval", "demo", "chat_data", "train", "bench_generate", "bench_train", "generate"])
def test_every_script_takes_the_one_dtype_default(script):
    # eval, demo and chat_data defaulted to float32 on CUDA; every script now leaves --dtype unset and resolves it
    # with cli.default_dtype
    import importlib

    assert importlib.import_module(script).get_parser().get_default("dtype") is None
    assert default_dtype("cuda") == default_dtype(torch.device("cuda:1")) == "bfloat16"
    assert default_dtype("cpu") == "float32"


def test_cuda_timing_names_its_device(monkeypatch):
    # torch.cuda.synchronize() and the memory counters without a device act on the current one, not the run's
    calls = []
    for name in ("synchronize", "reset_peak_memory_stats", "memory_allocated", "max_memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, lambda device=None, name=name: calls.append((name, device)) or 0)
    bench_train.peak_mib(lambda: None, torch.device("cuda:1"))
    assert calls and all(d == torch.device("cuda:1") for _, d in calls), calls

"""Peak memory of one process running a whole sweep (Hydra multirun, in-process) against one job alone.

    .venv/bin/python bench/sweep_memory.py                     # tiny model at width 512, 6 methods, 4 steps each
    .venv/bin/python bench/sweep_memory.py --methods dpo ipo --steps 8

Runs ``python -m pipeline`` twice on fresh artifact stores: one job (the first method), then a multirun
of every method in ONE process (Hydra's basic launcher). Each is sampled with psutil every 0.1 s (RSS of
the pipeline process) and its kernel peak (``ru_maxrss`` from ``wait4``) is read at exit. If jobs free what they held, the sweep's peak stays near one job's; if they accumulate, it grows
with the number of jobs. The per-job line is the largest RSS sampled while that job's run folder was the
newest.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent


def main_rss(process: psutil.Process) -> int:
    """RSS of the pipeline process itself: a child it forks shares its pages, and adding the child's RSS
    would count them twice (the kernel peak below is of this process alone too)."""
    return process.memory_info().rss


def measure(command: list[str], sweep_dir: Path) -> tuple[float, float, list[float]]:
    """(kernel peak RSS GB, sampled peak GB, sampled peak GB per job)."""
    child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    process = psutil.Process(child.pid)
    peak, per_job = 0, {}
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)  # reaps it ourselves: rusage of exactly this child
        if pid:
            break
        try:
            rss = main_rss(process)
        except psutil.NoSuchProcess:
            continue
        peak = max(peak, rss)
        jobs = [p for p in sweep_dir.glob("*") if p.is_dir()] if sweep_dir.exists() else []
        if jobs:
            newest = max(jobs, key=lambda p: p.stat().st_mtime).name
            per_job[newest] = max(per_job.get(newest, 0), rss)
        time.sleep(0.1)
    if status != 0:
        raise SystemExit(f"{' '.join(command)} failed: {child.stderr.read().decode()[-3000:]}")
    kernel = usage.ru_maxrss * 1024 / 1e9  # KiB on Linux
    ordered = [per_job[k] / 1e9 for k in sorted(per_job, key=lambda k: int(k) if k.isdigit() else k)]
    return kernel, peak / 1e9, ordered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--methods", nargs="+", default=["dpo", "ipo", "hinge", "dpop", "cdpo", "robust_dpo"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--width", type=int, default=512,
                        help="tiny model width (hidden size; MLP 3x): 512 with 4 layers is ~16M parameters, so a "
                             "job's model, gradients and AdamW state weigh ~250 MB; 0 = the preset as it is")
    args = parser.parse_args()
    size = ([f"model.tiny.hidden_size={args.width}", f"model.tiny.intermediate_size={3 * args.width}",
             "model.tiny.num_layers=4"] if args.model == "tiny" and args.width else [])
    common = [f"model={args.model}", *size, "logger=none", "data.num_problems=16", "data.num_eval_items=14",
              "pairing.test_fraction=0.2", f"train.max_steps={args.steps}", "train.batch_size=2",
              "train.max_length=128", "train.max_prompt_length=64", "train.probe_pairs=2",
              "train.checkpoint_every=0", "train.progress=false", "eval.limit=3", "eval.max_gen_toks=16",
              "stages=[pair,reference,train,evaluate]"]
    with tempfile.TemporaryDirectory(prefix="bench-sweep-memory-") as directory:
        tmp = Path(directory)
        single = [sys.executable, "-m", "pipeline", *common, f"method={args.methods[0]}",
                  f"artifacts_dir={tmp / 'one'}", f"hydra.run.dir={tmp / 'one-run'}"]
        one_kernel, one_peak, _ = measure(single, tmp / "no-sweep")
        print(f"one job ({args.methods[0]}): peak RSS {one_kernel:.3f} GB (kernel), {one_peak:.3f} GB (sampled)",
              flush=True)
        sweep = [sys.executable, "-m", "pipeline", "-m", *common, f"method={','.join(args.methods)}",
                 f"artifacts_dir={tmp / 'sweep'}", f"hydra.sweep.dir={tmp / 'sweep-runs'}"]
        kernel, peak, per_job = measure(sweep, tmp / "sweep-runs")
        print(f"sweep of {len(args.methods)} jobs in one process: peak RSS {kernel:.3f} GB (kernel), "
              f"{peak:.3f} GB (sampled); {kernel / one_kernel:.2f}x one job")
        print("  peak per job (sampled, GB): " + ", ".join(f"{value:.3f}" for value in per_job))


if __name__ == "__main__":
    main()

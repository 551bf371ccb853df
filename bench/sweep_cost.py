"""Benchmark: the cost of a 3-method x 3-beta sweep, our pipeline against nine separate TRL DPOTrainer runs.

    .venv/bin/pip install -c constraints.txt "trl==1.16.0"     # bench-only extra (pyproject: [bench])
    .venv/bin/python bench/sweep_cost.py [--model smollm2_135m] [--steps 8] [--batch 4] [--max-length 256] [--precision fp32]

Methods whose loss TRL's DPOTrainer also has: dpo (TRL "sigmoid"), ipo ("ipo"), hinge ("hinge"), each
with beta in {0.1, 0.3, 1.0}. SmolLM2-135M by default (``--model tiny`` for the tiny model), the synthetic
pairing artifact's train split, same batch size, max length, steps, learning rate (AdamW, linear decay, no
warm-up, clipping 1.0), fp32 (``--precision bf16``: autocast on both sides), CPU, one process.

The headline ratio is counted from model load to save, process start-up excluded: ours = the stage wall
times of the sweep's artifact manifests (pair, reference, the nine train stages; the model stage, which
converts SmolLM2 once and which TRL does not do, is left out), TRL = the sum of its nine in-process
load-to-save times.

Ours: ONE user-facing command, a real Hydra multirun in a subprocess with a fresh, empty artifact store:
``python -m pipeline --multirun ... method=dpo,ipo,hinge method.beta=0.1,0.3,1.0 stages=[pair,reference,train]``.
Its wall time includes the interpreter start, imports, building the tiny model and generating the pairs.
Reference sequences: the sum of ``sequences_scored`` over every reference manifest in the store (the
reference stage scores every pair, train AND test split, once; the goal is one pass, 2 x pairs).

TRL: nine DPOTrainer jobs with ``precompute_ref_log_probs=False`` (the default), one after the other, each
its own process (``bench/sweep_cost.py --trl-job ...``), as a user running nine TRL jobs would. Two numbers:
launch to exit of the nine processes (comparable to ours), and the sum of the in-process part from loading
the model directory to ``save_model`` (imports and interpreter start excluded: a floor that favours TRL).
Reference sequences are counted by a forward hook on TRL's reference model (on the fly: 2 x batch x steps
per run). The model and pairs TRL gets are prepared untimed; ours builds both inside its timed command
(the tiny model's build time is printed from its manifest).

Both sides also report CPU seconds (user + sys of the processes). On a busy machine they rise with the
wall time (torch's threads spin while waiting for a core), so neither number is free of other users' load:
note the load average the script prints, and compare runs taken under similar load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.environment import apply_offline_defaults

REPO = Path(__file__).resolve().parent.parent
apply_offline_defaults(REPO / ".cache")
os.environ["WANDB_MODE"] = "disabled"

from _trl_common import dpo_config, quiet, run_trl  # noqa: E402  (bench/ is the script's directory)

TRL_LOSS = {"dpo": "sigmoid", "ipo": "ipo", "hinge": "hinge"}  # our method -> TRL loss_type
BETAS = (0.1, 0.3, 1.0)
TEST_FRACTION = 0.05
PAIRS_PER_PROBLEM = 1.45  # synthetic_math's default kind mix (conf/data/synthetic_math.yaml)


def run_measured(command: list[str]) -> tuple[float, float, subprocess.CompletedProcess]:
    """Wall seconds and CPU seconds (user + sys of the child and its descendants) of one command.

    RUSAGE_CHILDREN counts every child this process has waited for, so the delta is this command's.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done


def shared_overrides(args) -> list[str]:
    """Everything but method, beta, stages and paths: the same for ours and the untimed preparation."""
    return [f"model={args.model}", f"data.num_problems={args.problems}", f"pairing.test_fraction={TEST_FRACTION}",
            f"train.precision={args.precision}", f"train.max_length={args.max_length}",
            f"train.max_prompt_length={args.max_length // 2}", f"train.batch_size={args.batch}",
            f"train.max_steps={args.steps}", f"train.lr={args.lr}", "train.warmup_ratio=0", "train.schedule=linear",
            "train.max_grad_norm=1.0", "train.probe_pairs=0", "train.checkpoint_every=0", "train.progress=false", "logger=none"]


def prepare_inputs(args, tmp: Path):
    """Untimed: the tiny model directory and the pairs, from the same config as ours (same artifact keys)."""
    import pandas as pd
    from hydra import compose, initialize_config_dir

    from pipeline.orchestration.orchestrate import Run

    root = tmp / "prepared"
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"artifacts_dir={root}", "method=dpo", *shared_overrides(args)])
    run = Run(cfg, tmp / "prepared-run")
    pair = run.get("pair")
    pairs = pd.read_parquet(pair.path / "pairs.parquet")
    return run.artifacts["model"].path / "model", pair.path / "pairs.parquet", pairs, pair.key


def time_ours(args, tmp: Path) -> tuple[list[str], float, float, Path]:
    root, sweep_dir = tmp / "ours-artifacts", tmp / "ours-sweep"
    command = [sys.executable, "-m", "pipeline", "--multirun", f"method={','.join(TRL_LOSS)}",
               f"method.beta={','.join(map(str, BETAS))}", "stages=[pair,reference,train]", *shared_overrides(args),
               f"artifacts_dir={root}", f"hydra.sweep.dir={sweep_dir}", "sweep_name=bench_sweep_cost"]
    seconds, cpu, done = run_measured(command)
    if done.returncode != 0:
        raise SystemExit(f"our sweep failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    records = [json.loads(path.read_text()) for path in sorted(sweep_dir.glob("*/run.json"))]
    failed = [r for r in records if r["status"] != "ok"]
    if len(records) != len(TRL_LOSS) * len(BETAS) or failed:
        raise SystemExit(f"our sweep: {len(records)} job records, {len(failed)} failed")
    return command, seconds, cpu, root


def reference_sequences(root: Path) -> tuple[int, int]:
    """(sum of sequences_scored over every reference artifact of the store, number of reference artifacts)."""
    manifests = [json.loads(path.read_text()) for path in (root / "reference").glob("*/manifest.json")]
    return sum(int(m["sequences_scored"]) for m in manifests), len(manifests)


def trl_job(args) -> None:
    """One TRL job (child process): train on the train split, write its timing and reference count as JSON."""
    import pandas as pd

    quiet()
    pairs = pd.read_parquet(args.pairs)
    out = Path(args.out)
    config = dpo_config(out, batch=args.batch, max_length=args.max_length, beta=args.beta,
                        loss_type=TRL_LOSS[args.method], lr=args.lr, max_steps=args.steps, bf16=args.precision == "bf16")
    result = run_trl(Path(args.model_dir), pairs[pairs["split"] == "train"], config, out)
    (out / "result.json").write_text(json.dumps({"seconds": result.seconds, "reference_rows": result.reference_rows}))


def time_trl(args, model_dir: Path, pairs_file: Path, tmp: Path) -> tuple[float, float, float, int]:
    """Nine TRL processes: (launch-to-exit seconds, CPU seconds, in-process load-to-save seconds, reference rows)."""
    process_s, cpu_s, inner_s, rows = 0.0, 0.0, 0.0, 0
    for method in TRL_LOSS:
        for beta in BETAS:
            out = Path(tempfile.mkdtemp(dir=tmp, prefix=f"trl-{method}-{beta}-"))
            command = [sys.executable, str(Path(__file__).resolve()), "--trl-job", "--method", method, "--beta",
                       str(beta), "--steps", str(args.steps), "--batch", str(args.batch), "--max-length",
                       str(args.max_length), "--lr", str(args.lr), "--precision", args.precision,
                       "--model-dir", str(model_dir), "--pairs",
                       str(pairs_file), "--out", str(out)]
            seconds, cpu, done = run_measured(command)
            if done.returncode != 0:
                raise SystemExit(f"TRL job {method} beta {beta} failed:\n{done.stderr[-3000:]}")
            result = json.loads((out / "result.json").read_text())
            process_s += seconds
            cpu_s += cpu
            inner_s += result["seconds"]
            rows += result["reference_rows"]
            print(f"  TRL {method:5s} beta {beta}: {seconds:6.2f} s process, {cpu:6.2f} s CPU ({result['seconds']:6.2f} s load to save), "
                  f"{result['reference_rows']} reference sequences", flush=True)
    return process_s, cpu_s, inner_s, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2_135m", help="model preset (smollm2_135m or tiny)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="both sides")
    parser.add_argument("--steps", type=int, default=8, help="optimiser steps per job")
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per sequence (prompt budget: half)")
    parser.add_argument("--lr", type=float, default=5e-6, help="peak learning rate")
    parser.add_argument("--problems", type=int, default=None,
                        help="synthetic problems (default: enough for one epoch of steps x batch train pairs)")
    child = parser.add_argument_group("one TRL job (internal: the benchmark starts these itself)")
    child.add_argument("--trl-job", action="store_true", help=argparse.SUPPRESS)
    for name in ("--method", "--model-dir", "--pairs", "--out"):
        child.add_argument(name, help=argparse.SUPPRESS)
    child.add_argument("--beta", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_job:
        return trl_job(args)
    if args.problems is None:
        args.problems = math.ceil(args.steps * args.batch / (PAIRS_PER_PROBLEM * (1 - TEST_FRACTION)))
    flags = f"--model {args.model} --precision {args.precision} --steps {args.steps} --batch {args.batch} --max-length {args.max_length} --lr {args.lr} --problems {args.problems}"
    print(f"command: .venv/bin/python bench/sweep_cost.py {flags}")
    print(f"load average (1/5/15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}, {os.cpu_count()} CPUs", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as directory:
        tmp = Path(directory)
        model_dir, pairs_file, pairs, pair_key = prepare_inputs(args, tmp)
        n_train = int((pairs["split"] == "train").sum())
        print(f"{args.model}, {len(pairs)} pairs ({n_train} train), {len(TRL_LOSS)} methods x {len(BETAS)} betas, "
              f"{args.steps} steps x batch {args.batch}, max_length {args.max_length}, {args.precision}, CPU", flush=True)
        if n_train < args.steps * args.batch:
            print(f"  note: {args.steps * args.batch} pairs per job > {n_train} train pairs: both sides loop")

        command, ours_s, ours_cpu, root = time_ours(args, tmp)
        print("ours: " + shlex.join(["python", *command[1:]]).replace(str(tmp), "$TMP"))
        ours_rows, reference_artifacts = reference_sequences(root)
        same_pairs = (root / "pair" / pair_key / "manifest.json").is_file()
        stage_s = {stage: sum(json.loads(m.read_text())["wall_time_s"] for m in (root / stage).glob("*/manifest.json"))
                   for stage in ("model", "pair", "reference", "train")}
        print(f"  ours {ours_s:.2f} s, {ours_cpu:.2f} s CPU: " + ", ".join(f"{k} {v:.2f} s" for k, v in stage_s.items())
              + f" (stage times from the manifests, train summed over 9 jobs; the rest is start-up and Hydra)")
        print(f"  {reference_artifacts} reference artifact(s), {ours_rows} reference sequences "
              f"(pairs identical to TRL's input: {same_pairs})", flush=True)

        trl_s, trl_cpu, trl_inner_s, trl_rows = time_trl(args, model_dir, pairs_file, tmp)
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    one_pass = 2 * len(pairs)
    expected_trl = 2 * args.batch * args.steps * len(TRL_LOSS) * len(BETAS)
    print()
    ours_inner_s = stage_s["pair"] + stage_s["reference"] + stage_s["train"]
    print(f"| 9-job sweep ({args.model}, {args.precision}, CPU)        | ours     | TRL x 9  | TRL / ours |")
    print("|-----------------------------------------------|----------|----------|------------|")
    print(f"| wall time, model load to save (headline)      | {ours_inner_s:6.1f} s | {trl_inner_s:6.1f} s "
          f"| {trl_inner_s / ours_inner_s:9.2f}x |")
    print(f"| wall time, launch to exit                     | {ours_s:6.1f} s | {trl_s:6.1f} s | {trl_s / ours_s:9.2f}x |")
    print(f"| CPU time (user + sys), launch to exit         | {ours_cpu:6.1f} s | {trl_cpu:6.1f} s "
          f"| {trl_cpu / ours_cpu:9.2f}x |")
    print(f"| sequences through the reference model         | {ours_rows:8d} | {trl_rows:8d} "
          f"| {trl_rows / max(ours_rows, 1):9.2f}x |")
    print()
    ratio = trl_inner_s / ours_inner_s
    print(f"model load to save: ours {ratio:.2f}x faster than nine TRL jobs (goal >= 2x) {'OK' if ratio >= 2 else 'MISSED'}; "
          f"launch to exit {trl_s / ours_s:.2f}x; CPU time {trl_cpu / ours_cpu:.2f}x")
    print(f"reference: ours {ours_rows} = one pass over all {len(pairs)} pairs, train and test (2 x pairs = {one_pass}) "
          f"{'OK' if ours_rows == one_pass else 'MISSED'}; TRL {trl_rows} "
          f"(on the fly, 2 x batch x steps x 9 = {expected_trl})")


if __name__ == "__main__":
    main()

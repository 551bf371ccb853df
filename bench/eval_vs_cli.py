"""Benchmark: our evaluate stage vs the bare `lm_eval` command line, same model dir and task files.

Both sides run as fresh processes (imports and model loading included):
- ours: ``python -m pipeline stages=[evaluate] ...`` with the upstream artifacts cached and the
  evaluation artifact removed before each repetition (so lm-eval really runs; for the base model the
  preference metrics reuse the cached reference scores);
- CLI:  ``lm_eval run --model hf --model_args pretrained=<model artifact>/model,dtype=float32
  --include_path <eval_suite artifact>/tasks --tasks local_mc,local_gen --batch_size 8 --limit N``.
Repetitions alternate the two sides; the ratio is median(ours) / median(CLI) (goal <= 1.1). The
scores of both sides are printed too: they must agree, since the tasks and model are the same.

    python bench/eval_vs_cli.py [--model smollm2_135m] [--limit 32] [--repeats 2] [--store DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TASKS = ("local_mc", "local_gen")


def environment(store: Path) -> dict[str, str]:
    env = dict(os.environ)
    for name, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
                        "TOKENIZERS_PARALLELISM": "false", "HF_HOME": str(REPO / ".cache" / "hf")}.items():
        env.setdefault(name, value)
    return env


def pipeline_command(args, store: Path, run_dir: Path, stages: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", f"stages=[{stages}]", f"model={args.model}", "logger=none",
            f"artifacts_dir={store}", f"eval.limit={args.limit}", f"eval.batch_size={args.batch_size}",
            f"hydra.run.dir={run_dir}"]


def timed(command: list[str], env: dict[str, str], log: Path) -> float:
    started = time.perf_counter()
    with log.open("w") as handle:
        subprocess.run(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2_135m", help="model config (conf/model/), e.g. tiny")
    parser.add_argument("--limit", type=int, default=32, help="test items per task")
    parser.add_argument("--batch_size", type=int, default=8, help="lm-eval batch size on both sides")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per side (alternating)")
    parser.add_argument("--store", type=Path, default=REPO / ".cache" / "bench-eval-store", help="artifact store")
    args = parser.parse_args()
    store = args.store.resolve()
    logs = store / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = environment(store)

    # Upstream artifacts (model, pair, reference) and one evaluation, untimed: also a warm-up of both caches.
    prep_dir = store / "runs" / "prep"
    subprocess.run(pipeline_command(args, store, prep_dir, "evaluate"), cwd=REPO, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    record = json.loads((prep_dir / "run.json").read_text())
    evaluation = Path(record["artifacts"]["evaluate"]["path"])
    manifest = json.loads((evaluation / "manifest.json").read_text())
    suite_tasks = Path(manifest["suite"]["path"]) / "tasks"
    model_dir = Path(record["artifacts"]["model"]["path"]) / "model"
    device = "cuda" if _cuda() else "cpu"
    cli_output = store / "cli-output"
    cli = [str(Path(sys.executable).parent / "lm_eval"), "run", "--model", "hf",
           "--model_args", f"pretrained={model_dir},dtype=float32", "--tasks", ",".join(TASKS),
           "--include_path", str(suite_tasks), "--batch_size", str(args.batch_size), "--limit", str(args.limit),
           "--device", device, "--log_samples", "--output_path", str(cli_output)]

    ours_times, cli_times = [], []
    for repeat in range(args.repeats):
        shutil.rmtree(evaluation, ignore_errors=True)  # force a real evaluation; upstream stays cached
        ours_times.append(timed(pipeline_command(args, store, store / "runs" / f"ours-{repeat}", "evaluate"), env,
                                logs / f"ours-{repeat}.log"))
        shutil.rmtree(cli_output, ignore_errors=True)
        cli_times.append(timed(cli, env, logs / f"cli-{repeat}.log"))
        print(f"repeat {repeat}: ours {ours_times[-1]:.1f} s, lm_eval CLI {cli_times[-1]:.1f} s", flush=True)

    ours_scores = json.loads((evaluation / "scores.json").read_text())["tasks"]
    cli_results = json.loads(next(cli_output.rglob("results_*.json")).read_text())["results"]
    print("\ncommand (ours):", " ".join(pipeline_command(args, store, Path("<run dir>"), "evaluate")))
    print("command (CLI): ", " ".join(cli))
    for task in TASKS:
        cli_flat = {k.replace(",none", "").replace(",", "_"): v for k, v in cli_results[task].items()
                    if isinstance(v, float) and "stderr" not in k}
        ours_flat = {k: v for k, v in ours_scores[task].items() if "stderr" not in k}
        print(f"{task}: ours {ours_flat} | CLI {cli_flat}")
    ratio = statistics.median(ours_times) / statistics.median(cli_times)
    print(f"\nmodel={args.model} limit={args.limit} batch_size={args.batch_size} device={device} repeats={args.repeats}")
    print(f"median wall time: ours {statistics.median(ours_times):.1f} s, lm_eval CLI {statistics.median(cli_times):.1f} s, "
          f"ratio {ratio:.2f}x (goal <= 1.1x)")


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()

"""Benchmark: our train stage against TRL's DPOTrainer on CPU, and the peak RSS of one SmolLM2 step.

    .venv/bin/pip install -c constraints.txt "trl==1.16.0"     # bench-only extra (pyproject: [bench])
    .venv/bin/python bench/train_vs_trl.py [--problems 200] [--batch 8] [--max-length 256] [--repeats 2]
    .venv/bin/python bench/train_vs_trl.py --rss-only          # just the SmolLM2 memory check

Same tiny model (conf/model/tiny.yaml), same training pairs (split == train of the synthetic data),
same batch size, max length, optimiser (AdamW, linear decay, no warm-up, clipping 1.0), one epoch, DPO
with beta 0.1, fp32, one process. Throughput is training pairs per second of wall time, best of
``--repeats`` (the machine is shared, so the best run is the least disturbed one):

(a) reference on the fly, end to end from the model directory to the saved model.
    Ours: the reference stage (scores every pair once) + the train stage (load, tokenise, train,
    save). TRL: DPOTrainer construction (load, tokenise, reference copy) + ``train()`` (a reference
    forward on every step) + ``save_model``.
(b) reference precomputed. Ours: the train stage alone (the reference artifact already exists).
    TRL: ``precompute_ref_log_probs=True``; its construction (tokenising and precomputing) is NOT
    timed, only ``train()`` + ``save_model`` (this favours TRL: our stage's tokenising is timed).

Goal: ours >= 1.25x TRL in both. Memory: peak RSS of the whole ``python -m pipeline stages=[train]``
process (imports, model load, one optimiser step) with SmolLM2-135M, 8 pairs x 128 tokens, bf16
autocast; goal <= 4.7 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.environment import apply_offline_defaults

REPO = Path(__file__).resolve().parent.parent
apply_offline_defaults(REPO / ".cache")
os.environ["WANDB_MODE"] = "disabled"

from hydra import compose, initialize_config_dir  # noqa: E402

from pipeline.orchestrate import Run  # noqa: E402

from _trl_common import dpo_config, quiet, run_trl  # noqa: E402  (bench/ is the script's directory)


def compose_cfg(root: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"artifacts_dir={root}", "logger=none", *overrides])


def common_overrides(args) -> list[str]:
    return ["model=tiny", f"data.num_problems={args.problems}", "pairing.test_fraction=0.05", "method=dpo",
            "method.beta=0.1", "train.precision=fp32", f"train.max_length={args.max_length}",
            f"train.max_prompt_length={args.max_length // 2}", f"train.batch_size={args.batch}",
            "train.max_steps=null", "train.epochs=1", "train.lr=5e-6", "train.warmup_ratio=0", "train.schedule=linear",
            "train.max_grad_norm=1.0", "train.probe_pairs=0", "train.checkpoint_every=0", "train.progress=false"]


def fresh_store(base: Path, tmp: Path, keep: tuple[str, ...]) -> Path:
    root = Path(tempfile.mkdtemp(dir=tmp))
    for stage in keep:
        shutil.copytree(base / stage, root / stage)
    return root


def time_ours(cfg, stages: list[str]) -> float:
    run = Run(cfg, Path(tempfile.mkdtemp()))
    for stage in ("model", "pair", "reference"):
        if stage not in stages:
            run.get(stage)  # cache hits, not timed
    started = time.perf_counter()
    for stage in stages:
        run.get(stage)
    return time.perf_counter() - started


def time_trl(model_dir: Path, pairs, args, precompute: bool, out: Path) -> float:
    quiet()
    config = dpo_config(out, batch=args.batch, max_length=args.max_length, beta=0.1, loss_type="sigmoid",
                        precompute=precompute)
    # (b): tokenising and precomputing are not timed
    return run_trl(model_dir, pairs, config, out, time_construction=not precompute).seconds


def throughput(args, tmp: Path) -> None:
    import pandas as pd

    base = tmp / "base"
    cfg = compose_cfg(base, *common_overrides(args))
    run = Run(cfg, tmp / "run")
    for stage in ("model", "pair", "reference"):
        run.get(stage)
    pairs = pd.read_parquet(run.artifacts["pair"].path / "pairs.parquet")
    train_pairs = pairs[pairs["split"] == "train"]
    manifest = json.loads((run.artifacts["reference"].path / "manifest.json").read_text())
    n = len(train_pairs)
    print(f"tiny model, {n} training pairs, batch {args.batch}, max_length {args.max_length}, one epoch, CPU "
          f"(truncated responses: {manifest.get('chosen_truncated')} chosen / {manifest.get('rejected_truncated')} rejected)")
    model_dir = run.artifacts["model"].path / "model"
    results: dict[str, list[float]] = {"ours_a": [], "trl_a": [], "ours_b": [], "trl_b": []}
    for repeat in range(args.repeats):
        root = fresh_store(base, tmp, ("model", "pair"))
        results["ours_a"].append(time_ours(compose_cfg(root, *common_overrides(args)), ["reference", "train"]))
        root = fresh_store(base, tmp, ("model", "pair", "reference"))
        results["ours_b"].append(time_ours(compose_cfg(root, *common_overrides(args)), ["train"]))
        results["trl_a"].append(time_trl(model_dir, train_pairs, args, False, Path(tempfile.mkdtemp(dir=tmp))))
        results["trl_b"].append(time_trl(model_dir, train_pairs, args, True, Path(tempfile.mkdtemp(dir=tmp))))
        print(f"  repeat {repeat}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in results.items()), flush=True)
    rate = {k: n / min(v) for k, v in results.items()}
    for label, key in (("(a) reference on the fly", "a"), ("(b) reference precomputed", "b")):
        ratio = rate[f"ours_{key}"] / rate[f"trl_{key}"]
        print(f"{label}: ours {rate[f'ours_{key}']:.1f} pairs/s, TRL {rate[f'trl_{key}']:.1f} pairs/s, "
              f"ratio {ratio:.2f}x (goal >= 1.25x) {'OK' if ratio >= 1.25 else 'MISSED'}")


def peak_rss(tmp: Path) -> None:
    """Peak RSS of one SmolLM2 training step (8 pairs x 128 tokens, bf16 autocast) in its own process."""
    root = REPO / ".cache" / "bench-artifacts"
    overrides = ["model=smollm2_135m", "data.num_problems=10", "train.precision=bf16", "train.max_length=128",
                 "train.max_prompt_length=64", "train.batch_size=8", "train.max_steps=1", "train.probe_pairs=0",
                 "train.checkpoint_every=0", "train.progress=false", "logger=none", f"artifacts_dir={root}",
                 f"hydra.run.dir={tmp / 'rss-run'}", "train.lr=1e-6"]
    prepare = [sys.executable, "-m", "pipeline", "stages=[pair,reference]", *overrides]
    subprocess.run(prepare, cwd=REPO, check=True, capture_output=True)
    shutil.rmtree(root / "train", ignore_errors=True)  # always measure a real step, never a cache hit
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "stages=[train]", *overrides], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)  # rusage of exactly this child
    if status != 0:
        raise SystemExit(f"train step failed: {process.stderr.read().decode()[-2000:]}")
    gigabytes = usage.ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux
    print(f"SmolLM2-135M, one step of 8 pairs x 128 tokens, bf16 autocast: peak RSS {gigabytes:.2f} GB "
          f"(goal <= 4.7 GB) {'OK' if gigabytes <= 4.7 else 'MISSED'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", type=int, default=200, help="synthetic problems (~1.45 pairs each)")
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per sequence (prompt budget: half)")
    parser.add_argument("--repeats", type=int, default=2, help="timed repetitions; the best one counts")
    parser.add_argument("--rss-only", action="store_true", help="only the SmolLM2 peak-RSS check")
    parser.add_argument("--skip-rss", action="store_true", help="skip the SmolLM2 peak-RSS check")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as directory:
        tmp = Path(directory)
        if not args.rss_only:
            throughput(args, tmp)
        if not args.skip_rss:
            peak_rss(tmp)


if __name__ == "__main__":
    main()

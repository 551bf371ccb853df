"""Benchmark: our train stage against TRL's DPOTrainer on CPU, at SmolLM2-135M, side by side.

    .venv/bin/pip install -c constraints.txt "trl==1.16.0"     # bench-only extra (pyproject: [bench]; make bench)
    .venv/bin/python bench/train_vs_trl.py                     # SmolLM2, default data, fp32 and bf16, 3 repetitions
    .venv/bin/python bench/train_vs_trl.py --sets low high --precisions bf16 --cases b   # by edit distance
    .venv/bin/python bench/train_vs_trl.py --model tiny        # the 196k-parameter tiny model (overhead-bound)
    .venv/bin/python bench/train_vs_trl.py --rss-only          # the SmolLM2 peak-RSS check

Both sides: the same model, the same training pairs (split == train of the generated data; ``--sets low``
or ``high`` keeps one edit-distance bucket), batch 4, max length 256, AdamW with linear decay, no warm-up,
clipping 1.0, DPO beta 0.1, one epoch, one process, fp32 master weights, gradient checkpointing as the
model preset says on both sides (off for SmolLM2 and tiny; TRL 1.16 defaults to on); ``--precisions`` fp32 and bf16
autocast for BOTH sides (TRL ``bf16=True``, ours ``train.precision=bf16``).

(a) reference on the fly, end to end from the model directory to the saved model. Ours: the reference
    stage (scores every pair once) + the train stage (load, tokenise, train, save). TRL: DPOTrainer
    construction (load, tokenise, reference copy) + ``train()`` (a reference forward each step) + ``save_model``.
(b) reference precomputed. Ours: the train stage alone (the reference artifact exists). TRL:
    ``precompute_ref_log_probs=True``; its construction (tokenising, precomputing) is NOT timed, only
    ``train()`` + ``save_model`` (this favours TRL: our stage's loading and tokenising are timed).

Each repetition runs ours and TRL's back to back (paired); the table shows medians over repetitions of
pairs per second and the median of the paired ratios. Positions per pair: what went through the policy's
forward (padding included; TRL counted by a hook on its model, ours from the train summary). Goal: at
least 1.4x TRL's pairs/s in every case. Run it alone on the machine (2 cores: anything else distorts it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
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

from pipeline.orchestration.orchestrate import Run  # noqa: E402

from _trl_common import dpo_config, quiet, run_trl  # noqa: E402  (bench/ is the script's directory)

# Generated problems per set: about 32 training pairs in the set (the default data has ~1.45 pairs a problem).
PROBLEMS = {"default": 24, "low": 70, "high": 40}
BUCKET = {"default": None, "low": "low", "high": "high"}


def compose_cfg(root: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"artifacts_dir={root}", "logger=none", *overrides])


def overrides(args, data_set: str, precision: str, sharing: str = "response") -> list[str]:
    bucket = BUCKET[data_set]
    return [f"model={args.model}", f"data.num_problems={PROBLEMS[data_set]}", "pairing.test_fraction=0.05", "method=dpo",
            "method.beta=0.1", f"train.precision={precision}", f"train.max_length={args.max_length}",
            f"train.max_prompt_length={args.max_length // 2}", f"train.batch_size={args.batch}",
            "train.max_steps=null", "train.epochs=1", "train.lr=5e-6", "train.warmup_ratio=0", "train.schedule=linear",
            "train.max_grad_norm=1.0", "train.probe_pairs=0", "train.checkpoint_every=0", "train.progress=false",
            f"train.prefix_sharing={sharing}", *([f"pairing.bucket_filter=[{bucket}]"] if bucket else []),
            *([f"train.pack_tokens={args.pack_tokens}"] if args.pack_tokens else [])]


def fresh_store(base: Path, tmp: Path, keep: tuple[str, ...]) -> Path:
    root = Path(tempfile.mkdtemp(dir=tmp))
    for stage in keep:
        shutil.copytree(base / stage, root / stage)
    return root


def time_ours(cfg, stages: list[str]) -> tuple[float, dict]:
    run = Run(cfg, Path(tempfile.mkdtemp()))
    for stage in ("model", "pair", "reference"):
        if stage not in stages:
            run.get(stage)  # cache hits, not timed
    started = time.perf_counter()
    for stage in stages:
        run.get(stage)
    seconds = time.perf_counter() - started
    return seconds, json.loads((run.artifacts["train"].path / "summary.json").read_text())


def time_trl(model_dir: Path, pairs, args, precision: str, precompute: bool, out: Path, checkpointing: bool):
    quiet()
    config = dpo_config(out, batch=args.batch, max_length=args.max_length, beta=0.1, loss_type="sigmoid",
                        precompute=precompute, bf16=precision == "bf16", gradient_checkpointing=checkpointing)
    return run_trl(model_dir, pairs, config, out, time_construction=not precompute)  # (b): construction untimed


def layout_stats(run, train_pairs, args) -> str:
    """Positions per pair in each layout over the training pairs, and the padding share of each."""
    from pipeline.modeling.batching import encode_pair
    from pipeline.modeling.models import load_tokenizer
    from pipeline.modeling.packing import computed_tokens

    tokenizer = load_tokenizer(run.artifacts["model"])
    encodings = [encode_pair(tokenizer, p, c, r, args.max_length, args.max_length // 2)
                 for p, c, r in zip(train_pairs["prompt"], train_pairs["chosen"], train_pairs["rejected"])]
    real = sum(len(e.chosen_ids) + len(e.rejected_ids) for e in encodings)  # both sequences, no padding
    batched = sum(2 * len(chunk) * max(max(len(e.chosen_ids), len(e.rejected_ids)) for e in chunk)
                  for chunk in (encodings[i:i + args.batch] for i in range(0, len(encodings), args.batch)))
    lines = [f"  batch-padded rows (TRL's layout, in data order): {batched / len(encodings):.1f} positions/pair, "
             f"padding {1 - real / batched:.1%}"]
    for sharing in ("none", "prompt", "response"):
        total = sum(computed_tokens(e.chosen_ids, e.rejected_ids, e.chosen_start, e.rejected_start, sharing)
                    for e in encodings)
        padding = total - real if sharing == "none" else 0
        lines.append(f"  prefix_sharing={sharing}: {total / len(encodings):.1f} positions/pair "
                     f"({total / real:.0%} of both sequences' tokens), padding {padding / total:.1%}")
    return "\n".join(lines)


def throughput(args, tmp: Path, data_set: str, precision: str, table: list[str]) -> None:
    import pandas as pd

    base = tmp / f"base-{data_set}-{precision}"
    run = Run(compose_cfg(base, *overrides(args, data_set, precision)), tmp / "run")
    for stage in ("model", "pair", "reference"):
        run.get(stage)
    pairs = pd.read_parquet(run.artifacts["pair"].path / "pairs.parquet")
    train_pairs = pairs[pairs["split"] == "train"]
    if BUCKET[data_set]:
        train_pairs = train_pairs[train_pairs["bucket"] == BUCKET[data_set]]
    n = len(train_pairs)
    print(f"{args.model}, set {data_set}: {n} training pairs, batch {args.batch}, max_length {args.max_length}, "
          f"{precision}, one epoch\n{layout_stats(run, train_pairs, args)}", flush=True)
    model_dir = run.artifacts["model"].path / "model"
    checkpointing = bool(run.cfg.model.gradient_checkpointing)  # TRL gets the preset's setting (its default is on)
    times: dict[str, list[float]] = {}
    positions: dict[str, float] = {}
    for repeat in range(args.repeats):
        for case in args.cases:
            keep = ("model", "pair") if case == "a" else ("model", "pair", "reference")
            stages = ["reference", "train"] if case == "a" else ["train"]
            root = fresh_store(base, tmp, keep)
            seconds, summary = time_ours(compose_cfg(root, *overrides(args, data_set, precision)), stages)
            times.setdefault(f"ours_{case}", []).append(seconds)
            positions["ours"] = summary["positions_computed"] / summary["train_pairs"]
            result = time_trl(model_dir, train_pairs, args, precision, case == "b", Path(tempfile.mkdtemp(dir=tmp)),
                              checkpointing)
            times.setdefault(f"trl_{case}", []).append(result.seconds)
            positions["trl"] = result.policy_tokens / n
            positions[f"trl_reference_{case}"] = result.reference_tokens / n
            shutil.rmtree(root, ignore_errors=True)
        print(f"  repeat {repeat}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    for case in args.cases:
        ours, trl = times[f"ours_{case}"], times[f"trl_{case}"]
        paired = statistics.median(t / o for o, t in zip(ours, trl))
        label = "on the fly" if case == "a" else "precomputed"
        line = (f"| {args.model} | {data_set} ({n} pairs) | {precision} | {label} | {n / statistics.median(ours):.2f} | "
                f"{n / statistics.median(trl):.2f} | **{paired:.2f}x** ({min(t / o for o, t in zip(ours, trl)):.2f}-"
                f"{max(t / o for o, t in zip(ours, trl)):.2f}) | {positions['ours']:.0f} | {positions['trl']:.0f} |")
        table.append(line)
        print(line, flush=True)


def peak_rss(tmp: Path) -> None:
    """Peak RSS of one SmolLM2 training step (8 pairs x 128 tokens, bf16 autocast) in its own process."""
    root = REPO / ".cache" / "bench-artifacts"
    overrides_ = ["model=smollm2_135m", "data.num_problems=10", "train.precision=bf16", "train.max_length=128",
                  "train.max_prompt_length=64", "train.batch_size=8", "train.max_steps=1", "train.probe_pairs=0",
                  "train.checkpoint_every=0", "train.progress=false", "logger=none", f"artifacts_dir={root}",
                  f"hydra.run.dir={tmp / 'rss-run'}", "train.lr=1e-6"]
    prepare = [sys.executable, "-m", "pipeline", "stages=[pair,reference]", *overrides_]
    subprocess.run(prepare, cwd=REPO, check=True, capture_output=True)
    shutil.rmtree(root / "train", ignore_errors=True)  # always measure a real step, never a cache hit
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "stages=[train]", *overrides_], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)  # rusage of exactly this child
    if status != 0:
        raise SystemExit(f"train step failed: {process.stderr.read().decode()[-2000:]}")
    gigabytes = usage.ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux
    print(f"SmolLM2-135M, one step of 8 pairs x 128 tokens, bf16 autocast: peak RSS {gigabytes:.2f} GB "
          f"(goal <= 4.7 GB) {'OK' if gigabytes <= 4.7 else 'MISSED'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2_135m", help="model preset (smollm2_135m or tiny)")
    parser.add_argument("--sets", nargs="+", default=["default"], choices=sorted(PROBLEMS),
                        help="training pairs: default (all buckets), low or high edit distance")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--cases", nargs="+", default=["a", "b"], choices=["a", "b"],
                        help="a: reference on the fly, b: reference precomputed")
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per sequence (prompt budget: half)")
    parser.add_argument("--repeats", type=int, default=3, help="paired repetitions; medians are reported")
    parser.add_argument("--pack-tokens", type=int, default=None, help="our train.pack_tokens (several pairs per forward)")
    parser.add_argument("--rss-only", action="store_true", help="only the SmolLM2 peak-RSS check")
    parser.add_argument("--skip-rss", action="store_true", help="skip the SmolLM2 peak-RSS check")
    args = parser.parse_args()
    print(f"load average at start {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as directory:
        tmp = Path(directory)
        if not args.rss_only:
            table = ["| model | training pairs | precision | reference | ours pairs/s | TRL pairs/s | "
                     "ours / TRL, median of paired (range) | ours positions/pair | TRL positions/pair |",
                     "|---|---|---|---|---:|---:|---:|---:|---:|"]
            for data_set in args.sets:
                for precision in args.precisions:
                    throughput(args, tmp, data_set, precision, table)
            print(f"load average at end {os.getloadavg()}\n" + "\n".join(table))
        if not args.skip_rss:
            peak_rss(tmp)


if __name__ == "__main__":
    main()

"""Benchmark: one pair per forward against several pairs per forward row (``train.pack_tokens``), side by side.

    .venv/bin/python bench/pack_throughput.py                          # SmolLM2-135M, fp32, budgets 512 and 2048
    .venv/bin/python bench/pack_throughput.py --precision bf16 --reps 3
    .venv/bin/python bench/pack_throughput.py --model tiny --pairs 16 --reps 1   # a quick run (CI-sized)
    .venv/bin/python bench/pack_throughput.py --model tiny --padded \
        --extra model.tiny.hidden_size=2048 model.tiny.intermediate_size=8192 model.tiny.num_layers=16 \
        model.tiny.num_heads=32                                        # a random-init model of 1B shape (GPU)

What is timed: the training micro-batch, forward + backward (``training_loop.forward_micro_batch`` and the
loss's backward; DPO, batch ``--batch``), over the same training pairs in the same order for every layout,
one layout after another within each repetition (so a load change on the machine hits all of them). The
optimiser step is left out: it does not depend on the layout. The pairs come from the pipeline's own pair
and reference stages on the generated data (cached under ``.cache/bench_pack``). Printed: pairs per second
(median over repetitions), the speed-up over one pair per forward, forwards per micro-batch, and positions
per pair; on CUDA also the peak memory of each layout. ``--padded`` adds the padded layout
(``train.prefix_sharing=none``: rows ``[chosen, rejected]``, one forward per pair). Runs on CUDA when there
is one (the tree layouts then use FlexAttention, pipeline/modeling/tree_attention.py), else on CPU.
``--json`` writes the numbers to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from pipeline.environment import apply_offline_defaults  # noqa: E402

apply_offline_defaults(REPO / ".cache")
os.environ["WANDB_MODE"] = "disabled"

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from pipeline.training.losses import get_loss  # noqa: E402
from pipeline.modeling.models import load_causal_lm, load_tokenizer  # noqa: E402
from pipeline.modeling.multi_pair import bins, row_tokens  # noqa: E402
from pipeline.orchestration.orchestrate import Run  # noqa: E402
from pipeline.modeling.scoring import ForwardSettings, autocast_context  # noqa: E402
from pipeline.training.training_loop import PairEncodings, forward_micro_batch, row_layout  # noqa: E402


def stages(args) -> dict:
    root = Path(args.cache)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[
            f"artifacts_dir={root}", "logger=none", f"model={args.model}", f"data.num_problems={args.problems}",
            "pairing.test_fraction=0.05", "stages=[pair,reference]", f"train.max_length={args.max_length}",
            f"train.max_prompt_length={args.max_length // 2}", f"train.precision={args.precision}", *args.extra])
    record = Run(cfg, root / "run").execute()
    return cfg, record["artifacts"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--budgets", type=int, nargs="+", default=[512, 2048], help="train.pack_tokens values")
    parser.add_argument("--batch", type=int, default=8, help="pairs per micro-batch")
    parser.add_argument("--pairs", type=int, default=32, help="training pairs timed per layout and repetition")
    parser.add_argument("--problems", type=int, default=30, help="generated problems (data.num_problems)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--cache", default=str(REPO / ".cache" / "bench_pack"))
    parser.add_argument("--json", default=None, help="write the results to this file")
    parser.add_argument("--padded", action="store_true", help="also time padded rows (prefix_sharing=none)")
    parser.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides (e.g. the tiny model's shape)")
    args = parser.parse_args()

    cfg, artifacts = stages(args)
    pairs = pd.read_parquet(Path(artifacts["pair"]["path"]) / "pairs.parquet")
    rows = [i for i, split in enumerate(pairs["split"]) if split == "train"][:args.pairs]  # positions, as train.py
    model_dir = Path(artifacts["model"]["path"]) / "model"  # the model artifact holds the weights under model/
    tokenizer = load_tokenizer(model_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_causal_lm(model_dir, cfg.model, trainable=True).to(device)
    reference = load_reference_from(artifacts["reference"]["path"])
    encodings = PairEncodings.build(tokenizer, pairs, rows, args.max_length, args.max_length // 2)
    method = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "method" / "dpo.yaml"), resolve=True)
    loss_fn = get_loss(method["loss"])
    layouts = {"one pair per forward": ("response", None), **{f"pack_tokens={b}": ("response", b) for b in args.budgets}}
    if args.padded:
        layouts["padded rows (prefix_sharing=none)"] = ("none", None)
    batches = [rows[i:i + args.batch] for i in range(0, len(rows), args.batch)]
    print(f"{args.model} on {device}, {args.precision}: {len(rows)} training pairs, batch {args.batch}, max_length "
          f"{args.max_length}, torch threads {torch.get_num_threads()}, load average {os.getloadavg()}", flush=True)

    peaks: dict[str, float] = {}

    def one_pass(layout) -> float:
        sharing, pack = layout
        settings = ForwardSettings(sharing, 1024, args.precision, pack)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        for batch in batches:
            with autocast_context(device, args.precision):
                result = forward_micro_batch(model, encodings.of(batch), tokenizer.pad_token_id, batch, reference,
                                             loss_fn, method, device, settings=settings)
            result.output.loss.backward()
            model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
            peaks[str(layout)] = torch.cuda.max_memory_allocated() / 2**30
        return len(rows) / (time.perf_counter() - started)

    # Warm-up, not timed: first-call costs on CPU; on CUDA every layout (FlexAttention compiles its kernel).
    for layout in list(layouts.values())[:None if device.type == "cuda" else 1]:
        one_pass(layout)
    speeds = {name: [] for name in layouts}
    for rep in range(args.reps):
        for name, layout in layouts.items():
            speeds[name].append(one_pass(layout))
        print(f"rep {rep + 1}: " + ", ".join(f"{n} {v[-1]:.2f} pairs/s" for n, v in speeds.items()), flush=True)
    base = statistics.median(speeds["one pair per forward"])
    results = []
    for name, (sharing, pack) in layouts.items():
        layouts_ = [row_layout(e, tokenizer.pad_token_id, ForwardSettings(sharing)) for e in encodings.of(rows)]
        sizes = {row: row_tokens(layout) for row, layout in zip(rows, layouts_)}
        forwards = sum(len(bins([sizes[r] for r in b], pack)) if pack else len(b) for b in batches)
        positions = sum(layout.tokens for layout in layouts_) if pack is None else sum(sizes.values())
        median = statistics.median(speeds[name])
        results.append({"layout": name, "pairs_per_s": median, "speedup": median / base,
                        "forwards_per_micro_batch": forwards / len(batches), "positions_per_pair": positions / len(rows),
                        "peak_memory_gib": peaks.get(str((sharing, pack))), "runs": speeds[name]})
    print(f"\n| layout | pairs/s (median of {args.reps}) | vs one pair per forward | forwards per micro-batch "
          f"| positions per pair (padding included) | peak memory (GiB) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        peak = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}"
        print(f"| {r['layout']} | {r['pairs_per_s']:.2f} | {r['speedup']:.2f}x | {r['forwards_per_micro_batch']:.2f} "
              f"| {r['positions_per_pair']:.1f} | {peak} |")
    print(f"load average after: {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


def load_reference_from(path: str):
    from pipeline.modeling.reference_scores import SCORES_FILE
    from pipeline.modeling.scoring import ScoredPairs
    return ScoredPairs.load(Path(path) / SCORES_FILE)


if __name__ == "__main__":
    main()

"""Where TRL's extra positions per pair come from: its tokenisation, or its batch padding after shuffling.

    .venv/bin/python bench/trl_positions.py                 # SmolLM2, the train_vs_trl default data, batch 4
    .venv/bin/python bench/trl_positions.py --sets low high
    .venv/bin/python bench/trl_positions.py --model tiny --train   # also one TRL epoch, counted by a hook

No training and no forward: it builds TRL's DPOTrainer on the same pairs as bench/train_vs_trl.py (same
config, same data), reads the token ids TRL's own tokenisation produced and the batches TRL's own
dataloader (its shuffling sampler, seed 0) and collator produce, and compares them with our encoding of
the same pairs. Positions per pair are ``2 x pairs x longest row`` per batch (TRL pads chosen and
rejected rows of a batch to one width), divided by the pairs: what a hook on TRL's model counts.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np

from train_vs_trl import BUCKET, compose_cfg, overrides  # noqa: E402  (bench/ is the script's directory; sets offline env)

from _trl_common import dpo_config, quiet  # noqa: E402

from pipeline.orchestration.orchestrate import Run  # noqa: E402


def padded_positions(lengths: list[int], order, batch: int) -> float:
    """Positions per pair when pairs are taken in ``order``, ``batch`` at a time, each batch padded to its longest row."""
    total = 0
    for i in range(0, len(order), batch):
        chunk = order[i:i + batch]
        total += 2 * len(chunk) * max(lengths[j] for j in chunk)
    return total / len(order)


def measure(args, data_set: str, tmp: Path) -> None:
    import pandas as pd
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    from pipeline.modeling.batching import encode_pair

    run = Run(compose_cfg(tmp / f"store-{data_set}", *overrides(args, data_set, "fp32")), tmp / "run")
    for stage in ("model", "pair"):
        run.get(stage)
    pairs = pd.read_parquet(run.artifacts["pair"].path / "pairs.parquet")
    train_pairs = pairs[pairs["split"] == "train"]
    if BUCKET[data_set]:
        train_pairs = train_pairs[train_pairs["bucket"] == BUCKET[data_set]]
    train_pairs = train_pairs[["prompt", "chosen", "rejected"]].reset_index(drop=True)
    n = len(train_pairs)
    model_dir = run.artifacts["model"].path / "model"

    # Ours: the trainer's encoding (prompt budget max_length // 2, as the benchmark sets it).
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ours = [encode_pair(tokenizer, p, c, r, args.max_length, args.max_length // 2)
            for p, c, r in zip(train_pairs["prompt"], train_pairs["chosen"], train_pairs["rejected"])]
    ours_len = [max(len(e.chosen_ids), len(e.rejected_ids)) for e in ours]
    ours_tokens = sum(len(e.chosen_ids) + len(e.rejected_ids) for e in ours)

    # TRL: its own tokenisation and its own dataloader, exactly as train() would build them.
    quiet()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    config = dpo_config(tmp / "trl", batch=args.batch, max_length=args.max_length, beta=0.1, loss_type="sigmoid")
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_pandas(train_pairs),
                         processing_class=tokenizer)
    rows = trainer.train_dataset
    trl_chosen = [len(p) + len(c) for p, c in zip(rows["prompt_ids"], rows["chosen_ids"])]
    trl_rejected = [len(p) + len(r) for p, r in zip(rows["prompt_ids"], rows["rejected_ids"])]
    trl_len = [min(args.max_length, max(c, r)) for c, r in zip(trl_chosen, trl_rejected)]
    trl_tokens = sum(min(args.max_length, c) + min(args.max_length, r) for c, r in zip(trl_chosen, trl_rejected))
    same_ids = sum(list(p) + list(c) == e.chosen_ids and list(p) + list(r) == e.rejected_ids
                   for p, c, r, e in zip(rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"], ours))
    loader_positions = sum(int(batch["input_ids"].numel()) for batch in trainer.get_train_dataloader()) / n

    data_order = list(range(n))
    generator = np.random.default_rng(0)
    shuffled = [padded_positions(trl_len, generator.permutation(n).tolist(), args.batch) for _ in range(args.shuffles)]
    print(f"{args.model}, set {data_set}: {n} training pairs, batch {args.batch}, max_length {args.max_length}")
    print(f"  tokenisation: both sequences {ours_tokens / n:.1f} tokens/pair ours, {trl_tokens / n:.1f} TRL; "
          f"identical token ids in {same_ids}/{n} pairs")
    print(f"  batch-padded, data order: ours {padded_positions(ours_len, data_order, args.batch):.1f}, "
          f"TRL's tokenisation {padded_positions(trl_len, data_order, args.batch):.1f} positions/pair")
    print(f"  batch-padded, TRL's shuffled dataloader (seed 0): {loader_positions:.1f} positions/pair")
    print(f"  batch-padded, {args.shuffles} random shuffles: mean {statistics.mean(shuffled):.1f}, "
          f"range {min(shuffled):.1f}-{max(shuffled):.1f} positions/pair")
    if args.train:  # the count train_vs_trl.py's hook makes, to check the dataloader above is what train() sees
        counted = []
        handle = trainer.model.register_forward_pre_hook(
            lambda _m, a, kw: counted.append(int(kw.get("input_ids", a[0] if a else None).numel())), with_kwargs=True)
        trainer.train()
        handle.remove()
        print(f"  TRL train(), hook on its model: {sum(counted) / n:.1f} positions/pair")
    del trainer, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2_135m", help="model preset (smollm2_135m or tiny)")
    parser.add_argument("--sets", nargs="+", default=["default"], choices=sorted(BUCKET))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--shuffles", type=int, default=200, help="random orders for the shuffled-padding spread")
    parser.add_argument("--train", action="store_true", help="also run TRL's train() (one epoch) and count by a hook")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-trl-positions-") as directory:
        for data_set in args.sets:
            measure(args, data_set, Path(directory))


if __name__ == "__main__":
    main()

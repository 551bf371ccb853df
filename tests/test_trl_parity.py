"""prefopt trains what TRL's DPOTrainer trains: 4 steps of DPO, IPO and hinge on the tiny model, with warm-up.

Both sides get the same model, the same pairs in the same order (TRL's sampler is made sequential over
the pairs in the order our data stream visits them), batch 4, AdamW, linear decay after a 2-step warm-up
(ratio 0.5 of 4 steps: lr 0, then peak/2, then decay), clipping 1.0, fp32, dropout and gradient
checkpointing off, the reference scored on the fly by TRL and precomputed by our reference stage.
Every step's loss and every final weight must agree to 1e-5. Needs the bench extra (trl).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.orchestration.orchestrate import Run
from tests.conftest import REPO_ROOT, compose_config

pytestmark = pytest.mark.slow
pytest.importorskip("trl", reason="TRL is not installed (bench extra: pip install -c constraints.txt 'trl==1.16.0')")

STEPS, BATCH, LR, WARMUP, SEED = 4, 4, 1e-4, 0.5, 0
TRL_LOSS = {"dpo": "sigmoid", "ipo": "ipo", "hinge": "hinge"}


def write_pairs(path: Path, n: int) -> Path:
    rows = [{"prompt": f"Question {i}: what is {i} times {i + 2}?",
             "chosen": f" {i} x {i + 2} = {i * (i + 2)}, since {i} x {i + 2} is {i * i} + {2 * i}.",
             "rejected": f" {i} x {i + 2} = {i * (i + 2) + 1}."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def ours(root: Path, data: Path, method: str) -> Path:
    cfg = compose_config(f"artifacts_dir={root}", "stages=[pair,reference,train]", "model=tiny", "logger=none",
                         "data=local", f"data.path={data}", "pairing.test_fraction=0", f"method={method}",
                         "method.beta=0.1", f"seed={SEED}", f"train.max_steps={STEPS}", f"train.batch_size={BATCH}",
                         f"train.lr={LR}", f"train.warmup_ratio={WARMUP}", "train.schedule=linear",
                         "train.max_grad_norm=1.0", "train.weight_decay=0", "train.precision=fp32",
                         "train.max_length=96", "train.max_prompt_length=48", "train.probe_pairs=0",
                         "train.checkpoint_every=0", "train.progress=false")
    Run(cfg, root.parent / "run").execute()
    return root


def trl_train(model_dir: Path, pairs, method: str, out: Path):
    """TRL's DPOTrainer over ``pairs`` in the given order; returns (per-step losses, trained model)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    sys.path.insert(0, str(REPO_ROOT / "bench"))
    from _trl_common import dpo_config, quiet

    quiet()
    losses: list[float] = []

    class InOrder(DPOTrainer):
        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            losses.append(float(loss.detach()))
            return loss

    config = dpo_config(out, batch=BATCH, max_length=96, beta=0.1, loss_type=TRL_LOSS[method], lr=LR,
                        max_steps=STEPS, warmup=WARMUP)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    trainer = InOrder(model=model, args=config, processing_class=tokenizer,
                      train_dataset=Dataset.from_pandas(pairs[["prompt", "chosen", "rejected"]].reset_index(drop=True)))
    trainer.train()
    return losses, trainer


@pytest.mark.parametrize("method", ["dpo", "ipo", "hinge"])
def test_four_steps_equal_trl(tmp_path, method):
    import pandas as pd

    from pipeline.modeling.batching import encode_pair
    from pipeline.training.training_loop import MicroBatchStream

    root = ours(tmp_path / "artifacts", write_pairs(tmp_path / "pairs.jsonl", 20), method)
    model_dir = next((root / "model").glob("*/model"))
    pairs = pd.read_parquet(next((root / "pair").glob("*/pairs.parquet")))
    train_dir = next(p for p in (root / "train").iterdir() if p.is_dir() and not p.name.endswith(".partial"))
    steps = [json.loads(line) for line in (train_dir / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    assert steps[0]["train/lr"] == 0.0 and steps[1]["train/lr"] == pytest.approx(LR / 2)  # the warm-up really runs

    # Our data order (16 of 20 rows, all in epoch 0), given to TRL as its sequential order.
    rows = [i for i in range(len(pairs)) if pairs.iloc[i]["split"] == "train"]
    stream = MicroBatchStream(rows, BATCH, SEED)
    order = [row for _ in range(STEPS) for row in stream.next_global()]
    in_order = pairs.iloc[order]
    trl_losses, trainer = trl_train(model_dir, in_order, method, tmp_path / "trl")

    # Same token ids on both sides (otherwise the comparison below would test tokenisers, not trainers).
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    trl_rows = trainer.train_dataset
    for k, (_, pair) in enumerate(in_order.iterrows()):
        mine = encode_pair(tokenizer, pair["prompt"], pair["chosen"], pair["rejected"], 96, 48)
        assert list(trl_rows[k]["prompt_ids"]) + list(trl_rows[k]["chosen_ids"]) == mine.chosen_ids
        assert list(trl_rows[k]["prompt_ids"]) + list(trl_rows[k]["rejected_ids"]) == mine.rejected_ids

    assert len(trl_losses) == STEPS
    for step, (mine, theirs) in enumerate(zip([s["train/loss"] for s in steps], trl_losses)):
        assert mine == pytest.approx(theirs, abs=1e-5), f"step {step + 1}: ours {mine}, TRL {theirs}"

    start = {k: v for f in sorted(model_dir.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    final = {k: v for f in sorted((train_dir / "model").glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    theirs = {k: v.detach() for k, v in trainer.model.state_dict().items()}
    assert set(final) <= set(theirs)
    moved = max(float((final[k] - start[k]).abs().max()) for k in final)
    assert moved > 10 * 1e-5, f"weights moved by at most {moved}: the comparison would not tell anything"
    worst = max(final, key=lambda k: float((final[k] - theirs[k]).abs().max()))
    difference = float((final[worst] - theirs[worst]).abs().max())
    assert difference <= 1e-5, f"{worst}: ours and TRL's weights differ by {difference}"

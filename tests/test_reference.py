"""Reference stage, ScoredPairs and the shared per-pair preference metrics."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from pipeline.modeling import models
from pipeline.stages import reference
from pipeline.modeling import reference_scores
from pipeline.store.artifacts import build
from pipeline.modeling.batching import encode_response
from pipeline.evaluation.preference_metrics import pair_table, summarise
from pipeline.modeling.scoring import ScoredPairs, score_pairs

QUESTIONS = [
    ("Ava has 12 apples. She eats 5. How many are left?", "12 - 5 = 7.\n#### 7", "12 - 5 = 8.\n#### 8", "low"),
    ("Ben buys 3 boxes of 4 pens. How many pens?", "3 * 4 = 12.\n#### 12", "3 + 4 = 7 pens in total.\n#### 7", "high"),
    ("Carla has 9 coins and finds 6 more.", "9 + 6 = 15.\n#### 15", "9 + 6 = 14.\n#### 14", "low"),
    ("Dev has 40 cards and gives away 15. " * 6, "40 - 15 = 25. " * 20 + "\n#### 25", "40 - 15 = 35.\n#### 35", "high"),
    ("Elena has 7 eggs.", "7", "7 eggs", "low"),  # chosen is a prefix of rejected: no token after the difference
]


def tiny_pairs(tokenizer) -> pd.DataFrame:
    rows = []
    for n, (question, chosen, rejected, bucket) in enumerate(QUESTIONS):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
        rows.append({"pair_id": f"p{n}", "prompt": prompt, "raw_prompt": question, "chosen": chosen, "rejected": rejected,
                     "source": "handmade", "kind": "corrupt_step", "split": "test" if n == 0 else "train",
                     "char_ned": 0.1, "token_ned": 0.1, "bucket": bucket})
    return pd.DataFrame(rows)


def stage_cfg(tiny_model_cfg, **train):
    settings = {"max_length": 96, "max_prompt_length": 48, "precision": "fp32"}
    settings.update(train)
    return OmegaConf.create({"model": tiny_model_cfg, "train": settings, "seed": 0,
                             "method": {"name": "dpop", "beta": 0.1}})


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_artifact):
    """A store holding the tiny model and a hand-made pair artifact (pairs.parquet, as the pair stage writes)."""
    root = tmp_path_factory.mktemp("reference-store")
    frame = tiny_pairs(models.load_tokenizer(tiny_model_artifact))
    pair = build(root, "handmade_pair", {"handmade": True}, {}, lambda work: frame.to_parquet(work / "pairs.parquet", index=False))
    return root, {"model": tiny_model_artifact, "pair": pair}, frame


def direct_scores(model, tokenizer, prompt, response, max_length, max_prompt_length):
    """Log-probs and centred logits (observed minus the position's mean) of the response tokens from one
    unpadded forward pass."""
    ids, start = encode_response(tokenizer, prompt, response, max_length, max_prompt_length)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    positions = torch.arange(start - 1, len(ids) - 1)
    targets = torch.tensor(ids[start:])
    logps = torch.log_softmax(logits, -1)[positions, targets]
    return logps, logits[positions, targets] - logits[positions].mean(-1), targets


def test_reference_scores_equal_a_direct_forward_and_are_reused(store, tiny_model_cfg):
    root, upstream, frame = store
    cfg = stage_cfg(tiny_model_cfg)
    artifact = reference.run(cfg, upstream, root)
    assert artifact.manifest["sequences_scored"] == 2 * len(frame) and artifact.manifest["pairs"] == len(frame)
    assert artifact.manifest["chosen_truncated"] == 1  # the long chosen response lost its EOS
    scored = reference_scores.load_reference(artifact)
    assert scored.pair_ids == list(frame["pair_id"])
    tokenizer = models.load_tokenizer(upstream["model"])
    model = models.load_causal_lm(upstream["model"], tiny_model_cfg)
    for i, row in frame.iterrows():
        for side in ("chosen", "rejected"):
            logps, logits, targets = direct_scores(model, tokenizer, row["prompt"], row[side], 96, 48)
            assert torch.equal(scored.token_ids(side, i), targets)
            torch.testing.assert_close(scored.token_logps(side, i).double(), logps, atol=1e-5, rtol=0)
            torch.testing.assert_close(scored.observed_logits(side, i).double(), logits, atol=1e-5, rtol=0)
            assert scored.seq_logps(side)[i].item() == pytest.approx(logps.sum().item(), abs=1e-4)
    # Method, beta and seed are not in the key: every method of a sweep reuses this artifact.
    again = reference.run(stage_cfg(tiny_model_cfg).copy(), upstream, root)
    other_method = OmegaConf.merge(cfg, {"method": {"name": "dpo", "beta": 0.5}, "seed": 3, "train": {"batch_size": 5}})
    assert again.cached and reference.run(other_method, upstream, root).key == artifact.key
    assert reference.run(stage_cfg(tiny_model_cfg, max_length=64), upstream, root).key != artifact.key


def test_bf16_reference_keeps_fp32_logps(store, tiny_model_cfg):
    root, upstream, frame = store
    scored = reference_scores.load_reference(reference.run(stage_cfg(tiny_model_cfg, precision="bf16"), upstream, root))
    fp32 = reference_scores.load_reference(reference.run(stage_cfg(tiny_model_cfg), upstream, root))
    assert scored.logps["chosen"].dtype == torch.float32
    assert not torch.equal(scored.logps["chosen"], fp32.logps["chosen"])  # autocast really ran
    # Measured on this model: at most 1.1e-3 nats per token and 3.4e-3 per sequence apart (bf16 body, fp32
    # head and log-softmax). A bf16 log-softmax alone would be ~2e-2 per token off.
    for side in ("chosen", "rejected"):
        torch.testing.assert_close(scored.logps[side], fp32.logps[side], atol=5e-3, rtol=0)
        torch.testing.assert_close(scored.seq_logps(side), fp32.seq_logps(side), atol=2e-2, rtol=0)


def test_scored_pairs_save_load_select(store, tmp_path):
    _, upstream, frame = store
    model = models.load_causal_lm(upstream["model"], OmegaConf.load(Path(__file__).parent.parent / "conf/model/tiny.yaml"))
    scored = score_pairs(model, models.load_tokenizer(upstream["model"]), frame, 96, 48, progress=False)
    scored.save(tmp_path / "s.safetensors")
    # the same scores give the same bytes (the store's hashes and the crash test compare files): several
    # metadata entries would be written in a random order each time
    for copy in range(6):
        scored.save(tmp_path / f"s{copy}.safetensors")
    assert len({(tmp_path / f"s{copy}.safetensors").read_bytes() for copy in range(6)}
               | {(tmp_path / "s.safetensors").read_bytes()}) == 1
    loaded = ScoredPairs.load(tmp_path / "s.safetensors")
    assert loaded.pair_ids == scored.pair_ids
    for side in ("chosen", "rejected"):
        assert torch.equal(loaded.logps[side], scored.logps[side]) and torch.equal(loaded.offsets[side], scored.offsets[side])
    subset = loaded.select([3, 1])
    assert subset.pair_ids == ["p3", "p1"]
    assert torch.equal(subset.token_logps("rejected", 0), loaded.token_logps("rejected", 3))
    assert torch.equal(subset.seq_logps("chosen"), loaded.seq_logps("chosen")[[3, 1]])
    # Identical models: zero margins and shifts, through the real pair_table.
    table = pair_table(loaded, scored, frame)
    assert table["margin"].abs().max() == 0 and table["chosen_logit_shift"].abs().max() == 0


def hand_scores(pair_ids, chosen, rejected) -> ScoredPairs:
    """ScoredPairs from lists of (logps, ids, logits) per pair and side."""
    from pipeline.modeling.scoring import _from_rows
    rows = {side: [tuple(torch.tensor(x, dtype=torch.float32 if k != 1 else torch.long) for k, x in enumerate(item))
                   for item in items] for side, items in (("chosen", chosen), ("rejected", rejected))}
    return _from_rows(pair_ids, rows, with_logits=True)


def test_pair_table_hand_built_case():
    ids_c, ids_r = [7, 8, 9, 2], [7, 5, 9, 2]  # first difference at index 1
    policy = hand_scores(["a", "b"],
                         chosen=[([-1.0, -0.5, -0.25, -0.25], ids_c, [1.0, 2.0, 3.0, 4.0]), ([-2.0], [3], [0.5])],
                         rejected=[([-1.0, -3.0, -1.0, -1.0], ids_r, [0.0, 0.0, 0.0, 0.0]), ([-1.0, -1.0], [3, 4], [1.0, 1.0])])
    ref = hand_scores(["b", "a"],  # order differs: rows are matched by pair_id
                      chosen=[([-1.0], [3], [1.5]), ([-1.0, -1.0, -1.0, -1.0], ids_c, [1.0, 1.0, 1.0, 1.0])],
                      rejected=[([-1.0, -1.0], [3, 4], [1.0, 1.0]), ([-1.0, -2.0, -1.0, -1.0], ids_r, [1.0, 1.0, 1.0, 1.0])])
    frame = pd.DataFrame({"pair_id": ["a", "b"], "bucket": ["low", "high"], "kind": ["corrupt_step", "wrong_solution"]})
    table = pair_table(policy, ref, frame).set_index("pair_id")
    a, b = table.loc["a"], table.loc["b"]
    assert a["policy_chosen_logp"] == -2.0 and a["ref_chosen_logp"] == -4.0 and a["rho_chosen"] == 2.0
    assert a["policy_rejected_logp"] == -6.0 and a["ref_rejected_logp"] == -5.0 and a["rho_rejected"] == -1.0
    assert a["margin"] == 3.0 and a["reward_correct"]
    assert a["first_diff_index"] == 1 and a["chosen_after_diff_tokens"] == 2
    # Smaug Fig. 4: the chosen tokens AFTER the differing token 8 (index 1): -0.25, -0.25 (policy), -1, -1 (reference)
    assert a["chosen_after_diff_mean_logp"] == -0.25 and a["ref_chosen_after_diff_mean_logp"] == -1.0
    assert a["chosen_logit_shift"] == pytest.approx(1.5) and a["rejected_logit_shift"] == -1.0
    assert b["rho_chosen"] == -1.0 and b["rho_rejected"] == 0.0 and b["margin"] == -1.0 and not b["reward_correct"]
    assert b["first_diff_index"] == 1 and math.isnan(b["chosen_after_diff_mean_logp"])  # chosen is a prefix
    assert b["chosen_after_diff_tokens"] == 0
    assert b["chosen_logit_shift"] == -1.0 and b["rejected_logit_shift"] == 0.0
    summary = summarise(table.reset_index())
    assert summary["overall"]["pairs"] == 2 and summary["overall"]["reward_accuracy"] == 0.5
    assert summary["overall"]["margin"] == pytest.approx(1.0)
    assert summary["overall"]["chosen_after_diff_mean_logp"] == -0.25  # NaN skipped
    assert summary["by_bucket"]["high"]["chosen_after_diff_mean_logp"] is None
    assert summary["by_bucket"]["low"]["reward_accuracy"] == 1.0
    with pytest.raises(ValueError, match="tokens differ"):
        pair_table(policy, hand_scores(["a", "b"], chosen=[([-1.0], [1], [0.0])] * 2, rejected=[([-1.0], [1], [0.0])] * 2), frame)


def test_pair_then_reference_through_the_orchestrator(make_config, tmp_path):
    """`python -m pipeline stages=[pair,reference] model=tiny` in-process, on a few synthetic problems."""
    from pipeline.orchestration.orchestrate import Run
    cfg = make_config("stages=[pair,reference]", "model=tiny", "logger=none", "data.num_problems=12",
                      "data.num_eval_items=4", "train.max_length=128", "train.max_prompt_length=64")
    record = Run(cfg, tmp_path / "run").execute()
    assert record["status"] == "ok" and set(record["artifacts"]) == {"model", "pair", "reference"}
    ref_path = Path(record["artifacts"]["reference"]["path"])
    pairs = pd.read_parquet(Path(record["artifacts"]["pair"]["path"]) / "pairs.parquet")
    scored = ScoredPairs.load(ref_path / "reference.safetensors")
    assert scored.pair_ids == list(pairs["pair_id"]) and set(pairs["split"]) == {"train", "test"}
    again = Run(cfg, tmp_path / "run2").execute()
    assert all(entry["cached"] for entry in again["artifacts"].values())
    # Other bucket edges: a new pair artifact, but the same scored text, so the same reference.
    rebucketed = Run(make_config("stages=[pair,reference]", "model=tiny", "logger=none", "data.num_problems=12",
                                 "data.num_eval_items=4", "train.max_length=128", "train.max_prompt_length=64",
                                 "pairing.bucket_edges=[0.0,0.5,1.0]"), tmp_path / "run3").execute()
    assert rebucketed["artifacts"]["pair"]["key"] != record["artifacts"]["pair"]["key"]
    assert rebucketed["artifacts"]["reference"] == again["artifacts"]["reference"]

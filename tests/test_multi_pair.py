"""Several pairs per forward (pipeline/modeling/multi_pair.py) and the FlexAttention kernel (pipeline/modeling/tree_attention.py).

The expected numbers are the one-pair layout's (one forward per pair, tests/test_packing.py checks that one
against each response alone through plain transformers): every per-token log-prob, O_t, per-pair sum and
gradient must agree to fp32 rounding when the pairs share rows.
"""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from pipeline.modeling.batching import OneSidedEncoding, encode_pair
from pipeline.errors import UserError
from pipeline.training.losses import get_loss
from pipeline.modeling.multi_pair import bins, dense_tree_mask, pack_layouts, row_tokens
from pipeline.modeling.packing import one_row_layout, pair_layout
from pipeline.modeling.scoring import ForwardSettings, score_pairs
from pipeline.training.training_loop import forward_micro_batch, forward_rows, row_layout
from tests.conftest import CONF_DIR
from tests.test_packing import PAIRS, tiny

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def setup():
    model, tokenizer = tiny()
    encodings = [encode_pair(tokenizer, p, c, r, 128, 64) for p, c, r in PAIRS]
    one_sided = encodings[1]  # a one-sided row (unpaired data) packs alongside the pairs
    encodings.append(OneSidedEncoding(one_sided.rejected_ids, one_sided.rejected_start, "rejected"))
    return model, tokenizer, encodings


def test_rows_by_hand():
    tree_pair = pair_layout([1, 2, 3, 4], [1, 2, 5], 2, 2, "prompt", pad_id=0)  # shared [1, 2], suffixes [3, 4] / [5]
    padded_pair = pair_layout([6, 7, 8], [6, 9], 1, 1, "none", pad_id=0)  # two rows, the second padded
    alone = one_row_layout([3, 3], 1)
    row = pack_layouts([tree_pair, padded_pair, alone], [0, 1, 2])
    assert row.layout.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 6, 9, 3, 3]]  # no padding left
    assert row.layout.position_ids.tolist() == [[0, 1, 2, 3, 2, 0, 1, 2, 0, 1, 0, 1]]  # restart per pair and side
    assert row.layout.tree.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3], [0, 0, 1, 1, 2, 0, 0, 0, 0, 0, 0, 0]]
    assert row.tokens == [5, 5, 2] and row.query_offsets == [0, 3, 6]
    mask = dense_tree_mask(row.layout.tree)[0, 0].int()
    assert mask[4].tolist() == [1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]  # rejected "5": its prompt and itself
    assert mask[8].tolist() == [0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]  # the padded pair's rejected side starts alone
    assert mask[11].tolist() == [0] * 10 + [1, 1]
    # Queries of member 1 (chosen 7, 8 from positions 5, 6; rejected 9 from 8) moved to the row's positions.
    assert row.layout.query_positions[3:6].tolist() == [5, 6, 8]
    assert row.layout.query_labels[3:6].tolist() == [7, 8, 9]
    assert bins([5, 5, 2, 9, 1], 10) == [[0, 1], [2], [3, 4]]  # greedy, in order
    assert bins([12, 3], 10) == [[0], [1]]  # a member over the budget gets a row of its own


def scores_by_row(model, encodings, settings, with_others=True):
    return forward_rows(model, encodings, 0, CPU, with_others, settings)


@pytest.mark.parametrize("sharing", ["response", "none"])
def test_packed_rows_score_every_token_as_the_one_pair_layout(setup, sharing):
    model, _, encodings = setup
    expected = scores_by_row(model, encodings, ForwardSettings(sharing, 4))
    for budget in (64, 4096):  # several rows of a few pairs each, and every pair in one row
        settings = ForwardSettings(sharing, 4, pack_tokens=budget)
        sizes = [row_tokens(row_layout(encoding, 0, settings)) for encoding in encodings]
        assert any(len(group) > 1 for group in bins(sizes, budget))  # pairs really share rows
        ours = scores_by_row(model, encodings, settings)
        for row, ((want, want_same, _), (got, got_same, _)) in enumerate(zip(expected, ours)):
            assert want_same == got_same
            for side in ("chosen", "rejected"):
                if want[side] is None:
                    assert got[side] is None
                    continue
                for name, a, b in zip(("logps", "mask", "others"), want[side], got[side]):
                    torch.testing.assert_close(b, a, atol=1e-5, rtol=0, msg=f"row {row} {side} {name} {budget}")
                torch.testing.assert_close(got[side][0].sum(), want[side][0].sum(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["dpo", "bnf"])
def test_packed_gradients_equal_the_one_pair_layout(setup, method):
    model, tokenizer, encodings = setup
    pairs = encodings[:len(PAIRS)]
    import pandas as pd
    frame = pd.DataFrame({"pair_id": range(len(PAIRS)), "prompt": [p for p, _, _ in PAIRS],
                          "chosen": [c for _, c, _ in PAIRS], "rejected": [r for _, _, r in PAIRS]})
    reference = score_pairs(tiny(seed=7)[0], tokenizer, frame, 128, 64, progress=False)
    cfg = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "method" / f"{method}.yaml"), resolve=True)
    rows, results, grads = list(range(len(PAIRS))), {}, {}
    for pack in (None, 48):
        policy = copy.deepcopy(model)
        result = forward_micro_batch(policy, pairs, 0, rows, reference, get_loss(cfg["loss"]), cfg, CPU,
                                     settings=ForwardSettings("response", 8, pack_tokens=pack))
        result.output.loss.backward()
        results[pack], grads[pack] = result, {n: p.grad for n, p in policy.named_parameters()}
    torch.testing.assert_close(results[48].output.loss, results[None].output.loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(results[48].chosen_rho, results[None].chosen_rho, atol=1e-5, rtol=0)
    assert results[48].tokens == results[None].tokens  # tree layouts carry no padding to cut
    for name, grad in grads[None].items():
        torch.testing.assert_close(grads[48][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_flex_attention_kernel_scores_as_the_dense_mask(setup):
    """The FlexAttention path (CUDA's default over SDPA), forced on CPU where it runs forward only."""
    model, _, encodings = setup
    flexed = copy.deepcopy(model)
    with torch.no_grad():
        # One pair alone, and every row in one packed row (eager FlexAttention on CPU is slow: few forwards).
        for settings, rows in ((ForwardSettings("response", 4), encodings[:1]),
                               (ForwardSettings("prompt", None, pack_tokens=4096), encodings)):
            expected = scores_by_row(model, rows, settings)
            ours = scores_by_row(flexed, rows, ForwardSettings(settings.sharing, settings.chunk,
                                                               pack_tokens=settings.pack_tokens, attention="flex"))
            for (want, _, _), (got, _, _) in zip(expected, ours):
                for side in ("chosen", "rejected"):
                    if want[side] is not None:
                        torch.testing.assert_close(got[side][0], want[side][0], atol=1e-5, rtol=0)
                        torch.testing.assert_close(got[side][2], want[side][2], atol=1e-5, rtol=0)
    assert flexed.config._attn_implementation == "prefopt_tree_flex"  # it really ran the registered kernel


def test_bad_pack_settings_get_one_line():
    with pytest.raises(UserError, match="train.pack_tokens=0: expected a positive integer"):
        ForwardSettings.from_config(OmegaConf.create({"pack_tokens": 0}), "fp32")
    from pipeline.orchestration.validate import check_forward_layout
    from tests.conftest import compose_config
    with pytest.raises(UserError, match="train.pack_tokens=512 .*set train.pack_tokens=null"):
        check_forward_layout(compose_config("model.attn_implementation=flash_attention_2", "train.prefix_sharing=none",
                                            "train.pack_tokens=512"))


@pytest.mark.slow
def test_a_packed_training_run_trains_as_the_one_pair_run(tmp_path):
    """The stage end to end (Hydra config to metrics): train.pack_tokens is in the train key, step 0 still equals
    the reference (DPO's loss log 2) to fp32 rounding, and the losses of both runs agree."""
    import math
    from tests.test_training_loop import metrics, run, write_pairs
    data = write_pairs(tmp_path / "pairs.jsonl", 6)
    common = ("method=dpo", "train.max_steps=2", "train.batch_size=6", "train.precision=fp32")
    one = run(tmp_path / "artifacts", data, *common)
    packed = run(tmp_path / "artifacts", data, *common, "train.pack_tokens=96")
    assert one != packed  # another train artifact: the setting is in its key
    ours, theirs = metrics(packed), metrics(one)
    assert ours[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    for a, b in zip(ours, theirs):
        assert a["train/loss"] == pytest.approx(b["train/loss"], abs=1e-5)

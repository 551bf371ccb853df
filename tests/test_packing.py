"""Shared-prefix forward (pipeline/modeling/packing.py) and chunked head (pipeline/modeling/logprob_head.py) against plain transformers.

Expected values come from the tiny model run the plain way: each response ALONE through
``model(input_ids).logits``, log-softmax, gather, and O_t by brute force over the vocabulary. Every
layout and chunk size must give the same log-probs, O_t and, for every loss, the same gradients.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from pipeline.modeling.batching import encode_pair
from pipeline.errors import UserError
from pipeline.modeling.logprob_head import Head, score_hidden
from pipeline.training.losses import LossInput, get_loss
from pipeline.modeling.packing import computed_tokens, pair_layout, shared_length
from pipeline.modeling.scoring import ForwardSettings, pair_forward, score_pairs
from pipeline.training.training_loop import forward_micro_batch, pad_rows, reference_tokens
from tests.conftest import CONF_DIR

PAIRS = [  # prompt, chosen, rejected: a one-token edit, a distractor, a prefix, identical responses, a long tail
    ("Q: 12 - 5 = ?\nA:", " 12 - 5 = 7. So the answer is 7.", " 12 - 5 = 8. So the answer is 8."),
    ("Q: pick the colour of grass.\nA:", " green", " the sky is blue, so blue"),
    ("Q: count to three.\nA:", " one two", " one two three"),
    ("Q: say hi.\nA:", " hi there", " hi there"),
    ("Q: name a fruit.\nA:", " apple, because it is red and sweet and crisp", " pear"),
]
METHODS = sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))


def tiny(seed: int = 0, attn: str | None = None):
    from pipeline.modeling.tiny_model import build_tiny_model
    cfg = OmegaConf.load(CONF_DIR / "model" / "tiny.yaml")
    cfg.tiny.seed = seed
    model, tokenizer = build_tiny_model(cfg.tiny)
    if attn is not None:
        model.config._attn_implementation = attn
    return model.float(), tokenizer


@pytest.fixture(scope="module")
def setup():
    model, tokenizer = tiny()
    encodings = [encode_pair(tokenizer, p, c, r, 128, 64) for p, c, r in PAIRS]
    return model, tokenizer, encodings


def plain_side(model, ids: list[int], start: int):
    """(token log-probs, O_t) of one response ALONE, the plain transformers way: ``[len(ids) - 1]`` each,
    zero outside the response."""
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    log_p = torch.log_softmax(logits, -1)
    targets = torch.tensor(ids[1:])
    logp = log_p.gather(-1, targets[:, None]).squeeze(-1)
    p = log_p.detach().exp()
    others = (p * log_p).sum(-1) - (p.gather(-1, targets[:, None]) * log_p.gather(-1, targets[:, None])).squeeze(-1)
    keep = torch.arange(1, len(ids)) >= start
    return torch.where(keep, logp, 0.0), torch.where(keep, others, 0.0), keep.float()


def test_layouts_by_hand():
    chosen, rejected = [1, 2, 3, 4, 5], [1, 2, 3, 9, 5, 6]  # prompt [1, 2], first difference at index 3
    assert shared_length(chosen, rejected, 2, 2, "none") == 0
    assert shared_length(chosen, rejected, 2, 2, "prompt") == 2
    assert shared_length(chosen, rejected, 2, 2, "response") == 3
    assert shared_length(chosen, [7, 2, 3, 4], 2, 2, "response") == 0  # prompts differ: never shared
    layout = pair_layout(chosen, rejected, 2, 2, "response", pad_id=0)
    assert layout.input_ids.tolist() == [[1, 2, 3, 4, 5, 9, 5, 6]]
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 4, 5]]
    mask = layout.attention[0, 0].int()
    assert mask[5].tolist() == [1, 1, 1, 0, 0, 1, 0, 0]  # rejected "9": shared part and itself, not chosen's
    assert mask[7].tolist() == [1, 1, 1, 0, 0, 1, 1, 1]
    assert mask[4].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    # token k of a side is scored from position k-1: chosen 3,4,5 from packed 1,2,3; rejected 3 (shared
    # with chosen's), 9 from 2 (the shared position, another label), 5 from 5, 6 from 6
    positions = layout.query_positions[layout.cell_query.clamp_min(0)] * (layout.cell_query >= 0)
    assert positions.tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 5, 6]]
    labels = layout.query_labels[layout.cell_query.clamp_min(0)] * (layout.cell_query >= 0)
    assert labels.tolist() == [[0, 3, 4, 5, 0], [0, 3, 9, 5, 6]]
    assert layout.cell_query[0, 1] == layout.cell_query[1, 1]  # the shared prediction is computed once
    assert computed_tokens(chosen, rejected, 2, 2, "response") == layout.tokens == 8
    assert computed_tokens(chosen, rejected, 2, 2, "none") == 12  # two rows of 6, one padding position


@pytest.mark.parametrize("sharing", ["response", "prompt", "none"])
@pytest.mark.parametrize("chunk", [None, 3])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_log_probs_and_o_t_equal_each_response_alone(setup, sharing, chunk, attn):
    model, _, encodings = setup
    model = copy.deepcopy(model)
    model.config._attn_implementation = attn
    settings = ForwardSettings(sharing, chunk)
    for encoding in encodings:
        scores, input_ids = pair_forward(model, encoding, 0, torch.device("cpu"), with_others=True, settings=settings)
        for row, (ids, start) in enumerate([(encoding.chosen_ids, encoding.chosen_start),
                                            (encoding.rejected_ids, encoding.rejected_start)]):
            logp, others, keep = plain_side(model, ids, start)
            n = len(ids) - 1
            torch.testing.assert_close(scores.token_logps[row, :n], logp, atol=1e-5, rtol=0)
            torch.testing.assert_close(scores.others[row, :n], others, atol=1e-5, rtol=0)
            assert torch.equal(scores.mask[row, :n], keep) and not scores.mask[row, n:].any()
            assert input_ids[row, :len(ids)].tolist() == ids


def test_rejected_tokens_cannot_see_the_chosen_ones(setup):
    """Changing the chosen response's tail leaves every rejected score bit-identical (and vice versa)."""
    model, _, encodings = setup
    base = encodings[0]  # differ at one token, then share the rest
    edited = type(base)(base.chosen_ids[:-3] + [5, 6, 7], base.rejected_ids, base.chosen_start, base.rejected_start)
    for sharing in ("response", "prompt"):
        settings = ForwardSettings(sharing)
        a, _ = pair_forward(model, base, 0, torch.device("cpu"), True, settings)
        b, _ = pair_forward(model, edited, 0, torch.device("cpu"), True, settings)
        assert torch.equal(a.token_logps[1], b.token_logps[1]) and torch.equal(a.others[1], b.others[1])
        assert not torch.equal(a.token_logps[0], b.token_logps[0])  # the edit is seen where it should be


def batch_input(model, encodings, reference, rows, with_others):
    """The loss input the plain way: each response alone through the model (``plain_side``)."""
    sides = {}
    for side, ids_of in (("chosen", lambda e: (e.chosen_ids, e.chosen_start)),
                         ("rejected", lambda e: (e.rejected_ids, e.rejected_start))):
        parts = [plain_side(model, *ids_of(e)) for e in encodings]
        sides[side] = [pad_rows([p[i] for p in parts]) for i in range(3)]
    (logp_w, others_w, mask_w), (logp_l, others_l, mask_l) = sides["chosen"], sides["rejected"]
    ref_w = reference_tokens(reference, "chosen", rows, mask_w)
    ref_l = reference_tokens(reference, "rejected", rows, mask_l)
    same = torch.tensor([e.chosen_ids == e.rejected_ids for e in encodings])
    return LossInput(chosen_logps=logp_w.sum(-1), rejected_logps=logp_l.sum(-1), chosen_token_logps=logp_w,
                     rejected_token_logps=logp_l, chosen_mask=mask_w, rejected_mask=mask_l,
                     ref_chosen_logps=ref_w.sum(-1), ref_rejected_logps=ref_l.sum(-1), ref_chosen_token_logps=ref_w,
                     ref_rejected_token_logps=ref_l, chosen_others=others_w if with_others else None,
                     rejected_others=others_l if with_others else None, same_response=same)


@pytest.mark.parametrize("method", METHODS)
def test_every_loss_and_gradient_equals_the_unshared_computation(setup, method):
    model, tokenizer, encodings = setup
    reference_model, _ = tiny(seed=7)  # another model, so that every policy/reference difference is nonzero
    import pandas as pd
    frame = pd.DataFrame({"pair_id": range(len(PAIRS)), "prompt": [p for p, _, _ in PAIRS],
                          "chosen": [c for _, c, _ in PAIRS], "rejected": [r for _, _, r in PAIRS]})
    reference = score_pairs(reference_model, tokenizer, frame, 128, 64, progress=False)
    cfg = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "method" / f"{method}.yaml"), resolve=True)
    loss_fn, rows = get_loss(cfg["loss"]), list(range(len(PAIRS)))
    expected_model = copy.deepcopy(model)
    expected = loss_fn(batch_input(expected_model, encodings, reference, rows, bool(cfg.get("needs_vocab_term"))), cfg)
    expected.loss.backward()
    for sharing, chunk in (("response", 4), ("prompt", None), ("none", 2)):
        policy = copy.deepcopy(model)
        result = forward_micro_batch(policy, encodings, 0, rows, reference, loss_fn, cfg, torch.device("cpu"),
                                     settings=ForwardSettings(sharing, chunk))
        result.output.loss.backward()
        torch.testing.assert_close(result.output.loss, expected.loss, atol=1e-5, rtol=1e-5)
        for (name, ours), theirs in zip(policy.named_parameters(), expected_model.parameters()):
            assert ours.grad is not None, name
            torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-5, rtol=1e-4, msg=f"{method} {sharing} {name}")


def test_chunked_head_gradients_with_bias_scale_and_softcap():
    """The closed-form backward against autograd through the full logits, fp64 (gradcheck-tight)."""
    torch.manual_seed(0)
    hidden = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (9,))
    g_logp, g_others = torch.randn(9, dtype=torch.float64), torch.randn(9, dtype=torch.float64)
    head = Head(weight, bias, scale=0.5, softcap=3.0)
    logp, _, others = score_hidden(hidden, labels, head, chunk=4, with_others=True)
    ours = torch.autograd.grad((logp * g_logp + others * g_others).sum(), (hidden, weight, bias))
    z = torch.tanh((hidden @ weight.T + bias) * 0.5 / 3.0) * 3.0
    log_p = torch.log_softmax(z, -1)
    p = log_p.detach().exp().scatter(-1, labels[:, None], 0.0)
    expected_logp, expected_others = log_p.gather(-1, labels[:, None]).squeeze(-1), (p * log_p).sum(-1)
    torch.testing.assert_close(logp, expected_logp, atol=1e-12, rtol=0)
    theirs = torch.autograd.grad((expected_logp * g_logp + expected_others * g_others).sum(), (hidden, weight, bias))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_an_attention_that_takes_no_custom_mask_gets_one_line(setup):
    model, _, encodings = setup
    model = copy.deepcopy(model)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(UserError, match="train.prefix_sharing=none"):
        pair_forward(model, encodings[0], 0, torch.device("cpu"), settings=ForwardSettings("response"))


def test_bad_settings_get_one_line():
    with pytest.raises(UserError, match="train.prefix_sharing='both'"):
        ForwardSettings.from_config(OmegaConf.create({"prefix_sharing": "both"}), "fp32")
    with pytest.raises(UserError, match="train.logprob_chunk=0"):
        ForwardSettings.from_config(OmegaConf.create({"logprob_chunk": 0}), "fp32")


def test_validation_stops_a_packed_layout_with_flash_attention_before_any_stage():
    from pipeline.orchestration.validate import check_forward_layout
    from tests.conftest import compose_config
    with pytest.raises(UserError, match="model.attn_implementation=flash_attention_2: cannot take"):
        check_forward_layout(compose_config("model.attn_implementation=flash_attention_2"))
    check_forward_layout(compose_config("model.attn_implementation=flash_attention_2", "train.prefix_sharing=none"))
    check_forward_layout(compose_config("model.attn_implementation=eager"))
    with pytest.raises(UserError, match="train.prefix_sharing='yes'"):
        check_forward_layout(compose_config("train.prefix_sharing=yes"))


def test_lora_with_gradient_checkpointing_trains_through_the_packed_forward(tiny_model_artifact, tiny_model_cfg):
    """A PEFT-wrapped, checkpointed policy: the decoder's hidden states are found through the wrapper, the
    frozen head gets no gradient, and the LoRA gradients equal those of the unshared layout."""
    from pipeline.modeling import models
    cfg = OmegaConf.merge(tiny_model_cfg, {"gradient_checkpointing": True, "lora": {"enabled": True}})
    tokenizer = models.load_tokenizer(tiny_model_artifact)
    encodings = [encode_pair(tokenizer, p, c, r, 128, 64) for p, c, r in PAIRS]
    frame_model = models.load_causal_lm(tiny_model_artifact, tiny_model_cfg)
    import pandas as pd
    frame = pd.DataFrame({"pair_id": range(len(PAIRS)), "prompt": [p for p, _, _ in PAIRS],
                          "chosen": [c for _, c, _ in PAIRS], "rejected": [r for _, _, r in PAIRS]})
    reference = score_pairs(frame_model, tokenizer, frame, 128, 64, progress=False)
    method = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "method" / "bnf.yaml"), resolve=True)
    grads = {}
    for sharing in ("response", "none"):
        torch.manual_seed(0)  # LoRA's B starts at zero, A at random: the same start for both layouts
        policy = models.load_causal_lm(tiny_model_artifact, cfg, trainable=True)
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.02, generator=torch.Generator().manual_seed(len(name)))
        result = forward_micro_batch(policy, encodings, 0, list(range(len(PAIRS))), reference, get_loss("bnf"), method,
                                     torch.device("cpu"), settings=ForwardSettings(sharing, 8))
        result.output.loss.backward()
        grads[sharing] = {n: p.grad for n, p in policy.named_parameters() if p.requires_grad}
        assert grads[sharing] and all("lora_" in n and g is not None for n, g in grads[sharing].items())
    for name, grad in grads["response"].items():
        torch.testing.assert_close(grad, grads["none"][name], atol=1e-5, rtol=1e-4, msg=name)


def test_a_head_that_is_not_the_plain_projection_is_refused(setup):
    """A model that post-processes its logits in a way the chunked head does not know stops with one line."""
    model, _, encodings = setup
    model = copy.deepcopy(model)
    plain = model.lm_head.forward
    model.lm_head.forward = lambda hidden: 2.0 * plain(hidden)  # an unknown logit scale
    with pytest.raises(UserError, match="not a linear head of the decoder's output"):
        pair_forward(model, encodings[0], 0, torch.device("cpu"), settings=ForwardSettings("response"))

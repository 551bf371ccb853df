"""One-sided rows train BNF end to end: data.schema=unpaired (each response scored alone, as the reference
stage scored it) and train.drop_one_side (one side of each pair kept, the pair's reference reused); other
methods get one line; BNF's loss on a masked-out side equals a hand computation; probes and evaluation
report the side a row has."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from pipeline.training import session as training_session
from pipeline.training.losses import LossInput, bnf_loss
from pipeline.orchestration.orchestrate import Run
from pipeline.modeling.reference_scores import load_scored_rows
from pipeline.data.unpaired import kept_sides
from tests.conftest import REPO_ROOT, compose_config

FIXTURE = REPO_ROOT / "tests" / "fixtures" / "kto_unpaired.jsonl"  # 2 desirable rows, 1 undesirable
TINY = ("model=tiny", "logger=none", "train.precision=fp32", "train.max_length=96", "train.max_prompt_length=48",
        "train.progress=false", "train.checkpoint_every=0", "train.warmup_ratio=0", "train.lr=1e-3")


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(Path(directory).glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def entry(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``python -m pipeline <overrides>`` in a fresh interpreter (the real entry point)."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    command = [sys.executable, "-m", "pipeline", f"artifacts_dir={tmp_path / 'artifacts'}",
               f"hydra.run.dir={tmp_path / 'run'}", *overrides]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


def unpaired_file(path: Path, n: int) -> Path:
    """``n`` prompts, each with one desirable or one undesirable completion (alternating), of lengths that
    differ by tens of tokens (so that scoring them in any padded layout would change their log-probs)."""
    rows = [{"prompt": f"What is {i} plus {i + 1}?",
             "completion": f"{i} + {i + 1} = {2 * i + 1 + (i % 2)}." + " Adding the two numbers." * (i % 3 * 3),
             "label": i % 2 == 0} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def spy_on_loss_inputs(monkeypatch) -> list[tuple[list[int], LossInput]]:
    """Record (rows, LossInput) of every micro-batch the trainer computes a loss on."""
    seen: list[tuple[list[int], LossInput]] = []
    real = training_session.forward_micro_batch

    def spy(model, encodings, pad_id, rows, reference, loss_fn, *args, **kwargs):
        def recording(inp, cfg):
            seen.append((list(rows), inp))
            return loss_fn(inp, cfg)
        return real(model, encodings, pad_id, rows, reference, recording, *args, **kwargs)

    monkeypatch.setattr(training_session, "forward_micro_batch", spy)
    return seen


def artifacts(record: dict, *stages: str) -> list[SimpleNamespace]:
    """The run record's artifacts of ``stages``, as objects with a ``.path`` (what the loaders read)."""
    return [SimpleNamespace(path=Path(record["artifacts"][stage]["path"])) for stage in stages]


def present_sides(inp: LossInput, i: int) -> list[str]:
    return [side for side, mask in (("chosen", inp.chosen_mask), ("rejected", inp.rejected_mask)) if mask[i].sum() > 0]


# ------------------------------------------------------------------ (a) unpaired data trains BNF and KTO end to end

@pytest.mark.parametrize("method", ["bnf", "kto"])
def test_unpaired_file_trains_through_the_entry_point(tmp_path, method):
    out = entry(tmp_path, "stages=[pair,reference,train]", *TINY, "data=local", f"data.path={FIXTURE}",
                "data.schema=unpaired", f"method={method}", "pairing.test_fraction=0", "train.batch_size=3",
                "train.max_steps=2")
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["status"] == "ok"
    paths = {stage: Path(info["path"]) for stage, info in record["artifacts"].items()}
    assert not json.loads((paths["pair"] / "stats.json").read_text())["pairs_kept"]  # no pairs at all
    # The reference scored each response alone: one side present, the other an empty row.
    frame, scored = load_scored_rows(SimpleNamespace(path=paths["pair"]), SimpleNamespace(path=paths["reference"]))
    for i, label in enumerate(frame["label"]):
        present, absent = ("chosen", "rejected") if label else ("rejected", "chosen")
        assert int(scored.lengths(present)[i]) > 0 and int(scored.lengths(absent)[i]) == 0
    summary = json.loads((paths["train"] / "summary.json").read_text())
    assert summary["train_rows"] == {"pairs": 0, "one_sided": 3, "dropped_pairs_kept_chosen": 0,
                                     "dropped_pairs_kept_rejected": 0}
    first = read_jsonl(paths["train"] / "metrics.jsonl")[0]
    # Step 0 reproduces the stored reference bit for bit (the same one-row layout), on both kinds of row.
    assert first["train/logps_shift/chosen/unpaired"] == 0 and first["train/logps_shift/rejected/unpaired"] == 0
    assert math.isfinite(first["train/loss"]) and first["train/loss"] != 0
    if method == "kto":  # at step 0 every rho is 0, so z0 = 0 and each one-sided row's loss is 1 - sigmoid(0)
        assert first["train/loss"] == pytest.approx(0.5, abs=1e-6) and first["train/kl"] == 0
    before, after = weights(paths["model"] / "model"), weights(paths["train"] / "model")
    assert before.keys() == after.keys()
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert len(changed) > len(before) // 2, f"only {len(changed)} of {len(before)} tensors moved"


# ------------------------------------------------------------------ (b) other methods: one line

def test_dpo_on_unpaired_data_exits_2_with_one_line(tmp_path):
    out = entry(tmp_path, "stages=[pair,reference,train]", *TINY, "data=local", f"data.path={FIXTURE}",
                "data.schema=unpaired", "method=dpo")
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2, out.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert "accepts_unpaired: false" in lines[0] and "method.name=dpo" in lines[0] and "data.schema=unpaired" in lines[0]
    assert not (tmp_path / "artifacts").exists()  # refused before any stage: no model was built


@pytest.mark.parametrize("overrides, cause", [
    (("data=local", f"data.path={FIXTURE}", "data.schema=unpaired"), "data.schema=unpaired"),
    (("train.drop_one_side=true",), "train.drop_one_side=true"),
])
@pytest.mark.parametrize("method", ["dpo", "dpop", "simpo"])
def test_validation_names_the_method_and_the_flag(overrides, cause, method):
    from pipeline.errors import UserError
    from pipeline.orchestration.validate import validate
    with pytest.raises(UserError) as error:
        validate(compose_config("stages=[pair,reference,train]", f"method={method}", *overrides))
    assert f"method.name={method}" in str(error.value) and "accepts_unpaired" in str(error.value)
    assert cause in str(error.value) and "\n" not in str(error.value)
    validate(compose_config("stages=[pair]", f"method={method}", *overrides))  # nothing trains: fine
    validate(compose_config("stages=[pair,reference,train]", "method=bnf", *overrides))


def test_an_auto_detected_unpaired_file_is_refused_by_the_train_stage(tmp_path):
    from pipeline.errors import UserError
    cfg = compose_config(f"artifacts_dir={tmp_path / 'artifacts'}", "stages=[pair,train]", *TINY, "data=local",
                         f"data.path={FIXTURE}", "method=dpo", "pairing.test_fraction=0")
    with pytest.raises(UserError, match=r"method.name=dpo \(loss dpo\) has accepts_unpaired: false"):
        Run(cfg, tmp_path / "run").execute()
    assert not list((tmp_path / "artifacts").glob("train/*"))


# ------------------------------------------------------------------ (c) BNF's loss on a masked-out side, by hand

def hand_bnf(logits: list[list[float]], targets: list[int], ref_logps: list[float], guards: bool) -> list[float]:
    """Per-token A_t of docs' formula (pipeline/training/losses.py, BNF), from the logits in plain Python floats:
    p = softmax, w = min(p / p_ref, 1), u = (1 - w) / (1 - p), A = w log p(y) + u sum_{j != y} p_j log p_j;
    with guards w = min(p / (p_ref + 1e-6), 1), u = (1 - w + 1e-6) / (1 - p + 1e-6); exact: u = 0 where w = 1."""
    terms = []
    for row, y, ref in zip(logits, targets, ref_logps):
        top = max(row)
        z = sum(math.exp(v - top) for v in row)
        logp = [v - top - math.log(z) for v in row]
        p = math.exp(logp[y])
        others = sum(math.exp(lj) * lj for j, lj in enumerate(logp) if j != y)
        if guards:
            w = min(p / (math.exp(ref) + 1e-6), 1.0)
            u = (1 - w + 1e-6) / (1 - p + 1e-6)
        else:
            w = min(math.exp(logp[y] - ref), 1.0)
            u = 0.0 if w >= 1 else (1 - w) / (1 - p)
        terms.append(w * logp[y] + u * others)
    return terms


def side_tensors(logits: torch.Tensor, targets: torch.Tensor, length: int, width: int, garbage: float):
    """Per-token log p(y), O_t and a mask over ``width`` positions, the first ``length`` real; every position
    past them holds ``garbage`` (a masked-out side must be ignored whatever it holds)."""
    log_p = torch.log_softmax(logits.double(), -1)
    token = log_p.gather(-1, targets[:, None]).squeeze(-1)
    weights = log_p.exp().scatter(-1, targets[:, None], 0.0)
    others = (weights * log_p).sum(-1)
    mask = (torch.arange(width) < length).double()
    fill = lambda x: torch.where(mask > 0, x, torch.full_like(x, garbage))  # noqa: E731
    return fill(token), fill(others), mask


@pytest.mark.parametrize("normalisation", ["batch_min", "per_sequence", "none"])
@pytest.mark.parametrize("guards", [True, False])
def test_bnf_loss_on_one_sided_rows_equals_the_hand_computation(normalisation, guards):
    """Rows: a pair (3 and 4 tokens), a lone chosen (5 tokens), a lone rejected (2 tokens). The absent side
    has an all-zero mask and garbage values; the loss is the mean of -(S_w - S_l), -S_w and +S_l."""
    generator = torch.Generator().manual_seed(0)
    width, vocab = 6, 7
    lengths = {"chosen": [3, 5, 0], "rejected": [4, 0, 2]}
    fields, hand_sums = {}, {"chosen": [], "rejected": []}
    for side in ("chosen", "rejected"):
        rows = {"token": [], "others": [], "mask": [], "ref": []}
        for i, length in enumerate(lengths[side]):
            logits = torch.randn(width, vocab, generator=generator, dtype=torch.float64) * 2
            targets = torch.randint(0, vocab, (width,), generator=generator)
            ref = torch.log(torch.rand(width, generator=generator, dtype=torch.float64) * 0.9 + 0.05)
            token, others, mask = side_tensors(logits, targets, length, width, garbage=-3.7 + i)
            rows["token"].append(token)
            rows["others"].append(others)
            rows["mask"].append(mask)
            rows["ref"].append(torch.where(mask > 0, ref, torch.full_like(ref, -0.2)))
            terms = hand_bnf(logits[:length].tolist(), targets[:length].tolist(), ref[:length].tolist(), guards)
            hand_sums[side].append(sum(terms))
        fields[side] = {k: torch.stack(v) for k, v in rows.items()}
    shortest = min(n for side in lengths for n in lengths[side] if n > 0)  # batch_min ignores absent sides
    hand = []
    for i in range(3):
        s = {}
        for side in ("chosen", "rejected"):
            n = {"batch_min": shortest, "per_sequence": max(lengths[side][i], 1), "none": 1}[normalisation]
            s[side] = hand_sums[side][i] / n if lengths[side][i] else 0.0
        hand.append(-(s["chosen"] - s["rejected"]))
    w, l = fields["chosen"], fields["rejected"]
    inp = LossInput(
        chosen_logps=(w["token"] * w["mask"]).sum(-1), rejected_logps=(l["token"] * l["mask"]).sum(-1),
        chosen_token_logps=w["token"].requires_grad_(), rejected_token_logps=l["token"].requires_grad_(),
        chosen_mask=w["mask"], rejected_mask=l["mask"],
        ref_chosen_logps=(w["ref"] * w["mask"]).sum(-1), ref_rejected_logps=(l["ref"] * l["mask"]).sum(-1),
        ref_chosen_token_logps=w["ref"], ref_rejected_token_logps=l["ref"],
        chosen_others=w["others"].requires_grad_(), rejected_others=l["others"].requires_grad_(),
        same_response=torch.tensor([False, False, False]))
    out = bnf_loss(inp, {"normalisation": normalisation, "guards": guards})
    assert out.loss.item() == pytest.approx(sum(hand) / 3, abs=1e-10)
    out.loss.backward()  # nothing flows into an absent side or past a response's end
    for side, tensors in (("chosen", w), ("rejected", l)):
        for name in ("token", "others"):
            assert torch.all(tensors[name].grad[tensors["mask"] == 0] == 0), (side, name)
    if normalisation != "batch_min":  # without the batch-wide N, each row's loss stands alone
        for i in range(3):
            row = LossInput(**{k: (v[i:i + 1].detach() if isinstance(v, torch.Tensor) else v)
                               for k, v in vars(inp).items()})
            assert bnf_loss(row, {"normalisation": normalisation, "guards": guards}).loss.item() == pytest.approx(
                hand[i], abs=1e-10)


# ------------------------------------------------------------------ (d) train.drop_one_side

def test_kept_sides_are_deterministic_and_about_half_each():
    ids = [f"pair{i:04d}" for i in range(400)]
    first, again, other = kept_sides(ids, 0), kept_sides(ids, 0), kept_sides(ids, 1)
    assert first == again and set(first) == {"chosen", "rejected"}
    assert 160 <= first.count("chosen") <= 240  # binomial(400, 1/2): mean 200, sd 10
    assert first != other and 140 <= sum(a != b for a, b in zip(first, other)) <= 260
    assert kept_sides(ids[::-1], 0) == first[::-1]  # a pair's side depends on the pair, not on its position


# One micro-batch holds every training pair, so step 0 checks every pair's exactness.
SYNTHETIC = ("data.num_problems=24", "data.num_eval_items=4", "pairing.test_fraction=0.2", "train.batch_size=128",
             "train.probe_pairs=2", "train.probe_every=1", "method=bnf", "seed=3")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_drop_one_side_keeps_one_side_per_pair_with_the_stored_reference(tmp_path, monkeypatch, precision):
    root = tmp_path / "artifacts"

    def execute(*overrides):
        cfg = compose_config(f"artifacts_dir={root}", "stages=[pair,reference,train]", *TINY, *SYNTHETIC, *overrides,
                             f"train.precision={precision}")
        return Run(cfg, tmp_path / f"run{len(overrides)}").execute()

    paired = execute("train.max_steps=1")
    seen = spy_on_loss_inputs(monkeypatch)
    dropped = execute("train.max_steps=2", "train.drop_one_side=true")
    keys = lambda record, stage: record["artifacts"][stage]["key"]  # noqa: E731
    assert all(keys(paired, s) == keys(dropped, s) for s in ("model", "pair", "reference"))  # shared upstream
    assert keys(paired, "train") != keys(dropped, "train")
    frame, reference = load_scored_rows(*artifacts(dropped, "pair", "reference"))
    train_rows = [i for i, split in enumerate(frame["split"]) if split == "train"]
    expected = dict(zip(train_rows, kept_sides(frame["pair_id"].iloc[train_rows], 3)))
    assert len(seen) == 2 and sorted(seen[0][0]) == train_rows
    for step, (rows, inp) in enumerate(seen):
        for i, row in enumerate(rows):
            kept = present_sides(inp, i)
            assert kept == [expected[row]], (row, kept)  # exactly one side, the drawn one
            absent = "rejected" if kept == ["chosen"] else "chosen"
            assert torch.all(getattr(inp, f"{absent}_mask")[i] == 0)
            assert getattr(inp, f"{absent}_logps")[i] == 0 and getattr(inp, f"ref_{absent}_logps")[i] == 0
            mask = getattr(inp, f"{kept[0]}_mask")[i] > 0
            stored = reference.token_logps(kept[0], row)
            assert torch.equal(getattr(inp, f"ref_{kept[0]}_token_logps")[i][mask], stored)
            if step == 0:  # the pair's own layout: the first forward IS the stored reference, bit for bit
                assert torch.equal(getattr(inp, f"{kept[0]}_token_logps")[i][mask].detach(), stored)
    summary = json.loads((Path(dropped["artifacts"]["train"]["path"]) / "summary.json").read_text())
    counts = summary["train_rows"]
    assert counts["pairs"] == counts["one_sided"] == 0
    assert counts["dropped_pairs_kept_chosen"] == list(expected.values()).count("chosen")
    assert counts["dropped_pairs_kept_rejected"] == list(expected.values()).count("rejected")
    # Probes stay pairs: the held-out rows are scored whole, as in the paired run.
    probes = read_jsonl(Path(dropped["artifacts"]["train"]["path"]) / "trajectories.jsonl")
    assert probes and all(p["chosen_shift"] is not None and p["rejected_shift"] is not None for p in probes)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_one_sided_rows_step_zero_equals_the_stored_reference(tmp_path, monkeypatch, precision):
    """Each response forwarded alone, as the reference stage scored it: the first forward is the stored
    reference bit for bit, in either precision."""
    data = unpaired_file(tmp_path / "unpaired.jsonl", 9)
    seen = spy_on_loss_inputs(monkeypatch)
    cfg = compose_config(f"artifacts_dir={tmp_path / 'artifacts'}", "stages=[pair,reference,train]", *TINY, "data=local",
                         f"data.path={data}", "data.schema=unpaired", "method=bnf", "pairing.test_fraction=0",
                         "train.batch_size=9", "train.max_steps=1", f"train.precision={precision}")
    record = Run(cfg, tmp_path / "run").execute()
    frame, reference = load_scored_rows(*artifacts(record, "pair", "reference"))
    (rows, inp), = seen
    assert sorted(rows) == list(range(9))
    for i, row in enumerate(rows):
        side = "chosen" if frame["label"].iat[row] else "rejected"
        assert present_sides(inp, i) == [side]
        mask = getattr(inp, f"{side}_mask")[i] > 0
        stored = reference.token_logps(side, row)
        assert torch.equal(getattr(inp, f"{side}_token_logps")[i][mask].detach(), stored)
        assert torch.equal(getattr(inp, f"ref_{side}_token_logps")[i][mask], stored)


# ------------------------------------------------------------------ probes and evaluation of one-sided rows

def test_probes_and_evaluation_report_the_side_a_row_has(tmp_path):
    data = unpaired_file(tmp_path / "unpaired.jsonl", 16)
    cfg = compose_config(f"artifacts_dir={tmp_path / 'artifacts'}", "stages=[pair,reference,train,evaluate]", *TINY,
                         "data=local", f"data.path={data}", "data.schema=unpaired", "method=bnf", "eval=none",
                         "pairing.test_fraction=0.4", "train.batch_size=4", "train.max_steps=2", "train.probe_pairs=4",
                         "train.probe_every=1")
    record = Run(cfg, tmp_path / "run").execute()
    art = {stage: Path(info["path"]) for stage, info in record["artifacts"].items()}
    probes = read_jsonl(art["train"] / "trajectories.jsonl")
    assert {p["step"] for p in probes} == {0, 1, 2} and probes
    for p in probes:
        has = "chosen" if p["chosen_shift"] is not None else "rejected"
        assert p[f"{'rejected' if has == 'chosen' else 'chosen'}_shift"] is None and p[f"{has}_logp"] is not None
        assert p["chosen_after_diff_mean_logp"] is None and p["bucket"] == "unpaired"
        assert p["step"] > 0 or p[f"{has}_shift"] == 0  # step 0: exactly the reference
    preference = json.loads((art["evaluate"] / "preference.json").read_text())["overall"]
    assert preference["pairs"] == 0 and preference["one_sided_rows"] > 0
    assert preference["reward_accuracy"] is None and preference["margin"] is None  # pair-only: skipped
    assert preference["rho_chosen"] is not None and preference["rho_rejected"] is not None
    assert preference["rho_chosen"] != 0 or preference["rho_rejected"] != 0


def test_bnf_unpaired_sweep_trains_bnf_paired_and_with_one_side_dropped():
    from omegaconf import OmegaConf

    from tests.test_config import compose_sweep_job, sweep_jobs
    jobs = [compose_sweep_job("bnf_unpaired", overrides) for overrides in sweep_jobs("bnf_unpaired")]
    assert sorted(bool(job.train.drop_one_side) for job in jobs) == [False, True]
    assert all(job.method.loss == "bnf" and job.method.accepts_unpaired for job in jobs)
    assert all(list(job.stages) == list(compose_config().stages) for job in jobs)  # the default sweep's stages
    strip = lambda job: {k: v for k, v in OmegaConf.to_container(job, resolve=False).items() if k != "hydra"}  # noqa: E731
    first, second = (strip(job) for job in jobs)
    first["train"].pop("drop_one_side"), second["train"].pop("drop_one_side")
    assert first == second  # nothing else differs: same pairs, reference and evaluation

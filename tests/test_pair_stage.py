"""The pairing stage end to end: files, columns, determinism, cache keys, bucket filter, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipeline.stages import pair
from pipeline.errors import UserError
from tests.conftest import REPO_ROOT

FIXTURES = Path(__file__).parent / "fixtures"
COLUMNS = ["pair_id", "prompt", "raw_prompt", "chosen", "rejected", "source", "kind", "split",
           "char_distance", "char_ned", "token_distance", "token_ned", "bucket"]
SMALL = ("data.num_problems=60", "data.num_eval_items=20")


def run_pair(make_config, *overrides, upstream=None):
    cfg = make_config(*overrides)
    return pair.run(cfg, upstream or {}, Path(cfg.artifacts_dir))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from tests.conftest import compose_config
    root = tmp_path_factory.mktemp("store")
    cfg = compose_config(f"artifacts_dir={root}")
    return pair.run(cfg, {}, root)


def test_synthetic_artifact_files_and_columns(synthetic):
    names = {p.name for p in synthetic.path.iterdir()}
    assert {"pairs.parquet", "stats.json", "histogram.png", "eval_mc.jsonl", "eval_gen.jsonl", "manifest.json"} <= names
    frame = pd.read_parquet(synthetic.path / "pairs.parquet")
    assert set(COLUMNS) <= set(frame.columns) and 130 <= len(frame) <= 220  # 120 problems by default
    assert frame["pair_id"].is_unique and (frame["prompt"] == frame["raw_prompt"]).all()  # no model: plain prompts
    stats = json.loads((synthetic.path / "stats.json").read_text())
    assert stats["tokenizer"] == "regex_fallback" and stats["rows_read"] == len(frame)
    assert stats["pairs_per_kind"] == frame["kind"].value_counts().to_dict()
    assert set(stats["quantiles"]["char_ned"]) == {"q00", "q10", "q25", "q50", "q75", "q90", "q100"}
    # Default edges separate Smaug's two regimes: corrupted steps low, different answers high.
    assert set(frame.loc[frame["kind"] == "corrupt_step", "bucket"]) == {"low"}
    assert set(frame.loc[frame["kind"] != "corrupt_step", "bucket"]) == {"high"}
    test_share = (frame["split"] == "test").mean()
    assert 0.1 < test_share < 0.3  # pairing.test_fraction=0.2
    eval_mc = [json.loads(l) for l in (synthetic.path / "eval_mc.jsonl").read_text().splitlines()]
    assert len(eval_mc) == 100 and not set(e["question"] for e in eval_mc) & set(frame["raw_prompt"])


def prompts_on_both_sides(frame: pd.DataFrame) -> set[str]:
    return set(frame.loc[frame["split"] == "train", "raw_prompt"]) & set(frame.loc[frame["split"] == "test", "raw_prompt"])


def test_default_data_split_is_prompt_disjoint(synthetic):
    """mc_distractor problems have one pair per distractor: all of them fall on one side."""
    frame = pd.read_parquet(synthetic.path / "pairs.parquet")
    assert frame.groupby("raw_prompt").size().max() > 1  # several pairs share a prompt, so the check has teeth
    assert prompts_on_both_sides(frame) == set()
    stats = json.loads((synthetic.path / "stats.json").read_text())
    assert stats["prompts_per_split"] == {s: frame.loc[frame["split"] == s, "raw_prompt"].nunique() for s in ("train", "test")}
    assert stats["pairs_per_split"] == frame["split"].value_counts().to_dict()


def test_split_is_stable_when_rows_are_added(make_config, tmp_path):
    """Adding rows (new prompts, or new pairs of an existing prompt) never moves an existing pair."""
    rows = [{"prompt": f"question {i}", "chosen": f"right {i}", "rejected": f"wrong {i}"} for i in range(80)]
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    first = pd.read_parquet(run_pair(make_config, "data=local", f"data.path={path}", "pairing.test_fraction=0.5").path
                            / "pairs.parquet")
    more = rows + [{"prompt": f"question {i}", "chosen": f"right {i}", "rejected": f"other {i}"} for i in range(80)]
    more += [{"prompt": f"new question {i}", "chosen": "a", "rejected": "b"} for i in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in more))
    second = pd.read_parquet(run_pair(make_config, "data=local", f"data.path={path}", "pairing.test_fraction=0.5").path
                             / "pairs.parquet")
    old = second.set_index("pair_id").loc[first["pair_id"], "split"]
    assert old.tolist() == first["split"].tolist()
    assert 0.3 < (first["split"] == "test").mean() < 0.7 and prompts_on_both_sides(second) == set()


SCHEMA_FIXTURES = {  # fixture -> the overrides its layout needs (as in tests/test_adapters.py)
    "arc_challenge.jsonl": ("data.columns.answer=answerKey",),
    "hellaswag.jsonl": ("data.schema=multiple_choice", "data.columns.question=ctx", "data.columns.choices=endings",
                        "data.columns.answer=label"),
    "hh_rlhf.jsonl": (), "metamath_dpop.csv": (), "metamath_dpop.jsonl": (), "ultrafeedback_binarized.jsonl": (),
    "ultrafeedback_scored.jsonl": ("data.columns.prompt=instruction", "data.columns.completion_text=response",
                                   "data.columns.completion_score=overall_score", "data.multi_completion_strategy=all_pairs"),
}


def test_schema_fixture_list_is_complete():
    assert set(SCHEMA_FIXTURES) | {"kto_unpaired.jsonl"} == {p.name for p in FIXTURES.iterdir()}


@pytest.mark.parametrize("fixture", sorted(SCHEMA_FIXTURES))
def test_every_schema_fixture_is_prompt_disjoint(make_config, fixture):
    art = run_pair(make_config, "data=local", f"data.path={FIXTURES / fixture}", "pairing.test_fraction=0.5",
                   *SCHEMA_FIXTURES[fixture])
    frame = pd.read_parquet(art.path / "pairs.parquet")
    assert len(frame) and prompts_on_both_sides(frame) == set()


def test_many_pairs_per_prompt_stay_together(make_config, tmp_path):
    """Multiple choice (a pair per distractor) and scored completions (all pairs) on 60 questions each."""
    mc = [{"question": f"What is {i} + {i}?", "choices": [str(2 * i), str(2 * i + 1), str(2 * i + 2), str(i)], "answer": 0}
          for i in range(1, 61)]
    scored = [{"prompt": f"Say {i}.", "completions": [f"{i}", f"{i}!", f"{i}?", "no"], "scores": [4, 3, 2, 1]}
              for i in range(60)]
    for name, rows, extra in (("mc.jsonl", mc, ()), ("scored.jsonl", scored, ("data.multi_completion_strategy=all_pairs",))):
        path = tmp_path / name
        path.write_text("\n".join(json.dumps(r) for r in rows))
        frame = pd.read_parquet(run_pair(make_config, "data=local", f"data.path={path}", "pairing.test_fraction=0.5",
                                         *extra).path / "pairs.parquet")
        assert frame.groupby("raw_prompt").size().min() >= 3 and set(frame["split"]) == {"train", "test"}
        assert prompts_on_both_sides(frame) == set()
    unpaired = pd.read_parquet(run_pair(make_config, "data=local", f"data.path={FIXTURES / 'kto_unpaired.jsonl'}",
                                        "pairing.test_fraction=0.5").path / "unpaired.parquet")
    assert unpaired.groupby("raw_prompt")["split"].nunique().max() == 1


def test_deterministic_cached_and_key_changes(make_config, tmp_path):
    first = run_pair(make_config, *SMALL)
    assert not first.cached
    again = run_pair(make_config, *SMALL, "logger=none", "sweep_name=other")
    assert again.cached and again.key == first.key
    elsewhere = pair.run(make_config(*SMALL), {}, tmp_path / "second_store")  # fresh store: same bytes
    assert elsewhere.key == first.key and not elsewhere.cached
    assert (elsewhere.path / "pairs.parquet").read_bytes() == (first.path / "pairs.parquet").read_bytes()
    assert run_pair(make_config, *SMALL, "seed=1").key != first.key
    assert run_pair(make_config, *SMALL, "pairing.bucket_edges=[0.0,0.5,1.0]").key != first.key


def test_bucket_filter_selects_train_pairs_of_one_bucket_and_shares_the_pairs(make_config):
    from pipeline.stages.train import select_rows
    full = run_pair(make_config, *SMALL)
    low_cfg = make_config(*SMALL, "pairing.bucket_filter=low")
    assert run_pair(make_config, *SMALL, "pairing.bucket_filter=low").key == full.key  # one pair artifact
    pairs = pd.read_parquet(full.path / "pairs.parquet")
    train_rows, probe_rows = select_rows(low_cfg, pairs)
    assert set(pairs.iloc[train_rows]["bucket"]) == {"low"} and set(pairs.iloc[train_rows]["split"]) == {"train"}
    assert len(train_rows) == int(((pairs["split"] == "train") & (pairs["bucket"] == "low")).sum())
    assert set(pairs.iloc[probe_rows]["split"]) == {"test"} and set(pairs.iloc[probe_rows]["bucket"]) == {"low"}
    test_low = pairs.index[(pairs["split"] == "test") & (pairs["bucket"] == "low")].tolist()
    assert probe_rows == test_low[: low_cfg.train.probe_pairs] and len(probe_rows) > 0  # the trained bucket's first N
    _, all_probes = select_rows(make_config(*SMALL), pairs)  # no filter: the first N test pairs of any bucket
    assert all_probes == pairs.index[pairs["split"] == "test"].tolist()[: low_cfg.train.probe_pairs]
    with pytest.raises(UserError, match="pairing.bucket_filter='middle'"):
        select_rows(make_config(*SMALL, "pairing.bucket_filter=middle"), pairs)


def test_quantile_buckets_with_labels(make_config):
    art = run_pair(make_config, *SMALL, "pairing.bucket_edges=null", "pairing.quantiles=2",
                   "pairing.bucket_labels=[near,far]")
    stats = json.loads((art.path / "stats.json").read_text())
    assert stats["bucket_labels"] == ["near", "far"] and len(stats["bucket_edges"]) == 3
    assert abs(stats["pairs_per_bucket"]["near"] - stats["pairs_per_bucket"]["far"]) <= 0.2 * stats["pairs_kept"]
    # Tied raw token distances (most are 1) merge quantile edges; names that no longer fit are an error.
    with pytest.raises(UserError, match="share a distance"):
        run_pair(make_config, *SMALL, "pairing.bucket_edges=null", "pairing.quantiles=3",
                 "pairing.unit=token_distance", "pairing.bucket_labels=[near,mid,far]")


def test_local_file_with_skipped_duplicate_and_bad_rows(make_config, tmp_path, capsys):
    rows = [{"prompt": f"q{i}", "chosen": f"answer {i}", "rejected": f"wrong {i}"} for i in range(200)]
    rows += [rows[0], {"prompt": "q", "chosen": "same", "rejected": "same"}]
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    art = run_pair(make_config, "data=local", f"data.path={path}")
    stats = json.loads((art.path / "stats.json").read_text())
    assert (stats["rows_read"], stats["pairs_kept"], stats["duplicates_removed"]) == (202, 200, 1)
    assert "[pair] 1 duplicate pair(s) dropped" in capsys.readouterr().out
    assert stats["skipped"] == {"chosen_equals_rejected": 1} and stats["schema"] == "prompt_chosen_rejected"
    # The file's content, not its path, is in the key.
    moved = tmp_path / "moved.jsonl"
    moved.write_bytes(path.read_bytes())
    assert run_pair(make_config, "data=local", f"data.path={moved}").cached
    with pytest.raises(UserError) as error:
        run_pair(make_config, "data=local", f"data.path={path}", "data.max_bad_fraction=0.001")
    assert "1 of 202 rows skipped" in str(error.value) and "row 202 (chosen_equals_rejected)" in str(error.value)


def test_unpaired_file_goes_to_unpaired_parquet(make_config):
    art = run_pair(make_config, "data=local", f"data.path={FIXTURES / 'kto_unpaired.jsonl'}")
    unpaired = pd.read_parquet(art.path / "unpaired.parquet")
    assert {"row_id", "prompt", "raw_prompt", "completion", "label", "split"} <= set(unpaired.columns)
    assert unpaired["label"].tolist() == [True, False, True]
    assert pd.read_parquet(art.path / "pairs.parquet").empty


def test_local_file_missing_is_one_line(make_config, tmp_path):
    with pytest.raises(UserError, match="data.path=.*nope.jsonl: file not found"):
        run_pair(make_config, "data=local", f"data.path={tmp_path / 'nope.jsonl'}")


def test_chat_template_prompts_with_the_tiny_model(make_config):
    from pipeline.modeling import models
    from pipeline.stages import model as model_stage
    cfg = make_config("model=tiny", *SMALL)
    model = model_stage.run(cfg, {}, Path(cfg.artifacts_dir))
    art = pair.run(cfg, {"model": model}, Path(cfg.artifacts_dir))
    frame = pd.read_parquet(art.path / "pairs.parquet")
    tokenizer = models.load_tokenizer(model)
    row = frame.iloc[0]
    assert row["prompt"] == tokenizer.apply_chat_template([{"role": "user", "content": row["raw_prompt"]}],
                                                          tokenize=False, add_generation_prompt=True)
    assert row["prompt"] != row["raw_prompt"]
    assert json.loads((art.path / "stats.json").read_text())["tokenizer"] == "model"
    plain = pair.run(make_config("model=tiny", *SMALL, "pairing.apply_chat_template=false"), {"model": model}, Path(cfg.artifacts_dir))
    assert (pd.read_parquet(plain.path / "pairs.parquet")["prompt"] == frame["raw_prompt"]).all()


def test_unknown_data_name_lists_the_choices():
    result = subprocess.run([sys.executable, "-m", "pipeline", "data=nosuch", "stages=[pair]", "logger=none"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "Could not find 'data/nosuch'" in result.stderr and "synthetic_math" in result.stderr


@pytest.mark.parametrize("override,fragment", [
    ("pairing.unit=words", "pairing.unit='words'"),
    ("pairing.bucket_edges=[0.5,0.2]", "strictly increasing"),
    ("pairing.bucket_filter=middle", "pairing.bucket_filter='middle'"),
    ("pairing.bucket_labels=[a,b,c]", "expected 2 names"),
    ("data.kind_mix.corrupt_step=-1", "data.kind_mix"),
    ("data.num_problems=0", "data.num_problems=0"),
])
def test_config_checks_run_before_any_data(make_config, override, fragment):
    from pipeline.orchestration.validate import check_data_and_pairing, validate
    cfg = make_config(override)
    with pytest.raises(UserError, match=fragment.replace("[", r"\[")):
        validate(cfg)
    check_data_and_pairing(make_config())  # the defaults pass


def test_local_and_hub_configs_are_checked(make_config):
    from pipeline.orchestration.validate import validate
    with pytest.raises(UserError, match="data.path"):
        validate(make_config("data=local"))
    with pytest.raises(UserError, match="data.schema='rows'"):
        validate(make_config("data=local", f"data.path={FIXTURES / 'hh_rlhf.jsonl'}", "data.schema=rows"))
    with pytest.raises(UserError, match="data.path=x.jsonl: file not found"):
        validate(make_config("data=local", "data.path=x.jsonl"))

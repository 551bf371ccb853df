"""Schema adapters on hand-written fixtures of each real schema, and every bad-input case."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from pipeline.data.adapt_source import adapt, detect_schema
from pipeline.data.adapters import SCHEMAS
from pipeline.data.readers import Loaded, load_hub, load_local
from pipeline.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures"
COLUMNS = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "completions": "completions",
           "scores": "scores", "completion_text": "text", "completion_score": "score", "question": "question",
           "choices": "choices", "answer": "answer", "completion": "completion", "label": "label"}
OPTS = {"strategy": "best_vs_worst", "min_score_gap": 0.0, "assistant_marker": "\n\nAssistant:", "human_marker": "\n\nHuman:"}


def run_adapter(path, schema="auto", columns=None, **opts):
    return adapt(load_local(path), schema, {**COLUMNS, **(columns or {})}, {**OPTS, **opts})


def test_explicit_prompt_chosen_rejected_jsonl_csv_parquet(tmp_path, capsys):
    result = run_adapter(FIXTURES / "metamath_dpop.jsonl")
    assert result.schema == "prompt_chosen_rejected" and "detected schema 'prompt_chosen_rejected'" in capsys.readouterr().out
    assert len(result.pairs) == 3 and result.pairs[0]["chosen"].startswith("First 3 + 5 = 8")
    csv = run_adapter(FIXTURES / "metamath_dpop.csv")
    assert [p["rejected"] for p in csv.pairs] == ["2 + 2 = 5\n#### 4", "3 * 3 = 6\n#### 9"]
    parquet = tmp_path / "pairs.parquet"
    pd.read_json(FIXTURES / "metamath_dpop.jsonl", lines=True).to_parquet(parquet)
    assert run_adapter(parquet).pairs == result.pairs
    as_json = tmp_path / "pairs.json"
    as_json.write_text(json.dumps({"data": [json.loads(l) for l in (FIXTURES / "metamath_dpop.jsonl").read_text().splitlines()]}))
    assert run_adapter(as_json).pairs == result.pairs


def test_chat_messages_ultrafeedback_binarized():
    result = run_adapter(FIXTURES / "ultrafeedback_binarized.jsonl")
    assert result.schema == "chat_messages" and len(result.pairs) == 3
    first = result.pairs[0]
    assert (first["raw_prompt"], first["chosen"], first["rejected"]) == (
        "Name a primary colour.", "Red is a primary colour.", "Green, which is made by mixing paint.")
    assert first["messages"] == [{"role": "user", "content": "Name a primary colour."}]
    system = result.pairs[2]
    assert [m["role"] for m in system["messages"]] == ["system", "user"] and system["chosen"] == "Hi!"


def test_chat_messages_without_context_use_the_prompt_column(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"prompt": "Hi?", "chosen": [{"role": "assistant", "content": "Hello."}],
                                "rejected": [{"role": "assistant", "content": "Go away."}]}) + "\n")
    pair = run_adapter(path).pairs[0]
    assert pair["messages"] == [{"role": "user", "content": "Hi?"}] and pair["raw_prompt"] == "Hi?"


def test_transcript_hh_rlhf_prompt_is_the_shared_prefix():
    result = run_adapter(FIXTURES / "hh_rlhf.jsonl")
    assert result.schema == "transcript"
    first, second = result.pairs
    assert first["raw_prompt"] == "\n\nHuman: What is the capital of France?\n\nAssistant:"
    assert (first["chosen"], first["rejected"]) == ("The capital of France is Paris.", "I don't know.")
    assert second["raw_prompt"].endswith("Tell me a joke.\n\nAssistant:") and second["rejected"] == "No."
    assert [m["role"] for m in second["messages"]] == ["user", "assistant", "user"]


@pytest.mark.parametrize("strategy,gap,expected", [
    ("best_vs_worst", 0.0, [("Soft rain on the roof", "I like trains."), ("2 + 3 = 5", "2 + 3 = 6")]),
    ("best_vs_each", 0.0, [("Soft rain on the roof", "Grey clouds weep softly"), ("Soft rain on the roof", "Rain is wet."),
                           ("Soft rain on the roof", "I like trains."), ("2 + 3 = 5", "2 + 3 = 6")]),
    ("all_pairs", 3.0, [("Soft rain on the roof", "Rain is wet."), ("Soft rain on the roof", "I like trains."),
                        ("Grey clouds weep softly", "Rain is wet."), ("Grey clouds weep softly", "I like trains."),
                        ("2 + 3 = 5", "2 + 3 = 6")]),
])
def test_scored_completions_strategies(strategy, gap, expected):
    columns = {"prompt": "instruction", "completion_text": "response", "completion_score": "overall_score"}
    result = run_adapter(FIXTURES / "ultrafeedback_scored.jsonl", "auto", columns, strategy=strategy, min_score_gap=gap)
    assert result.schema == "scored_completions"
    assert [(p["chosen"], p["rejected"]) for p in result.pairs] == expected


def test_scored_completions_with_parallel_scores_and_nan(tmp_path):
    path = tmp_path / "scored.jsonl"
    rows = [{"prompt": "p1", "completions": ["a", "b", "c"], "scores": [1, 3, 2]},
            {"prompt": "p2", "completions": ["x", "y"], "scores": [1.0, float("nan")]}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    result = run_adapter(path)
    assert [(p["chosen"], p["rejected"]) for p in result.pairs] == [("b", "a")]
    assert result.skipped == {"nan_score": 1} and result.bad_rows == [(2, "nan_score")]


def test_multiple_choice_arc_labels_and_hellaswag_indices():
    arc = run_adapter(FIXTURES / "arc_challenge.jsonl", columns={"answer": "answerKey"})
    assert arc.schema == "multiple_choice" and len(arc.pairs) == 3 + 2
    assert {p["chosen"] for p in arc.pairs[:3]} == {"carbon dioxide"}
    assert [p["rejected"] for p in arc.pairs[:3]] == ["oxygen", "nitrogen", "helium"]
    assert arc.pairs[0]["raw_prompt"].endswith("\nB. carbon dioxide\nC. nitrogen\nD. helium\nAnswer:")
    assert arc.pairs[3]["chosen"] == "100 C"  # answerKey "2" is a label here, not an index
    hellaswag = run_adapter(FIXTURES / "hellaswag.jsonl", "multiple_choice",
                            {"question": "ctx", "choices": "endings", "answer": "label"})
    assert len(hellaswag.pairs) == 3 and hellaswag.pairs[0]["chosen"] == "starts pulling up roofing on a roof."


def test_unpaired_rows_stay_unpaired():
    result = run_adapter(FIXTURES / "kto_unpaired.jsonl")
    assert result.schema == "unpaired" and not result.pairs
    assert [(r["completion"], r["label"]) for r in result.unpaired] == [("3 + 4 = 7.", True), ("3 + 4 = 8.", False), ("An apple.", True)]


def test_every_schema_has_an_adapter_and_detection_names_what_it_tried():
    assert set(SCHEMAS) == {"prompt_chosen_rejected", "chat_messages", "transcript", "scored_completions", "multiple_choice", "unpaired"}
    with pytest.raises(UserError, match=r"unknown schema; columns found: \['input', 'output'\]; schemas tried: \['prompt_chosen_rejected'"):
        detect_schema([{"input": "a", "output": "b"}], COLUMNS, "f.jsonl")


def test_row_level_problems_are_skipped_and_counted(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "", "rejected": "b"},
            {"prompt": "p", "chosen": "a", "rejected": "  "}, {"prompt": "p", "chosen": "same", "rejected": "same"},
            {"prompt": "p", "chosen": None, "rejected": "b"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    result = run_adapter(path)
    assert len(result.pairs) == 1
    assert result.skipped == {"empty_chosen": 2, "empty_rejected": 1, "chosen_equals_rejected": 1}
    assert [r for r, _ in result.bad_rows] == [2, 3, 4, 5]


# ---------------------------------------------------------------- bad input: one line naming file/row/key

def write(tmp_path, name, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def assert_one_line(error: pytest.ExceptionInfo, *fragments: str):
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_file(tmp_path):
    with pytest.raises(UserError) as error:
        load_local(tmp_path / "nope.jsonl")
    assert_one_line(error, "nope.jsonl", "file not found")


def test_directory_and_unknown_extension(tmp_path):
    with pytest.raises(UserError) as error:
        load_local(tmp_path)
    assert_one_line(error, "not a readable file")
    with pytest.raises(UserError) as error:
        load_local(write(tmp_path, "data.txt", "x"))
    assert_one_line(error, "data.txt", "unknown file type '.txt'", ".jsonl")


@pytest.mark.parametrize("name", ["latin1.jsonl", "latin1.csv", "latin1.json"])
def test_non_utf8_file_is_named(tmp_path, name):
    path = write(tmp_path, name, '{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'.encode("latin-1"))
    with pytest.raises(UserError) as error:
        load_local(path)
    assert_one_line(error, name, "not UTF-8", "offset 15")


def test_invalid_json_line_and_non_object(tmp_path):
    with pytest.raises(UserError) as error:
        load_local(write(tmp_path, "bad.jsonl", '{"prompt": "a"}\n{"prompt": \n'))
    assert_one_line(error, "bad.jsonl line 2", "invalid JSON")
    with pytest.raises(UserError) as error:
        load_local(write(tmp_path, "list.jsonl", '[1, 2]\n'))
    assert_one_line(error, "list.jsonl line 1", "expected a JSON object")


def test_corrupt_parquet(tmp_path):
    with pytest.raises(UserError) as error:
        load_local(write(tmp_path, "bad.parquet", b"not parquet at all"))
    assert_one_line(error, "bad.parquet", "not a readable Parquet file")


def test_empty_dataset(tmp_path):
    with pytest.raises(UserError) as error:
        adapt(load_local(write(tmp_path, "empty.jsonl", "\n")), "auto", COLUMNS, OPTS)
    assert_one_line(error, "empty.jsonl", "empty (0 rows)")


def test_unknown_schema_lists_columns_and_schemas(tmp_path):
    path = write(tmp_path, "odd.jsonl", json.dumps({"instruction": "a", "good": "b", "bad": "c"}) + "\n")
    with pytest.raises(UserError) as error:
        adapt(load_local(path), "auto", COLUMNS, OPTS)
    assert_one_line(error, "odd.jsonl", "columns found: ['bad', 'good', 'instruction']", "schemas tried", "data.columns")
    with pytest.raises(UserError) as error:
        adapt(load_local(path), "pairs", COLUMNS, OPTS)
    assert_one_line(error, "data.schema='pairs'", "prompt_chosen_rejected")


def test_missing_field_names_row_and_key(tmp_path):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a"}]
    path = write(tmp_path, "missing.jsonl", "\n".join(json.dumps(r) for r in rows))
    with pytest.raises(UserError) as error:
        adapt(load_local(path), "prompt_chosen_rejected", COLUMNS, OPTS)
    assert_one_line(error, "missing.jsonl row 2", "missing key 'rejected'", "columns found: ['chosen', 'prompt']")


@pytest.mark.parametrize("row,schema,fragment", [
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "prompt_chosen_rejected", "key 'chosen' is int, expected a string"),
    ({"prompt": "p", "chosen": "a", "rejected": ["b"]}, "prompt_chosen_rejected", "key 'rejected' is list"),
    ({"chosen": [{"role": "user"}], "rejected": []}, "chat_messages", "expected messages {role, content}"),
    ({"chosen": "text", "rejected": "text2", "prompt": "p"}, "chat_messages", "key 'chosen' is str, expected a list"),
    ({"prompt": "p", "completions": ["a", "b"], "scores": ["high", 1]}, "scored_completions", "score 'high'"),
    ({"prompt": "p", "completions": ["a", "b"], "scores": [1]}, "scored_completions", "2 completions but 1 scores"),
    ({"question": "q", "choices": ["a", "b"], "answer": 7}, "multiple_choice", "'answer'=7 is neither an index"),
    ({"question": "q", "choices": "a b", "answer": 0}, "multiple_choice", "must be a list of at least two strings"),
    ({"prompt": "p", "completion": "c", "label": "maybe"}, "unpaired", "'label'='maybe'; expected a boolean"),
])
def test_wrongly_typed_fields_name_row_and_key(tmp_path, row, schema, fragment):
    path = write(tmp_path, "typed.jsonl", json.dumps(row) + "\n")
    with pytest.raises(UserError) as error:
        adapt(load_local(path), schema, COLUMNS, OPTS)
    assert_one_line(error, "typed.jsonl row 1", fragment)


def test_hub_offline_is_one_line_pointing_to_local_files():
    with pytest.raises(UserError) as error:
        load_hub("abacusai/MetaMath_DPO_FewShot", "train")
    assert_one_line(error, "data.hub_id=abacusai/MetaMath_DPO_FewShot", "cannot load from the Hugging Face hub", "data=local data.path=")


def test_loaded_records_pass_through_unchanged():
    loaded = Loaded([{"prompt": "p", "chosen": "a", "rejected": "b"}], "memory")
    assert adapt(loaded, "prompt_chosen_rejected", COLUMNS, OPTS).pairs[0]["kind"] == "explicit"


@pytest.mark.parametrize("fixture, schema, expected", [
    ("arc_challenge.jsonl", "multiple_choice", 5),   # 3 + 2 distractors
    ("hellaswag.jsonl", "multiple_choice", 3),
    ("ultrafeedback_scored.jsonl", "scored_completions", None),
])
def test_public_layouts_are_recognised_without_column_mappings(fixture, schema, expected, capsys):
    """ARC, HellaSwag and raw UltraFeedback as published: auto-detection maps their columns itself and gives
    the pairs that the explicit mapping gives."""
    mapping = {"arc_challenge.jsonl": {"answer": "answerKey"},
               "hellaswag.jsonl": {"question": "ctx", "choices": "endings", "answer": "label"},
               "ultrafeedback_scored.jsonl": {"prompt": "instruction", "completion_text": "response",
                                              "completion_score": "overall_score"}}[fixture]
    found = run_adapter(FIXTURES / fixture)
    assert found.schema == schema and "recognised the" in capsys.readouterr().out
    explicit = run_adapter(FIXTURES / fixture, schema, mapping)
    assert found.pairs == explicit.pairs and len(found.pairs) == (expected or len(explicit.pairs)) > 0


def test_a_users_mapping_wins_over_a_known_layout(tmp_path):
    rows = [{"question": "2 + 2?", "choices": ["3", "4", "5"], "answerKey": "A", "gold": 1}]
    path = tmp_path / "arc_like.jsonl"
    path.write_text(json.dumps(rows[0]))
    assert {p["chosen"] for p in run_adapter(path, columns={"answer": "gold"}).pairs} == {"4"}
    assert {p["chosen"] for p in run_adapter(path).pairs} == {"3"}  # the layout's answerKey "A"


@pytest.mark.parametrize("preset, fixture", [("arc", "arc_challenge.jsonl"), ("hellaswag", "hellaswag.jsonl"),
                                             ("ultrafeedback_raw", "ultrafeedback_scored.jsonl")])
def test_raw_hub_presets_read_their_published_layout(preset, fixture):
    """Each raw-dataset preset's schema and column roles, applied to a file in that dataset's layout, give
    the pairs that auto-detection of the same file gives (gap 0 here; the preset's own gap only drops pairs)."""
    from conftest import compose_config
    data = compose_config(f"data={preset}").data
    columns = OmegaConf.to_container(data.columns, resolve=True)
    from_preset = run_adapter(FIXTURES / fixture, str(data.schema), columns,
                              strategy=str(data.multi_completion_strategy))
    assert from_preset.pairs == run_adapter(FIXTURES / fixture).pairs and from_preset.pairs
    assert data.source == "hub" and data.hub_id

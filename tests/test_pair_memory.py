"""The pair stage reads its input in batches (two passes, bounded memory): the artifact is the same
whatever the batch size, duplicates are found across batches, quantile buckets use every pair, and
bad rows are still named by file and row, with the errors reading the whole file first gave."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from pipeline.data import parquet_rows
from pipeline.stages import pair
from pipeline.data.adapt_source import adapt
from pipeline.data.readers import load_local
from pipeline.data.distance import distances_and_buckets, fallback_tokenize
from pipeline.errors import UserError
from tests.conftest import compose_config

SMALL_BATCHES = {"BATCH_ROWS": 7, "DISTANCE_CHUNK": 3}  # dozens of batches on the files below
FILES = ("pairs.parquet", "unpaired.parquet", "stats.json", "histogram.png", "eval_mc.jsonl", "eval_gen.jsonl")


def run_stage(root: Path, *overrides: str, upstream=None, **sizes):
    """The real stage into its own store, with module sizes (BATCH_ROWS, ...) changed for this run only."""
    cfg = compose_config(f"artifacts_dir={root}", *overrides)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in sizes.items():
            patch.setattr(parquet_rows if name.startswith("ROW_GROUP_") else pair, name, value)
        return pair.run(cfg, upstream or {}, root)


def artifact_bytes(artifact) -> dict[str, bytes]:
    return {name: (artifact.path / name).read_bytes() for name in FILES if (artifact.path / name).exists()}


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def explicit_rows() -> list[dict]:
    """60 pairs (prompts shared by several rows, small and large edits), a skipped row, and repeats of
    rows 1 and 2 far from them (other batches)."""
    rows = []
    for i in range(60):
        chosen = f"Step one gives {i * 7}. Step two gives {i * 7 + 3}.\n#### {i * 7 + 3}"
        rejected = (chosen[:-(i % 9 + 1)] + "x" * (i % 9 + 1) if i % 2  # small edits of several sizes, or another text
                    else f"We guess {i}{' maybe' * (i % 5)}.\n#### {i}")
        rows.append({"prompt": f"Question {i % 45}: what is {i % 45} times seven, plus three?", "chosen": chosen, "rejected": rejected})
    rows.insert(41, {"prompt": "q", "chosen": "same", "rejected": "same"})
    return rows + [rows[0], rows[1]]


def write_case(tmp_path: Path, case: str) -> list[str]:
    """Writes the case's input; returns its overrides."""
    if case in ("explicit", "explicit_quantiles", "parquet", "csv"):
        path = jsonl(tmp_path / "explicit.jsonl", explicit_rows())
        if case in ("parquet", "csv"):
            frame = pd.read_json(path, lines=True)
            path = tmp_path / f"explicit.{case}"
            frame.to_parquet(path, index=False) if case == "parquet" else frame.to_csv(path, index=False)
        extra = ["pairing.bucket_edges=null", "pairing.quantiles=3", "pairing.unit=char_ned"] if case == "explicit_quantiles" else []
        return ["data=local", f"data.path={path}", "data.max_bad_fraction=0.1", "pairing.test_fraction=0.5", *extra]
    if case == "transcript":  # no chat context in the first batches, a context later: prompt_messages null, then text
        rows = [{"chosen": f"\n\nAssistant: Answer {i}.", "rejected": f"\n\nAssistant: Answer {i + 1}!"} for i in range(30)]
        rows += [{"chosen": f"\n\nHuman: Say {i}.\n\nAssistant: {i}.", "rejected": f"\n\nHuman: Say {i}.\n\nAssistant: No."}
                 for i in range(12)]
        return ["data=local", f"data.path={jsonl(tmp_path / 'hh.jsonl', rows)}"]
    if case == "scored":  # 6 pairs per row: batches of rows hold dozens of pairs
        rows = [{"prompt": f"Say {i}.", "completions": [f"{i}", f"{i}!", f"{i}?", f"no {i}"], "scores": [4, 3, 2, 1]}
                for i in range(20)]
        return ["data=local", f"data.path={jsonl(tmp_path / 'scored.jsonl', rows + rows[:3])}",
                "data.multi_completion_strategy=all_pairs"]
    if case == "unpaired":
        rows = [{"prompt": f"{i} + 1?", "completion": f"{i + 1 + i % 2}", "label": i % 2 == 0} for i in range(40)]
        return ["data=local", f"data.path={jsonl(tmp_path / 'kto.jsonl', rows + rows[:2])}"]
    assert case == "synthetic"
    return ["data.num_problems=30", "data.num_eval_items=10"]


CASES = ("explicit", "explicit_quantiles", "parquet", "csv", "transcript", "scored", "unpaired", "synthetic")


@pytest.mark.parametrize("case", CASES)
def test_small_batches_give_the_same_artifact_byte_for_byte(tmp_path, case):
    overrides = write_case(tmp_path, case)
    whole = run_stage(tmp_path / "one_batch", *overrides, BATCH_ROWS=10**6, DISTANCE_CHUNK=10**6)
    batched = run_stage(tmp_path / "batched", *overrides, **SMALL_BATCHES)
    assert batched.key == whole.key  # batch sizes are not settings: one artifact
    assert artifact_bytes(batched) == artifact_bytes(whole)
    stats = json.loads((whole.path / "stats.json").read_text())
    if case in ("explicit", "explicit_quantiles", "parquet", "csv"):
        # Duplicates 40 rows apart (other batches) are found; the skipped row is counted.
        assert (stats["rows_read"], stats["pairs_kept"], stats["duplicates_removed"]) == (63, 60, 2)
        assert stats["skipped"] == {"chosen_equals_rejected": 1} and stats["bad_rows"] == [[42, "chosen_equals_rejected"]]
        assert stats["prompts_per_split"]["train"] + stats["prompts_per_split"]["test"] == 45
    if case == "transcript":
        messages = pd.read_parquet(whole.path / "pairs.parquet")["prompt_messages"]
        assert messages.isna().sum() == 30 and messages.notna().sum() == 12
    if case == "unpaired":
        assert stats["unpaired_rows"] == 40 and len(pd.read_parquet(whole.path / "unpaired.parquet")) == 40


def test_small_batches_with_the_model_tokenizer_and_chat_template(tmp_path, tiny_model_artifact):
    overrides = write_case(tmp_path, "explicit_quantiles")
    upstream = {"model": tiny_model_artifact}
    whole = run_stage(tmp_path / "one_batch", *overrides, upstream=upstream, BATCH_ROWS=10**6, DISTANCE_CHUNK=10**6)
    batched = run_stage(tmp_path / "batched", *overrides, upstream=upstream, **SMALL_BATCHES)
    assert json.loads((whole.path / "stats.json").read_text())["tokenizer"] == "model"
    assert artifact_bytes(batched) == artifact_bytes(whole)


def test_matches_the_whole_data_computation(tmp_path):
    """pairs.parquet of a many-batch run is what the stage computed from all pairs at once before it
    streamed: one frame, drop_duplicates, distances and quantile edges over every kept pair."""
    overrides = write_case(tmp_path, "explicit_quantiles")
    frame = pd.read_parquet(run_stage(tmp_path / "store", *overrides, **SMALL_BATCHES).path / "pairs.parquet")
    cfg = compose_config(*overrides)
    adapted = adapt(load_local(cfg.data.path), "auto", OmegaConf.to_container(cfg.data.columns), {"strategy": "best_vs_worst"})
    expected, duplicates = pair.build_pairs_frame(adapted.pairs, [p["raw_prompt"] for p in adapted.pairs], "local", 0.5)
    columns, _, _ = distances_and_buckets(expected["chosen"].tolist(), expected["rejected"].tolist(), fallback_tokenize,
                                          "char_ned", None, 3, None)
    for name, values in columns.items():
        expected[name] = values
    assert duplicates == 2 and set(expected["bucket"]) == {"b0", "b1", "b2"}
    pd.testing.assert_frame_equal(frame, expected)


def test_row_groups_do_not_depend_on_the_batch_size(tmp_path):
    overrides = write_case(tmp_path, "explicit")
    whole = run_stage(tmp_path / "whole", *overrides)
    for rows, text_bytes in ((5, 10**9), (10**6, 2000)):  # groups cut by row count, then by bytes of text
        sizes = {"ROW_GROUP_ROWS": rows, "ROW_GROUP_BYTES": text_bytes}
        runs = [run_stage(tmp_path / f"{rows}-{batch}", *overrides, BATCH_ROWS=batch, DISTANCE_CHUNK=2, **sizes)
                for batch in (3, 7)]
        files = [run.path / "pairs.parquet" for run in runs]
        assert files[0].read_bytes() == files[1].read_bytes()
        assert pq.ParquetFile(files[0]).metadata.num_row_groups >= 4
        assert pq.read_table(files[0]).equals(pq.read_table(whole.path / "pairs.parquet"), check_metadata=True)
        assert artifact_bytes(runs[0])["stats.json"] == artifact_bytes(whole)["stats.json"]


def bad_jsonl(tmp_path: Path, lines: list[bytes]) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def good_line(i: int) -> bytes:
    return json.dumps({"prompt": f"p{i}", "chosen": f"yes {i}", "rejected": f"no {i}"}).encode()


def stage_error(tmp_path: Path, path: Path, *overrides: str) -> str:
    with pytest.raises(UserError) as error:
        run_stage(tmp_path / "store", "data=local", f"data.path={path}", *overrides, **SMALL_BATCHES)
    message = str(error.value)
    assert str(path) in message and "\n" not in message
    return message


def test_bad_row_in_a_later_batch_is_named(tmp_path):
    lines = [good_line(i) for i in range(30)]
    lines[22] = json.dumps({"prompt": "p", "chosen": 3, "rejected": "b"}).encode()
    assert "row 23: key 'chosen' is int" in stage_error(tmp_path, bad_jsonl(tmp_path, lines))


def test_errors_keep_the_order_of_reading_the_whole_file_first(tmp_path):
    lines = [good_line(i) for i in range(40)]
    lines[9] = json.dumps({"prompt": "p", "chosen": 3, "rejected": "b"}).encode()  # a row error in batch 2 ...
    lines[24] = b'{"prompt": '  # ... and an unreadable line further on: the file's error comes first
    assert "line 25: invalid JSON" in stage_error(tmp_path, bad_jsonl(tmp_path, lines))
    lines[35] = b'{"prompt": "caf\xe9"}'  # a non-UTF-8 byte anywhere comes before any invalid line
    path = bad_jsonl(tmp_path, lines)
    whole_file_offset = len(b"".join(line + b"\n" for line in lines[:35])) + len(b'{"prompt": "caf')
    assert f"not UTF-8 text (invalid byte at offset {whole_file_offset})" in stage_error(tmp_path, path)
    # data.limit reads the first rows, but the rest of the file is still checked, as before.
    lines = [good_line(i) for i in range(30)] + [b"[1, 2]"]
    assert "line 31: expected a JSON object" in stage_error(tmp_path, bad_jsonl(tmp_path, lines), "data.limit=5")


def test_jsonl_lines_are_those_of_the_whole_text():
    """Lines end at newlines only: CRLF, blank lines, a byte-order mark; a raw U+2028 inside a JSON string
    (legal JSON, a line break for str.splitlines) stays in its string."""
    import tempfile
    rows = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(5)]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "crlf.jsonl"
        path.write_bytes(b"\xef\xbb\xbf" + b"\r\n\r\n".join(json.dumps(r).encode() for r in rows) + b"\r\n")
        assert load_local(path).records == rows
        path.write_bytes(b"\n".join([json.dumps(rows[0]).encode(), b"", json.dumps({"prompt": "a\u2028b"}, ensure_ascii=False).encode()]))
        assert load_local(path).records == [rows[0], {"prompt": "a\u2028b"}]
        path.write_bytes(b"\n".join([json.dumps(rows[0]).encode(), b"", b'{"prompt": ']))
        with pytest.raises(UserError, match="line 3: invalid JSON"):
            load_local(path)


def test_a_file_that_changes_between_the_passes_is_an_error(tmp_path, monkeypatch):
    overrides = write_case(tmp_path, "explicit")
    path = Path(overrides[1].split("=", 1)[1])
    scan = pair.scan_pairs

    def scan_then_edit(*args, **kwargs):
        result = scan(*args, **kwargs)
        rows = explicit_rows()
        rows[20]["chosen"] += " (edited)"
        jsonl(path, rows)
        return result
    monkeypatch.setattr(pair, "scan_pairs", scan_then_edit)
    with pytest.raises(UserError, match="changed while the pair stage was reading it"):
        run_stage(tmp_path / "store", *overrides, **SMALL_BATCHES)

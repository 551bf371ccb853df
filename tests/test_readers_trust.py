"""Data files the readers used to misread: duplicated Parquet columns, line separators inside JSON strings,
lone surrogates, all-digit CSV columns."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import UserError
from pipeline.data.readers import load_local


def test_a_parquet_file_naming_a_column_twice_is_refused_like_csv(tmp_path):
    path = tmp_path / "pairs.parquet"
    columns = [pa.array(["2 + 2?"]), pa.array(["4"]), pa.array(["5"]), pa.array(["6"])]
    pq.write_table(pa.Table.from_arrays(columns, names=["prompt", "chosen", "rejected", "rejected"]), path)
    with pytest.raises(UserError, match=r"column\(s\) \['rejected'\] appear more than once"):
        load_local(path)


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\u0085"])
def test_line_separators_inside_jsonl_strings_are_text(tmp_path, separator):
    """JSON allows these raw inside strings; the file's lines end at newlines only."""
    rows = [{"prompt": f"first{separator}second", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "c", "rejected": "d"}]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    assert separator in path.read_text(encoding="utf-8")  # written raw, not escaped
    assert load_local(path).records == rows


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_lone_surrogate_is_refused_with_its_row(tmp_path, suffix):
    good = '{"prompt": "p", "chosen": "a \\ud83d\\ude00", "rejected": "b"}'  # an escaped pair: one emoji, fine
    bad = '{"prompt": "p", "chosen": "a \\ud800 b", "rejected": "c"}'
    path = tmp_path / f"data{suffix}"
    path.write_text(f"{good}\n{bad}\n" if suffix == ".jsonl" else f"[{good},\n{bad}]")
    where = "line 2" if suffix == ".jsonl" else "record 2"
    with pytest.raises(UserError, match=f"{where}: a lone UTF-16 surrogate"):
        load_local(path)
    path.write_text(f"{good}\n" if suffix == ".jsonl" else f"[{good}]")
    assert load_local(path).records[0]["chosen"] == "a \U0001F600"


def test_all_digit_csv_columns_are_read_as_text(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("prompt,chosen,rejected,label\n12,007,7,1\n34,0.50,5e1,0\n")
    records = load_local(path).records
    assert records == [{"prompt": "12", "chosen": "007", "rejected": "7", "label": "1"},
                       {"prompt": "34", "chosen": "0.50", "rejected": "5e1", "label": "0"}]


def test_an_unpaired_csv_label_of_digits_is_a_boolean(tmp_path):
    from pipeline.data.adapters import adapt_unpaired
    cols = {"prompt": "prompt", "completion": "completion", "label": "label"}
    path = tmp_path / "data.csv"
    path.write_text("prompt,completion,label\nq,yes,1\nq,no,0\n")
    rows = [adapt_unpaired(record, n, cols, {}, str(path))[0] for n, record in enumerate(load_local(path).records, 1)]
    assert [row["label"] for row in rows] == [True, False]

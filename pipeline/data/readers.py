"""Read preference data batch by batch: local files (JSONL, JSON, Parquet, CSV) and hub splits.

``open_local`` / ``open_hub`` return a ``Source`` that the pair stage reads twice without holding the whole
input; ``load_local`` / ``load_hub`` read everything at once (tests, small files). Unreadable input (not
UTF-8, an invalid JSON line, a missing file) raises a one-line ``UserError`` naming the file and line.

JSONL lines end at ``\n`` (or ``\r\n``) only: U+0085 and U+2028/U+2029 are legal inside JSON strings,
so they stay in the text. A lone UTF-16 surrogate (``"\ud800"``) decodes to no Unicode text and could not
be stored: refused with the line (or record) number. CSV cells are read as text (``"007"`` stays
``"007"``); the adapters convert the fields that hold numbers. A Parquet file naming a column twice is
refused like a CSV header that does.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from pipeline.errors import UserError

FILE_TYPES = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class Loaded:
    records: list[dict[str, Any]]
    origin: str          # what error messages name: the file path or hub id:split


BATCH_ROWS = 4096  # records per batch when a source is read batch by batch


class Source:
    """The records of one file or hub split, read batch by batch, from the start each time ``batches``
    is called: the pair stage reads its input twice and never holds all of it (JSONL and Parquet are
    read as they go; a JSON file is parsed whole and a CSV file into one DataFrame, then handed out in
    batches). The errors are those of reading the whole file at once, in the same order: a byte that is
    not UTF-8 anywhere in a JSONL file comes before its first invalid line, and the rest of a file past
    ``limit`` is still checked."""

    def __init__(self, origin: str, read: Callable[[int], Iterator[list[dict[str, Any]]]], limit: int | None = None):
        self.origin = origin
        self._read = read  # batch size -> record lists in file order
        self.limit = limit or None

    def batches(self, size: int = BATCH_ROWS, check_all: bool = True) -> Iterator[list[dict[str, Any]]]:
        """Lists of at most ``size`` records; ``check_all=False`` stops at ``limit`` instead of reading the
        rest for errors (a second pass over a file already read once)."""
        remaining = self.limit
        for batch in self._read(size):
            if remaining is None:
                yield batch
                continue
            if remaining > 0 and batch:
                part = batch[:remaining]
                remaining -= len(part)
                yield part
            if remaining == 0 and not check_all:
                return

    def records(self) -> list[dict[str, Any]]:
        return [record for batch in self.batches() for record in batch]


def read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise UserError(not_utf8(path, error.start)) from None


def not_utf8(path: Path, offset: int) -> str:
    return f"{path}: not UTF-8 text (invalid byte at offset {offset}); re-save the file as UTF-8"


SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # a JSON escape of a UTF-16 surrogate (valid in pairs)


def lone_surrogate(line: str, value: Any) -> bool:
    """Whether ``value`` (parsed from ``line``) holds a surrogate that no pair completes: not Unicode text."""
    if not SURROGATE_ESCAPE.search(line):
        return False
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def json_lines(text: str) -> list[str]:
    """Lines split at \n, \r\n or \r only (str.splitlines would also split at U+0085, U+2028, ... inside strings)."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def jsonl_batches(path: Path, size: int) -> Iterator[list[dict[str, Any]]]:
    """JSONL records, ``size`` at a time, read line by line: the same lines, line numbers and errors as
    decoding the whole file (``utf-8-sig``) and splitting it at line ends (``json_lines``). A UTF-8 sequence
    never contains the byte 0x0A, so each newline-terminated piece decodes alone; offsets count from
    after a byte-order mark, as the whole-file decode does."""
    batch: list[dict[str, Any]] = []
    number = offset = bom = 0
    pending: UserError | None = None
    with path.open("rb") as handle:
        for raw in handle:
            try:
                text = raw.decode("utf-8-sig") if offset == 0 else raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise UserError(not_utf8(path, error.start if offset == 0 else offset - bom + error.start)) from None
            if offset == 0 and raw.startswith(codecs.BOM_UTF8):
                bom = len(codecs.BOM_UTF8)
            offset += len(raw)
            if pending is not None:
                continue  # decoding only: a non-UTF-8 byte further on is still the error reported
            for line in json_lines(text.removesuffix("\n").removesuffix("\r")):
                number += 1
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as error:
                    pending = UserError(f"{path} line {number}: invalid JSON ({error.msg}); expected one JSON object per line")
                    break
                if not isinstance(value, dict):
                    pending = UserError(f"{path} line {number}: expected a JSON object, got {type(value).__name__}")
                    break
                if lone_surrogate(line, value):
                    pending = UserError(f"{path} line {number}: a lone UTF-16 surrogate escape (\\ud800-\\udfff without "
                                        "its pair) is not text; expected valid Unicode strings")
                    break
                batch.append(value)
            if pending is None and len(batch) >= size:
                yield batch
                batch = []
    if pending is not None:
        raise pending
    if batch:
        yield batch


def read_json(path: Path) -> list[dict[str, Any]]:
    text = read_text(path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: invalid JSON at line {error.lineno} ({error.msg})") from None
    if isinstance(value, dict):  # {"data": [...]} or {"train": [...]}: one list of records inside
        lists = [v for v in value.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise UserError(f"{path}: expected a JSON list of objects (or an object holding exactly one such list)")
        value = lists[0]
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise UserError(f"{path}: expected a JSON list of objects")
    if SURROGATE_ESCAPE.search(text):
        bad = next((n for n, record in enumerate(value, 1) if lone_surrogate(text, record)), None)
        if bad is not None:
            raise UserError(f"{path} record {bad}: a lone UTF-16 surrogate escape (\\ud800-\\udfff without its pair) "
                            "is not text; expected valid Unicode strings")
    return value


def read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq
    try:
        table = pq.read_table(path)
    except Exception as error:  # pyarrow raises several types for a corrupt file
        raise UserError(f"{path}: not a readable Parquet file ({type(error).__name__}: {error})") from None
    check_unique_columns(path, table.column_names)
    return table.to_pylist()


def check_unique_columns(path: Path, names: list[str]) -> None:
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:  # a record dict would silently keep one of them
        raise UserError(f"{path}: column(s) {repeated} appear more than once; expected unique column names")


def parquet_batches(path: Path, size: int) -> Iterator[list[dict[str, Any]]]:
    """Parquet records, ``size`` at a time (the same values as ``read_parquet``, one batch decoded at a time)."""
    import pyarrow.parquet as pq
    try:
        handle = pq.ParquetFile(path)
    except Exception:
        read_parquet(path)  # a corrupt file: the message of reading it whole
        raise
    check_unique_columns(path, handle.schema_arrow.names)
    try:
        for batch in handle.iter_batches(batch_size=size):
            yield batch.to_pylist()
    except Exception:
        read_parquet(path)  # a corrupt file: the message of reading it whole
        raise


def csv_frame(path: Path):
    import pandas as pd
    text = read_text(path)  # names non-UTF-8 files the same way as the other formats
    header = next(csv.reader(io.StringIO(text.lstrip("\ufeff"))), [])
    del text
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:  # pandas would silently rename the second one ("x.1") and read the first
        raise UserError(f"{path}: column(s) {repeated} appear more than once in the header; expected unique column names")
    try:  # every cell as text: an all-digit column of answers is text ("007"), not numbers
        return pd.read_csv(path, encoding="utf-8-sig", keep_default_na=False, na_values=[""], dtype=str)
    except Exception as error:
        raise UserError(f"{path}: not a readable CSV file ({type(error).__name__}: {error})") from None


def frame_records(frame) -> list[dict[str, Any]]:
    native = lambda v: v.item() if hasattr(v, "item") else v  # noqa: E731  numpy scalars -> Python
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in ((k, native(v)) for k, v in row.items())}
            for row in frame.to_dict(orient="records")]


def held(load: Callable[[], Any], rows: Callable[[Any, int, int], list[dict[str, Any]]]) -> Callable[[int], Iterator[list[dict[str, Any]]]]:
    """Batches of something read whole once (a JSON list, a CSV DataFrame, a hub dataset) and kept for the
    next pass; ``rows(data, start, stop)`` gives one batch's records."""
    kept: list[Any] = []

    def read(size: int) -> Iterator[list[dict[str, Any]]]:
        if not kept:
            kept.append(load())
        data = kept[0]
        for start in range(0, len(data), size):
            yield rows(data, start, min(start + size, len(data)))
    return read


BATCH_READERS: dict[str, Callable[[Path], Callable[[int], Iterator[list[dict[str, Any]]]]]] = {
    "jsonl": lambda path: lambda size: jsonl_batches(path, size),
    "parquet": lambda path: lambda size: parquet_batches(path, size),
    "json": lambda path: held(lambda: read_json(path), lambda data, start, stop: data[start:stop]),
    "csv": lambda path: held(lambda: csv_frame(path), lambda frame, start, stop: frame_records(frame.iloc[start:stop])),
}


def guarded(path: Path, read: Callable[[int], Iterator[list[dict[str, Any]]]]) -> Callable[[int], Iterator[list[dict[str, Any]]]]:
    def reading(size: int) -> Iterator[list[dict[str, Any]]]:
        try:
            yield from read(size)
        except OSError as error:
            raise UserError(f"data.path={path}: cannot read ({error.strerror})") from None
    return reading


def open_local(path: str | Path, limit: int | None = None) -> Source:
    """A local JSONL, JSON, Parquet or CSV file as a ``Source`` (checked now, read batch by batch later)."""
    path = Path(os.path.expanduser(str(path)))
    if not path.exists():
        raise UserError(f"data.path={path}: file not found")
    if not path.is_file() or not os.access(path, os.R_OK):
        raise UserError(f"data.path={path}: not a readable file")
    kind = FILE_TYPES.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"data.path={path}: unknown file type '{path.suffix}'; expected one of {sorted(FILE_TYPES)}")
    return Source(str(path), guarded(path, BATCH_READERS[kind](path)), limit)


def load_local(path: str | Path, limit: int | None = None) -> Loaded:
    source = open_local(path, limit)
    return Loaded(source.records(), source.origin)


def open_hub(hub_id: str, split: str, limit: int | None = None, revision: str | None = None,
             subset: str | None = None) -> Source:
    """A hub dataset split (of configuration ``subset``, when it has several) as a ``Source``: loaded
    (memory-mapped Arrow) now, converted to records batch by batch."""
    try:
        import datasets
        dataset = datasets.load_dataset(hub_id, subset, split=split, revision=revision)
    except Exception as error:  # offline, unknown id, missing split: one line for the user either way
        reason = " ".join(str(error).split())[:200]
        raise UserError(f"data.hub_id={hub_id} split={split}: cannot load from the Hugging Face hub "
                        f"(unreachable offline or unknown id: {type(error).__name__}: {reason}); "
                        f"download the file and use data=local data.path=<file> (JSONL, JSON, Parquet or CSV)") from None
    if limit:
        dataset = dataset.select(range(min(int(limit), len(dataset))))
    name = f"{hub_id}/{subset}" if subset else hub_id
    origin = f"{name}@{revision}:{split}" if revision else f"{name}:{split}"
    return Source(origin, held(lambda: dataset, lambda data, start, stop: data.select(range(start, stop)).to_list()))


def load_hub(hub_id: str, split: str, limit: int | None = None, revision: str | None = None) -> Loaded:
    source = open_hub(hub_id, split, limit, revision)
    return Loaded(source.records(), source.origin)

"""A whole source adapted to pairs: which schema it has (by its columns, or a known public dataset's
layout), then every row through that schema's adapter (pipeline/data/adapters.py), at once (``adapt``) or
one batch of records at a time (``AdaptedStream``, what the pair stage reads).
"""

from __future__ import annotations

from typing import Any, Iterator

from pipeline.data.adapters import ADAPTERS, KIND, SCHEMAS, STRATEGIES, Adapted, SkipRow
from pipeline.data.readers import BATCH_ROWS, Loaded, Source
from pipeline.errors import UserError

def detect_schema(records: list[dict[str, Any]], cols: dict[str, str], origin: str) -> str:
    """The first schema whose columns are all present (``unpaired`` and ``multiple_choice`` first:
    their columns are the most specific)."""
    keys = set().union(*(r.keys() for r in records[:100]))
    has = lambda *names: all(cols[name] in keys for name in names)  # noqa: E731
    if has("prompt", "completion", "label"):
        return "unpaired"
    if has("question", "choices", "answer"):
        return "multiple_choice"
    if has("prompt", "completions"):
        return "scored_completions"
    if has("chosen", "rejected"):
        sample = next((r[cols["chosen"]] for r in records if r.get(cols["chosen"]) is not None), "")
        if isinstance(sample, list) or hasattr(sample, "tolist"):
            return "chat_messages"
        return "prompt_chosen_rejected" if has("prompt") else "transcript"
    raise UserError(f"{origin}: unknown schema; columns found: {sorted(keys)}; schemas tried: {list(SCHEMAS)} "
                    f"(with column names {dict(cols)}); set data.schema and data.columns.* to match")


# Public datasets in the layout they are published in: (name, columns that identify it, schema, the column
# roles). Tried only when no schema matches under data.columns, so a mapping of your own always wins.
LAYOUTS = (
    ("ARC (allenai/ai2_arc)", ("question", "choices", "answerKey"), "multiple_choice", {"answer": "answerKey"}),
    ("HellaSwag (Rowan/hellaswag)", ("ctx", "endings", "label"), "multiple_choice",
     {"question": "ctx", "choices": "endings", "answer": "label"}),
    ("UltraFeedback (openbmb/UltraFeedback)", ("instruction", "completions"), "scored_completions",
     {"prompt": "instruction", "completion_text": "response", "completion_score": "overall_score"}),
)


def detect_layout(records: list[dict[str, Any]], cols: dict[str, str], origin: str) -> tuple[str, dict[str, str]]:
    """(schema, column roles): ``detect_schema`` under ``cols``, else a known public layout (``LAYOUTS``)."""
    try:
        return detect_schema(records, cols, origin), cols
    except UserError:
        keys = set().union(*(r.keys() for r in records[:100]))
        for name, needed, schema, roles in LAYOUTS:
            if set(needed) <= keys:
                print(f"[pair] {origin}: recognised the {name} layout: schema '{schema}', columns {roles}", flush=True)
                return schema, {**cols, **roles}
        raise


def can_detect(records: list[dict[str, Any]], cols: dict[str, str]) -> bool:
    """Whether ``detect_schema`` on these first records of a longer source gives what it would on all of
    them: 100 records seen, and a non-null ``chosen`` among them when the answer depends on one."""
    if len(records) < 100:
        return False
    keys = set().union(*(r.keys() for r in records[:100]))
    has = lambda *names: all(cols[name] in keys for name in names)  # noqa: E731
    if has("prompt", "completion", "label") or has("question", "choices", "answer") or has("prompt", "completions"):
        return True
    return not has("chosen", "rejected") or any(r.get(cols["chosen"]) is not None for r in records)


def resolve_schema(records: list[dict[str, Any]], schema: str, cols: dict[str, str], opts: dict[str, Any],
                   origin: str) -> tuple[str, dict[str, str]]:
    """(schema, column roles): ``data.schema`` checked, or detected from the records (and logged) when ``auto``."""
    if schema == "auto":
        schema, cols = detect_layout(records, cols, origin)
        print(f"[pair] {origin}: detected schema '{schema}'", flush=True)
    if schema not in ADAPTERS:
        raise UserError(f"data.schema={schema!r}: expected auto or one of {list(SCHEMAS)}")
    if opts.get("strategy") not in STRATEGIES and schema == "scored_completions":
        raise UserError(f"data.multi_completion_strategy={opts.get('strategy')!r}: expected one of {list(STRATEGIES)}")
    return schema, cols


def adapt_rows(records: list[dict[str, Any]], first: int, result: Adapted, cols: dict[str, str], opts: dict[str, Any],
               origin: str) -> list[dict[str, Any]]:
    """The pairs (or unpaired rows) of records numbered from ``first``; skipped rows are counted in ``result``."""
    adapter, kind = ADAPTERS[result.schema], KIND[result.schema]
    items = []
    for number, row in enumerate(records, start=first):
        try:
            produced = adapter(row, number, cols, opts, origin)
        except SkipRow as reason:
            result.skip(number, str(reason))
            continue
        for item in produced:
            items.append({**item, "kind": kind, "row": number})
    return items


def adapt(loaded: Loaded, schema: str, cols: dict[str, str], opts: dict[str, Any]) -> Adapted:
    """Turn every record into pairs (or unpaired rows); ``opts``: strategy, min_score_gap, markers."""
    if not loaded.records:
        raise UserError(f"{loaded.origin}: the dataset is empty (0 rows)")
    schema, cols = resolve_schema(loaded.records, schema, cols, opts, loaded.origin)
    result = Adapted(schema=schema, rows_read=len(loaded.records))
    items = adapt_rows(loaded.records, 1, result, cols, opts, loaded.origin)
    (result.unpaired if schema == "unpaired" else result.pairs).extend(items)
    return result


class AdaptedStream:
    """``adapt`` over a ``Source`` one batch of records at a time, as often as it is iterated.

    Each pass yields the pairs (or unpaired rows, when ``schema == "unpaired"``) of one batch of records
    at a time. After a complete pass ``counts`` holds what ``adapt`` returns besides the items: schema,
    rows read, skips by reason, the first ``max_bad_rows`` skipped rows. The errors are the ones ``adapt``
    raises after reading the whole source, in the same order: a row error or an unknown schema is held
    while the rest is read, so an unreadable byte or line further on is reported instead, as before.
    """

    def __init__(self, source: Source, schema: str, cols: dict[str, str], opts: dict[str, Any],
                 batch_rows: int = BATCH_ROWS, max_bad_rows: int | None = 20):
        self.source, self.requested, self.cols, self.opts = source, schema, cols, opts
        self.batch_rows, self.max_bad_rows = batch_rows, max_bad_rows
        self.schema: str | None = None  # resolved during the first pass
        self.counts: Adapted | None = None

    @property
    def origin(self) -> str:
        return self.source.origin

    def batches(self, check_all: bool = True) -> Iterator[list[dict[str, Any]]]:
        counts = Adapted(schema=self.schema or "", rows_read=0, max_bad_rows=self.max_bad_rows)
        pending: UserError | None = None
        head: list[list[dict[str, Any]]] = []  # record batches held until the schema can be detected

        def adapt_batches(batches: list[list[dict[str, Any]]], final: bool) -> list[list[dict[str, Any]]]:
            if self.schema is None:
                records = [record for batch in batches for record in batch]
                if not records:
                    raise UserError(f"{self.origin}: the dataset is empty (0 rows)")
                if not final and self.requested == "auto" and not can_detect(records, self.cols):
                    return []
                self.schema, self.cols = resolve_schema(records, self.requested, self.cols, self.opts, self.origin)
                counts.schema = self.schema
                head.clear()
            produced = []
            for batch in batches:
                produced.append(adapt_rows(batch, counts.rows_read + 1, counts, self.cols, self.opts, self.origin))
                counts.rows_read += len(batch)
            return produced

        for batch in self.source.batches(self.batch_rows, check_all):
            if pending is not None or not batch:
                continue  # after an error: read on, for a reading error further on only
            if self.schema is None:
                head.append(batch)
            try:
                produced = adapt_batches(list(head) if self.schema is None else [batch], final=False)
            except UserError as error:
                pending = error
                continue
            yield from produced
        if pending is None and self.schema is None:
            yield from adapt_batches(list(head), final=True)  # a short source, or the empty-source error
        if pending is not None:
            raise pending
        self.counts = counts

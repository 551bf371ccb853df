"""A Parquet file written row group by row group as its rows arrive, bounded by rows and by bytes of text.

The pair stage writes pairs.parquet with it (pipeline/stages/pair.py): memory stays one row group whatever
the size of the data, and the file does not depend on the batch size it was fed with.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

ROW_GROUP_ROWS = 65536      # pairs.parquet row groups: at most this many rows ...


ROW_GROUP_BYTES = 64 << 20  # ... ending at the row where their text reaches this many bytes


def string_bytes(table: pa.Table) -> np.ndarray:
    """Bytes of text in each row of ``table`` (its string columns)."""
    import pyarrow.compute as pc
    sizes = np.zeros(table.num_rows, dtype=np.int64)
    for column, field in zip(table.columns, table.schema):
        if pa.types.is_string(field.type) or pa.types.is_large_string(field.type):
            sizes += pc.fill_null(pc.binary_length(column), 0).to_numpy().astype(np.int64)
    return sizes


class ParquetRows:
    """A Parquet file written as its rows arrive, as ``DataFrame.to_parquet`` writes it whole (same schema
    and pandas metadata, snappy), but in row groups of at most ``ROW_GROUP_ROWS`` rows, each ending at the
    row where its text reaches ``ROW_GROUP_BYTES``. Groups are cut at the same rows whatever the frames
    written, so the file does not depend on the batch size; one that fits in one group is byte for byte
    the file ``to_parquet`` writes."""

    def __init__(self, path: Path, schema: pa.Schema):
        import pyarrow.parquet as pq
        self.schema = schema
        self.writer = pq.ParquetWriter(path, schema, compression="snappy")
        self.held: list[pa.Table] = []

    def write(self, frame: pd.DataFrame) -> None:
        self.held.append(pa.Table.from_pandas(frame, schema=self.schema, preserve_index=False))
        self.flush(final=False)

    def flush(self, final: bool) -> None:
        while self.held:
            table = pa.concat_tables(self.held)
            ends = np.cumsum(string_bytes(table))
            cut = min(table.num_rows, ROW_GROUP_ROWS, int(np.searchsorted(ends, ROW_GROUP_BYTES)) + 1)
            if not (final or cut < table.num_rows or cut == ROW_GROUP_ROWS or ends[cut - 1] >= ROW_GROUP_BYTES):
                self.held = [table]  # the group is not full yet
                return
            self.writer.write_table(table.slice(0, cut).combine_chunks(), row_group_size=cut)
            self.held = [table.slice(cut)] if cut < table.num_rows else []

    def close(self) -> None:
        self.flush(final=True)
        self.writer.close()


def frame_schema(frame: pd.DataFrame, strings: tuple[str, ...] = ()) -> pa.Schema:
    """The Arrow schema (with pandas metadata) ``to_parquet`` gives the whole frame of which ``frame`` is a
    part: a column named in ``strings`` holds text somewhere in the whole frame, even if null throughout here."""
    probe = frame.iloc[:1].copy()
    for name in strings:
        probe[name] = "text"
    return pa.Schema.from_pandas(probe, preserve_index=False)

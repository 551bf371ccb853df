"""The shared store holds against interrupted writes, torn rows and planted files."""

from __future__ import annotations

import json
import pathlib

import pytest

from pipeline.checkpointing import truncate_jsonl


def write_rows(path, steps):
    path.write_text("".join(json.dumps({"step": s, "train/loss": 0.5}) + "\n" for s in steps))


def test_truncate_keeps_rows_up_to_the_checkpoint_and_drops_a_torn_row(tmp_path, capsys):
    log = tmp_path / "metrics.jsonl"
    write_rows(log, [1, 2, 3, 4])
    with log.open("a") as handle:
        handle.write('{"step": 5, "train/lo')  # killed mid-append
    assert truncate_jsonl(log, 3) == 3
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]
    assert "line 5: incomplete row" in capsys.readouterr().out


def test_a_kill_while_truncating_never_empties_the_log(tmp_path, monkeypatch):
    """The rewrite opens (and so truncates) a file, then dies before writing: the log must survive whole."""
    log = tmp_path / "metrics.jsonl"
    write_rows(log, [1, 2, 3, 4])
    before = log.read_text()

    def killed_write(self, data, *args, **kwargs):
        self.open("w").close()  # the open has truncated the target ...
        raise KeyboardInterrupt  # ... and the process dies before the data is written

    monkeypatch.setattr(pathlib.Path, "write_text", killed_write)
    with pytest.raises(KeyboardInterrupt):
        truncate_jsonl(log, 2)
    monkeypatch.undo()
    assert log.read_text() == before
